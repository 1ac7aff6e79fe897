//! `dialer`: an outbound dialer worker for contact centres on Genesys Cloud.
//!
//! Dial jobs come from RabbitMQ, calls go to Genesys Cloud on behalf of the named agent,
//! and exactly one result event per job goes back to a reply exchange before the job is
//! acknowledged. One module per boundary; `main.rs` only parses the command line.

#![forbid(unsafe_code)]
#![warn(unreachable_pub, clippy::dbg_macro, clippy::todo)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod app;
#[cfg(feature = "bench")]
pub mod bench;
pub mod broker;
pub mod check;
pub mod cli;
pub mod config;
pub mod decisions;
pub mod demo;
pub mod dlq;
pub mod enqueue;
pub mod event;
pub mod events;
pub mod fuzzing;
pub mod genesys;
pub mod health;
pub mod job;
pub mod liveness;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod ratelimit;
pub mod reconcile;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
pub mod worker;
