//! Ferry: a P2P-first WebRTC signaling hub and SFU media relay.
//!
//! Layout: [`config`] turns flags, environment and file into a validated [`config::Config`];
//! [`server`] binds the HTTP port and runs until a graceful drain ends; [`signal`] is the
//! WebSocket protocol, sessions and rooms; [`auth`] the access tokens; [`metrics`] the
//! Prometheus registry.

pub mod auth;
pub mod config;
pub mod http;
pub mod loadgen;
pub mod media;
pub mod metrics;
pub mod net;
pub mod server;
pub mod signal;
