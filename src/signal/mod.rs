//! Signaling: the WebSocket protocol, sessions, rooms, presence and the P2P relay.

pub mod hub;
pub mod ice;
pub mod protocol;
pub mod session;
