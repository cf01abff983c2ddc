//! Ferry: a P2P-first WebRTC signaling hub and SFU media relay.
//!
//! Layout: [`config`] turns flags, environment and file into a validated [`config::Config`];
//! [`server`] binds the HTTP port and runs until a graceful drain ends; [`signal`] is the
//! WebSocket protocol, sessions and rooms; [`auth`] the access tokens; [`metrics`] the
//! Prometheus registry.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod http;
pub mod listener;
pub mod loadgen;
pub mod media;
pub mod metrics;
pub mod net;
pub mod server;
pub mod signal;
pub mod tls;

/// Entry points for the fuzz targets in `fuzz/`: thin wrappers over private functions, with no
/// behaviour of their own. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::media::fuzzing::*;
    pub use crate::signal::session::fuzz_check_sdp_grants as check_sdp_grants;
}

/// The log filter when `FERRY_LOG` is not set: Ferry's own lines from `info` up, and what the
/// engine says that an operator must act on. rtc's DTLS handshake warns about every extension
/// it does not know in a browser's hello (harmless: they are ignored), so it speaks from `error`.
pub const DEFAULT_LOG_FILTER: &str = "info,rtc_dtls::handshake=error";
