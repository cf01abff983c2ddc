//! What the media port does with a STUN message (sans-I/O: bytes and an address in, a decision out).
//!
//! A Binding request without USERNAME is a client asking "what is my address?" (server-reflexive
//! candidate gathering): answered for anyone, with XOR-MAPPED-ADDRESS and FINGERPRINT. A Binding
//! request with USERNAME is an ICE connectivity check for one of our peers; it is routed by its
//! USERNAME (`<our ufrag>:<their ufrag>`).

use std::net::SocketAddr;

use rtc::crypto::RTCCryptoProvider;
use rtc::crypto::providers::RingProvider;
use rtc::stun::attributes::ATTR_USERNAME;
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{
    BINDING_REQUEST, BINDING_SUCCESS, CLASS_REQUEST, METHOD_BINDING, Message, Setter,
};
use rtc::stun::xoraddr::XorMappedAddress;

/// The decision for one STUN datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum StunAction {
    /// Send these bytes back to the sender.
    Reply(Vec<u8>),
    /// An ICE check for the peer whose local ufrag is this (the part of USERNAME before ':').
    Peer(String),
    /// A response or indication: it belongs to whichever peer talks with this address.
    ByAddress,
    /// Drop it, for this reason (a metric label).
    Drop(&'static str),
}

/// Whether `buf` claims to be a STUN request (the class bits of its message type, RFC 5389 6),
/// read without parsing the rest.
pub fn is_request(buf: &[u8]) -> bool {
    buf.len() >= 2 && u16::from_be_bytes([buf[0], buf[1]]) & 0x0110 == 0
}

/// Decide what to do with a datagram that looks like STUN (see [`super::classify`]).
pub fn handle(buf: &[u8], from: SocketAddr) -> StunAction {
    let mut msg = Message::new();
    if msg.unmarshal_binary(buf).is_err() {
        return StunAction::Drop("malformed");
    }
    if msg.typ.method != METHOD_BINDING {
        return StunAction::Drop("unexpected_stun");
    }
    if msg.typ.class != CLASS_REQUEST {
        // Answers to our own connectivity checks (ICE-lite still sends triggered checks).
        return StunAction::ByAddress;
    }
    if let Ok(user) = msg.get(ATTR_USERNAME) {
        let Ok(user) = String::from_utf8(user) else {
            return StunAction::Drop("malformed");
        };
        let local = user.split(':').next().unwrap_or_default();
        if local.is_empty() {
            return StunAction::Drop("malformed");
        }
        return StunAction::Peer(local.to_string());
    }
    debug_assert_eq!(msg.typ, BINDING_REQUEST);
    match binding_success(&msg, from) {
        Some(bytes) => StunAction::Reply(bytes),
        None => StunAction::Drop("malformed"),
    }
}

/// Whether the ICE check `buf` (a STUN request, see [`handle`]) carries a MESSAGE-INTEGRITY made
/// with `pwd`, our ICE password for the connection its USERNAME names (RFC 8445 7.2.2 short-term
/// credentials). The ufrag is in the clear in every check; this shows the sender has the SDP.
pub fn authentic(buf: &[u8], pwd: &str) -> bool {
    let mut msg = Message::new();
    if msg.unmarshal_binary(buf).is_err() {
        return false;
    }
    let provider = RingProvider::new();
    MessageIntegrity::check(&mut msg, pwd.as_bytes(), provider.crypto()).is_ok()
}

fn binding_success(req: &Message, from: SocketAddr) -> Option<Vec<u8>> {
    let mut resp = Message::new();
    let xor = XorMappedAddress {
        ip: from.ip(),
        port: from.port(),
    };
    let setters: [Box<dyn Setter>; 4] = [
        Box::new(req.transaction_id),
        Box::new(BINDING_SUCCESS),
        Box::new(xor),
        Box::new(FINGERPRINT),
    ];
    resp.build(&setters).ok()?;
    Some(resp.raw.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::stun::message::Getter;
    use rtc::stun::textattrs::Username;

    fn request(setters: Vec<Box<dyn Setter>>) -> Vec<u8> {
        let mut m = Message::new();
        let mut all: Vec<Box<dyn Setter>> = vec![Box::new(BINDING_REQUEST)];
        all.extend(setters);
        m.build(&all).unwrap();
        m.new_transaction_id().unwrap();
        m.raw.clone()
    }

    #[test]
    fn binding_requests_get_the_senders_address() {
        let from: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let req = request(vec![]);
        let StunAction::Reply(bytes) = handle(&req, from) else {
            panic!("expected a reply");
        };
        let mut resp = Message::new();
        resp.unmarshal_binary(&bytes).unwrap();
        assert_eq!(resp.typ, BINDING_SUCCESS);
        assert_eq!(resp.transaction_id.0, req[8..20]);
        let mut xor = XorMappedAddress::default();
        xor.get_from(&resp).unwrap();
        assert_eq!(SocketAddr::new(xor.ip, xor.port), from);
        FINGERPRINT.check(&resp).unwrap();
    }

    #[test]
    fn ipv6_senders_too() {
        let from: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let StunAction::Reply(bytes) = handle(&request(vec![]), from) else {
            panic!("expected a reply");
        };
        let mut resp = Message::new();
        resp.unmarshal_binary(&bytes).unwrap();
        let mut xor = XorMappedAddress::default();
        xor.get_from(&resp).unwrap();
        assert_eq!(SocketAddr::new(xor.ip, xor.port), from);
    }

    #[test]
    fn checks_with_username_go_to_the_peer() {
        let req = request(vec![Box::new(Username::new(
            ATTR_USERNAME,
            "srv1:cli2".into(),
        ))]);
        assert_eq!(
            handle(&req, "127.0.0.1:1".parse().unwrap()),
            StunAction::Peer("srv1".into())
        );
    }

    #[test]
    fn checks_authenticate_only_with_our_password() {
        let crypto = RingProvider::new();
        let check = |pwd: &str| {
            let mut m = Message::new();
            m.build(&[
                Box::new(BINDING_REQUEST) as Box<dyn Setter>,
                Box::new(Username::new(ATTR_USERNAME, "srv1:cli2".into())),
                Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                    pwd.into(),
                    crypto.crypto(),
                )),
                Box::new(FINGERPRINT),
            ])
            .unwrap();
            m.raw.clone()
        };
        let good = check("our-password");
        assert!(authentic(&good, "our-password"));
        assert!(!authentic(&check("a-guess"), "our-password"));
        // No integrity at all, and a tampered body.
        let bare = request(vec![Box::new(Username::new(
            ATTR_USERNAME,
            "srv1:cli2".into(),
        ))]);
        assert!(!authentic(&bare, "our-password"));
        let mut tampered = good.clone();
        tampered[24] ^= 1;
        assert!(!authentic(&tampered, "our-password"));
    }

    #[test]
    fn requests_are_told_by_their_class_bits() {
        assert!(is_request(&request(vec![])));
        let mut m = Message::new();
        m.build(&[Box::new(BINDING_SUCCESS) as Box<dyn Setter>])
            .unwrap();
        assert!(!is_request(&m.raw));
        assert!(!is_request(&[0]));
    }

    #[test]
    fn garbage_and_other_stun_are_dropped() {
        let from = "127.0.0.1:1".parse().unwrap();
        let req = request(vec![]);
        assert_eq!(handle(&req[..10], from), StunAction::Drop("malformed"));
        let mut truncated = req.clone();
        truncated[3] = 200; // claims a longer body than it has
        assert_eq!(handle(&truncated, from), StunAction::Drop("malformed"));
        let mut m = Message::new();
        m.build(&[Box::new(BINDING_SUCCESS) as Box<dyn Setter>])
            .unwrap();
        assert_eq!(handle(&m.raw, from), StunAction::ByAddress);
    }
}
