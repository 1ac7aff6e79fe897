//! Integration tests: the Genesys client against the simulator, and the worker against a real
//! RabbitMQ and the simulator.

mod children;
mod cli;
mod dlq_cli;
mod edges_api;
mod enqueue_cli;
mod events_cli;
mod fleet_rate;
mod fleet_store;
mod fuzz_inputs;
mod genesys_client;
mod helpers;
mod layers;
mod liveness;
mod metrics;
mod proxy;
mod resilience;
mod schemas;
mod store_full;
mod trust;
mod worker;
