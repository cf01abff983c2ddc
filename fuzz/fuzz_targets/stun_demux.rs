//! A datagram on the media port: what it is by its first byte (STUN, DTLS, RTP/RTCP), what the
//! STUN handler does with it, whether its ICE check is authentic, the RTP header the relay's own
//! path reads, and its RFC 4571 frame for ICE-TCP.
#![no_main]

use std::net::SocketAddr;

use ferry::media::srtp;
use ferry::net::stun::{self, StunAction};
use ferry::net::{Kind, classify, tcp};
use libfuzzer_sys::fuzz_target;
use rtc::shared::marshal::Unmarshal;
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::message::{BINDING_SUCCESS, Getter, Message};
use rtc::stun::xoraddr::XorMappedAddress;

fuzz_target!(|data: &[u8]| {
    // The sender's address: IPv4 or IPv6, from the datagram's length (the bytes stay the datagram).
    let from: SocketAddr = match data.len() % 3 {
        0 => "198.51.100.7:40000".parse().unwrap(),
        1 => "[2001:db8::1]:5000".parse().unwrap(),
        _ => "[::ffff:203.0.113.9]:1".parse().unwrap(),
    };
    let kind = classify(data);
    match data.first() {
        None => assert_eq!(kind, Kind::Unknown),
        Some(0..=3) => assert_eq!(kind, Kind::Stun),
        Some(20..=63) => assert_eq!(kind, Kind::Dtls),
        Some(128..=191) => assert_eq!(kind, Kind::RtpRtcp),
        Some(_) => assert_eq!(kind, Kind::Unknown),
    }

    // STUN as the shard handles it (it does so for every datagram classified as STUN; here for
    // all of them, which must not panic either).
    let request = stun::is_request(data);
    match stun::handle(data, from) {
        StunAction::Reply(bytes) => {
            // Only a Binding request is answered: the cheap class check the rate limit relies on
            // agrees with the parse.
            assert!(request, "answered a non-request");
            let mut resp = Message::new();
            resp.unmarshal_binary(&bytes).expect("our reply parses");
            assert_eq!(resp.typ, BINDING_SUCCESS);
            assert_eq!(&resp.transaction_id.0[..], &data[8..20]);
            let mut xor = XorMappedAddress::default();
            xor.get_from(&resp).expect("XOR-MAPPED-ADDRESS");
            assert_eq!(SocketAddr::new(xor.ip, xor.port), from);
            FINGERPRINT.check(&resp).expect("FINGERPRINT");
            assert_eq!(classify(&bytes), Kind::Stun);
            assert!(!stun::is_request(&bytes));
            assert!(matches!(stun::handle(&bytes, from), StunAction::ByAddress));
        }
        StunAction::Peer(ufrag) => {
            assert!(request, "routed a non-request as an ICE check");
            assert!(!ufrag.is_empty() && !ufrag.contains(':'), "{ufrag:?}");
            // Whoever sent it, a guess at the password is refused (the datagram carries no
            // integrity made with it, short of a collision).
            assert!(!stun::authentic(data, "fuzz-password-not-in-any-input"));
        }
        StunAction::ByAddress => assert!(!request, "a request answered by address"),
        StunAction::Drop(reason) => assert!(!reason.is_empty()),
    }
    let _ = stun::authentic(data, "");

    // The relay's own RTP path reads the header without rtc; where rtc reads it too, they agree.
    if let Some((len, ssrc, seq)) = srtp::rtp_header(data) {
        assert!((12..=data.len()).contains(&len));
        assert_eq!(len % 4, 0);
        assert_eq!(kind, Kind::RtpRtcp);
        let mut buf = data;
        if let Ok(h) = rtc::rtp::header::Header::unmarshal(&mut buf) {
            assert_eq!((h.ssrc, h.sequence_number), (ssrc, seq));
        }
    }

    // ICE-TCP framing: a 2-byte length, then the datagram.
    let framed = tcp::frame(data).expect("fuzz inputs are under 64 KiB");
    assert_eq!(framed.len(), data.len() + 2);
    assert_eq!(
        usize::from(u16::from_be_bytes([framed[0], framed[1]])),
        data.len()
    );
    assert_eq!(&framed[2..], data);
});
