//! The edgesync edge agent as a library: `main.rs` only parses arguments and calls
//! [`app::run`] or one of the read-only [`cli`] commands.
//!
//! Data path: MQTT ([`mqtt`]) → SQLite shadows and outbox ([`store`]) → controller
//! ([`uplink`]); and back: controller desired-state stream ([`downlink`]) → store → device
//! delta over MQTT.

pub mod app;
pub mod backoff;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod cli;
pub mod cloud_client;
pub mod config;
pub mod downlink;
pub mod http;
pub mod lock;
pub mod metrics;
pub mod mqtt;
pub mod store;
pub mod telemetry;
pub mod uplink;
