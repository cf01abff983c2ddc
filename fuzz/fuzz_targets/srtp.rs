//! The relay's own SRTP: `open(seal(x)) == x` for every profile, a replay refused, a changed
//! byte refused; a run of packets sealed with the sender's rollover counter opens on the
//! receiver's (across wraps, losses and retransmissions of older packets) as the replay window
//! says; arbitrary bytes opened as SRTP or checked as SRTCP never panic and never pass.
//!
//! Input: the first byte picks the profile; the bytes are also the packet (when they read as an
//! RTP packet: its header, else behind a header of our own) and the steps of the run.
#![no_main]

use std::collections::HashSet;

use ferry::media::srtp::{
    OpenError, Opener, Rollover, RtcpAuth, Sealer, SrtcpKeys, SrtpKeys, Transform, rtp_header,
};
use libfuzzer_sys::fuzz_target;
use rtc::crypto::{AeadAlgorithm, StreamCipherAlgorithm};

fn keys(pick: u8) -> SrtpKeys {
    let (transform, key_len, salt_len) = match pick % 3 {
        0 => (Transform::Gcm(AeadAlgorithm::Aes128Gcm), 16, 12),
        1 => (Transform::Gcm(AeadAlgorithm::Aes256Gcm), 32, 12),
        _ => (Transform::Cm(StreamCipherAlgorithm::Aes128Ctr), 16, 14),
    };
    let auth_key = if matches!(transform, Transform::Cm(_)) {
        (0..20).map(|i| 0x40 + i).collect()
    } else {
        Vec::new()
    };
    SrtpKeys {
        transform,
        session_key: (0..key_len).map(|i| i * 7 + 1).collect(),
        session_salt: (0..salt_len).map(|i| 0xA0 ^ i).collect(),
        auth_key: auth_key.clone(),
        rtcp: Some(SrtcpKeys {
            session_key: (0..key_len).map(|i| i * 5 + 3).collect(),
            session_salt: (0..salt_len).map(|i| 0x50 ^ i).collect(),
            auth_key,
        }),
    }
}

/// A plain RTP packet: a header of ours (12 bytes) before `payload`.
fn packet(ssrc: u32, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 3000).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fuzz_target!(|data: &[u8]| {
    let Some(&pick) = data.first() else {
        return;
    };
    let keys = keys(pick);
    let mut sealer = Sealer::new(&keys).unwrap();
    let mut opener = Opener::new(&keys).unwrap();
    let mut scratch = Vec::new();

    // Arbitrary bytes as a received packet: refused (a tag cannot be forged), nothing panics.
    let mut rtcp = RtcpAuth::new(keys.transform, keys.rtcp.as_ref().unwrap()).unwrap();
    assert!(!rtcp.authentic(data, &mut scratch));
    if let Some((len, ssrc, seq)) = rtp_header(data) {
        assert!(!opener.authentic_first(data, len, ssrc, seq, &mut scratch));
        let mut copy = data.to_vec();
        assert_eq!(
            opener.open(&mut copy, len, ssrc, seq),
            Err(OpenError::Unauthentic)
        );
        // (Its bytes may not be: AES-GCM decrypts in place before it checks the tag.)
        assert_eq!(copy[..len], data[..len], "the header is left as it was");
    }
    // The same opener from here: a refused packet left nothing behind (the same SSRC and
    // sequence number, sealed, opens below).

    // One packet: the input itself when it reads as RTP, else behind a header of ours.
    let plain = match rtp_header(data) {
        Some(_) => data.to_vec(),
        None => packet(0x1234_5678, u16::from_be_bytes([pick, 7]), data),
    };
    let (header_len, ssrc, seq) = rtp_header(&plain).unwrap();
    let mut buf = vec![0xEE; usize::from(pick % 5)];
    let start = buf.len();
    buf.extend_from_slice(&plain);
    sealer
        .seal(&mut buf, start, header_len, ssrc, seq, 0)
        .unwrap();
    let mut sealed = buf[start..].to_vec();
    assert_eq!(
        &sealed[..header_len],
        &plain[..header_len],
        "the header stays in the clear"
    );
    let tampered = {
        let mut t = sealed.clone();
        let at = usize::from(u16::from_be_bytes([pick, *data.last().unwrap()])) % t.len();
        t[at] ^= 1 << (pick % 8);
        t
    };
    assert!(opener.authentic_first(&sealed, header_len, ssrc, seq, &mut scratch));
    assert!(!opener.authentic_first(&tampered, header_len, ssrc, seq, &mut scratch));
    let again = sealed.clone();
    let range = opener
        .open(&mut sealed, header_len, ssrc, seq)
        .expect("opens");
    assert_eq!(range.start, header_len);
    assert_eq!(&sealed[..range.end], &plain[..], "open(seal(x)) == x");
    let mut again = again;
    assert_eq!(
        opener.open(&mut again, header_len, ssrc, seq),
        Err(OpenError::Replayed)
    );
    let mut fresh = Opener::new(&keys).unwrap();
    let mut t = tampered.clone();
    assert_eq!(
        fresh.open(&mut t, header_len, ssrc, seq),
        Err(OpenError::Unauthentic)
    );

    // A run: each byte a step of the sender (forward, or back to an older packet it resends),
    // some lost on the way. The sender's rollover counter is the packet's true one; the receiver
    // opens every packet it did not open yet and that is within its replay window.
    let ssrc = 0xCAFE_0000 | u32::from(pick);
    let mut sender = Rollover::default();
    let mut receiver = Opener::new(&keys).unwrap();
    // A stream starts with rollover counter 0, a few packets before its first wrap.
    let mut highest: u64 = 0xFFF0 + u64::from(pick % 16);
    let mut opened = HashSet::new();
    let mut top_opened: Option<u64> = None;
    for (n, &b) in data.iter().enumerate().skip(1) {
        let step = b as i8;
        let index = if n == 1 {
            highest
        } else if step >= 0 {
            highest += u64::from(step as u8 % 64) + 1;
            highest
        } else {
            highest.saturating_sub(u64::from(step.unsigned_abs() % 100))
        };
        let seq = index as u16;
        let roc = sender.roc_for(seq);
        assert_eq!(
            u64::from(roc),
            index >> 16,
            "the sender's ROC for index {index}"
        );
        let payload = [b; 5];
        let plain = packet(ssrc, seq, &payload);
        let mut buf = plain.clone();
        sealer.seal(&mut buf, 0, 12, ssrc, seq, roc).unwrap();
        // Lost; and past half the sequence space from what the receiver has, the receiver
        // cannot tell the rollover counter (RFC 3711 3.3.1): not delivered either.
        // The stream's first packet arrives: a receiver takes the first it gets as of rollover
        // counter 0 (RFC 3711 3.3.1).
        if (n > 1 && b % 7 == 3) || top_opened.is_some_and(|t| t.abs_diff(index) >= 0x8000) {
            continue;
        }
        let result = receiver.open(&mut buf, 12, ssrc, seq);
        let fresh =
            !opened.contains(&index) && top_opened.is_none_or(|t| index > t || t - index < 64);
        if fresh {
            let range = result.unwrap_or_else(|e| panic!("index {index}: {e}"));
            assert_eq!(&buf[..range.end], &plain[..]);
            opened.insert(index);
            top_opened = top_opened.max(Some(index));
        } else {
            assert_eq!(result, Err(OpenError::Replayed), "index {index}");
        }
    }
});
