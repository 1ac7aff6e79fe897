//! Integration tests: the Genesys client against the simulator, and the worker against a real
//! RabbitMQ and the simulator.

mod children;
mod cli;
mod fleet_store;
mod genesys_client;
mod helpers;
mod proxy;
mod resilience;
mod schemas;
mod worker;
