//! A publisher's RTP packet rewritten for one subscriber: `write_header` (SSRC, payload type,
//! sequence number, timestamp, CSRCs, the publisher's extensions under the subscriber's ids, its
//! transport-cc stamp first) must give a header that parses back to exactly that; and
//! `remap_extensions` (the rtc path's rewrite) must give the same extensions.
//!
//! Input: 8 bytes of route (extension id map seed, payload type, transport-cc id, stamp), then
//! the publisher's packet as received (after SRTP).
#![no_main]

use ferry::fuzzing::{remap_extensions, write_header};
use libfuzzer_sys::fuzz_target;
use rtc::rtp::header::Header;
use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (route, mut packet) = data.split_at(8);
    let Ok(pkt) = rtc::rtp::packet::Packet::unmarshal(&mut packet) else {
        return;
    };
    // The subscriber's ids for the publisher's: a map every id of the packet has an entry in,
    // some dropped (0), some moved to ids only the two-byte form carries.
    let mut ext_map = [0u8; 256];
    for (i, slot) in ext_map.iter_mut().enumerate() {
        let x = (i as u8).wrapping_mul(route[0] | 1).wrapping_add(route[1]);
        *slot = match x % 5 {
            0 => 0,
            1 => x >> 1,
            _ => x % 15,
        };
    }
    let payload_type = route[2];
    let twcc = (route[3] != 0).then(|| (route[3], u16::from_be_bytes([route[4], route[5]])));
    let (seq, ts, ssrc) = (
        u16::from_be_bytes([route[6], route[7]]),
        u32::from_be_bytes([route[7], route[6], route[5], route[4]]),
        u32::from_be_bytes([route[0], route[1], route[2], route[3]]),
    );
    let from = &pkt.header;
    let extensions = &from.extensions;

    let mut buf = vec![0xA5; usize::from(route[0] % 4)];
    let prefix = buf.len();
    let n = write_header(
        &mut buf,
        from,
        payload_type,
        ssrc,
        &ext_map,
        (seq, ts),
        extensions,
        twcc,
    );
    assert_eq!(n, buf.len() - prefix);
    assert_eq!(n % 4, 0, "an RTP header is whole 32-bit words");

    // What the subscriber must see.
    let want: Vec<(u8, Vec<u8>)> = twcc
        .map(|(id, s)| (id, s.to_be_bytes().to_vec()))
        .into_iter()
        .chain(extensions.iter().filter_map(|e| {
            let id = ext_map[usize::from(e.id)];
            (id != 0 && e.payload.len() <= 255).then(|| (id, e.payload.to_vec()))
        }))
        .collect();
    let mut wire = &buf[prefix..];
    let got = Header::unmarshal(&mut wire).expect("the written header parses");
    assert!(wire.is_empty(), "nothing after the header");
    assert_eq!(got.version, 2);
    assert_eq!(got.padding, from.padding);
    assert_eq!(got.marker, from.marker);
    assert_eq!(got.payload_type, payload_type & 0x7f);
    assert_eq!(
        (got.sequence_number, got.timestamp, got.ssrc),
        (seq, ts, ssrc)
    );
    assert_eq!(got.csrc, from.csrc[..from.csrc.len().min(15)]);
    assert_eq!(got.extension, !want.is_empty());
    let got_ext: Vec<(u8, Vec<u8>)> = got
        .extensions
        .iter()
        .map(|e| (e.id, e.payload.to_vec()))
        .collect();
    assert_eq!(got_ext, want);
    if got.extension {
        let one_byte = want
            .iter()
            .all(|(id, p)| *id <= 14 && !p.is_empty() && p.len() <= 16);
        assert_eq!(
            got.extension_profile,
            if one_byte { 0xBEDE } else { 0x1000 }
        );
    }

    // The rtc path's rewrite: the same extensions (without the stamp, which rtc adds itself),
    // and a header rtc can marshal and read back.
    let mut h = Header {
        version: 2,
        payload_type: payload_type & 0x7f,
        sequence_number: seq,
        timestamp: ts,
        ssrc,
        ..Default::default()
    };
    remap_extensions(extensions, &ext_map, &mut h);
    let skip = usize::from(twcc.is_some());
    let mapped: Vec<(u8, Vec<u8>)> = h
        .extensions
        .iter()
        .map(|e| (e.id, e.payload.to_vec()))
        .collect();
    // Extensions over 255 bytes cannot be in a parsed packet, so the lists are comparable.
    assert_eq!(mapped, want[skip..]);
    assert_eq!(h.extension, !h.extensions.is_empty());
    let mut out = vec![0u8; h.marshal_size()];
    if h.marshal_to(&mut out).is_ok() {
        let back = Header::unmarshal(&mut &out[..]).expect("rtc reads what it wrote");
        let ids: Vec<u8> = back.extensions.iter().map(|e| e.id).collect();
        let want_ids: Vec<u8> = h.extensions.iter().map(|e| e.id).collect();
        assert_eq!(ids, want_ids);
    }
});
