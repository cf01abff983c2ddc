//! The relay's own SRTP sealing for forwarded packets.
//!
//! rtc keeps each connection's SRTP contexts to itself, and sending every forwarded copy through
//! its pipeline (interceptors, marshal, encrypt, queues) costs several microseconds and several
//! allocations per copy. Its public crypto-provider hook is how the relay learns the keys of its
//! own connections: [`KeyCapture`] wraps the ring provider, passes every operation through
//! unchanged, and recognises the RFC 3711 key derivation rtc runs when a DTLS handshake completes
//! (AES-CM PRF blocks under the master key, then an AEAD keyed with the derived session key). The
//! session key and salt it derives are left in a per-thread list; the media core, which drives each
//! connection on its own thread, takes them right after the call that completed the handshake, so
//! they are attributed to that connection. rtc derives the local (sending) context first, then the
//! remote one.
//!
//! With the local keys, [`Sealer`] protects a forwarded packet in place in the send batch
//! (AEAD_AES_128_GCM / AEAD_AES_256_GCM, RFC 7714; AES_CM_128_HMAC_SHA1_80, RFC 3711): no
//! allocation, no copy beyond the one into the send buffer. The relay offers only these profiles
//! ([`PROFILES`]; HMAC_SHA1_32 is left out, its tag length cannot be told from the keys).

use std::cell::RefCell;
use std::sync::Arc;

mod capture;
mod open;
mod seal;

pub use capture::{KeyCapture, take_captured};
pub use open::{OpenError, Opener, RtcpAuth};
pub use seal::{Rollover, Sealer};

use rtc::crypto::providers::RingProvider;
use rtc::crypto::{
    ActiveKeyExchange, AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher,
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac,
    PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme, SigningKey, StreamCipher,
    StreamCipherAlgorithm,
};

/// AES-GCM's tag length in SRTP (RFC 7714).
pub const TAG_LEN: usize = 16;

/// HMAC-SHA1-80's tag length.
pub const CM_TAG_LEN: usize = 10;

/// The DTLS-SRTP profiles the relay accepts, all sealed by [`Sealer`]. A DTLS server takes the
/// client's first choice among them (Chrome: AES-CM first; rtc: AES-128-GCM first).
pub const PROFILES: [rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile; 3] = [
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
];

/// The transform a context was keyed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// AEAD_AES_*_GCM.
    Gcm(AeadAlgorithm),
    /// AES_CM with HMAC-SHA1.
    Cm(StreamCipherAlgorithm),
}

/// The `srtp_profiles` name (and metric label) of the profile keys of `transform` belong to.
pub fn profile_label(transform: Transform) -> &'static str {
    match transform {
        Transform::Gcm(AeadAlgorithm::Aes256Gcm) => "aes256-gcm",
        Transform::Gcm(_) => "aes128-gcm",
        Transform::Cm(_) => "aes128-cm-sha1-80",
    }
}

/// One direction's SRTP session keys (the key derivation's output).
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    pub transform: Transform,
    pub session_key: Vec<u8>,
    /// 12 bytes (GCM) or 14 (CM).
    pub session_salt: Vec<u8>,
    /// HMAC-SHA1 key (CM only).
    pub auth_key: Vec<u8>,
    /// The same direction's SRTCP session keys (labels 3-5 of the same derivation), when they
    /// were seen: what [`RtcpAuth`] checks received SRTCP packets with.
    pub rtcp: Option<SrtcpKeys>,
}

/// One direction's SRTCP session keys (RFC 3711 4.3.2, labels 3, 4 and 5).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SrtcpKeys {
    pub session_key: Vec<u8>,
    /// 12 bytes (GCM) or 14 (CM).
    pub session_salt: Vec<u8>,
    /// HMAC-SHA1 key (CM only).
    pub auth_key: Vec<u8>,
}

impl std::fmt::Debug for SrtpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpKeys")
            .field("transform", &self.transform)
            .finish_non_exhaustive()
    }
}

/// The cipher (and salt) of one direction's session keys.
fn keyed(keys: &SrtpKeys) -> Result<(Cipher, [u8; 14]), CryptoError> {
    keyed_parts(
        keys.transform,
        &keys.session_key,
        &keys.auth_key,
        &keys.session_salt,
    )
}

fn keyed_parts(
    transform: Transform,
    session_key: &[u8],
    auth_key: &[u8],
    session_salt: &[u8],
) -> Result<(Cipher, [u8; 14]), CryptoError> {
    let provider = RingProvider::new();
    let crypto = provider.crypto();
    let cipher = match transform {
        Transform::Gcm(a) => Cipher::Gcm(crypto.new_aead(a, session_key)?),
        Transform::Cm(c) => Cipher::Cm {
            ctr: crypto.new_stream_cipher(c, session_key)?,
            mac: crypto.new_hmac(HmacAlgorithm::Sha1, auth_key)?,
        },
    };
    let mut salt = [0; 14];
    let n = session_salt.len().min(14);
    salt[..n].copy_from_slice(&session_salt[..n]);
    Ok((cipher, salt))
}

/// RFC 7714 8.1: 00 00 || SSRC || ROC || SEQ, XOR the 12-byte salt.
fn gcm_iv(salt: &[u8; 14], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&roc.to_be_bytes());
    iv[10..12].copy_from_slice(&seq.to_be_bytes());
    for (v, s) in iv.iter_mut().zip(&salt[..12]) {
        *v ^= s;
    }
    iv
}

/// RFC 3711 4.1.1: SSRC || ROC || SEQ || 00 00 from byte 4, XOR the 14-byte salt.
fn cm_iv(salt: &[u8; 14], ssrc: u32, roc: u32, seq: u16) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&roc.to_be_bytes());
    iv[12..14].copy_from_slice(&seq.to_be_bytes());
    for (v, s) in iv.iter_mut().zip(salt) {
        *v ^= s;
    }
    iv
}

enum Cipher {
    Gcm(Box<dyn AeadCipher>),
    Cm {
        ctr: Box<dyn StreamCipher>,
        mac: Box<dyn Mac>,
    },
}

/// An SRTP packet's header length, SSRC and sequence number (not RTCP, not DTLS or STUN).
pub fn rtp_header(d: &[u8]) -> Option<(usize, u32, u16)> {
    // Version 2, and not an RTCP packet type (192-223 in the second byte).
    if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
        return None;
    }
    let mut len = 12 + 4 * usize::from(d[0] & 0x0f);
    if d[0] & 0x10 != 0 {
        let words = u16::from_be_bytes([*d.get(len + 2)?, *d.get(len + 3)?]);
        len += 4 + 4 * usize::from(words);
    }
    (len <= d.len()).then(|| {
        let seq = u16::from_be_bytes([d[2], d[3]]);
        let ssrc = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        (len, ssrc, seq)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::crypto::providers::RingCrypto;
    use rtc::rtp::header::Header;
    use rtc::shared::marshal::{Marshal, MarshalSize};
    use rtc::srtp::context::Context;
    use rtc::srtp::protection_profile::ProtectionProfile;

    fn master(profile: ProtectionProfile) -> (Vec<u8>, Vec<u8>) {
        let key: Vec<u8> = (0..profile.key_len() as u8).map(|i| i * 7 + 1).collect();
        let salt: Vec<u8> = (0..profile.salt_len() as u8).map(|i| 0xa0 ^ i).collect();
        (key, salt)
    }

    /// Builds a context through the capturing provider (as rtc does after DTLS) and returns the
    /// keys captured for it.
    fn capture(profile: ProtectionProfile, key: &[u8], salt: &[u8]) -> Vec<SrtpKeys> {
        let provider = KeyCapture::new();
        take_captured();
        Context::new(key, salt, profile, None, None, provider.crypto()).unwrap();
        take_captured()
    }

    fn seal_packet(sealer: &mut Sealer, h: &Header, payload: &[u8], roc: u32) -> Vec<u8> {
        let mut buf = vec![0xee; 3]; // sealing at an offset, as in the send batch
        let start = buf.len();
        buf.resize(start + h.marshal_size(), 0);
        h.marshal_to(&mut buf[start..]).unwrap();
        buf.extend_from_slice(payload);
        sealer
            .seal(
                &mut buf,
                start,
                h.marshal_size(),
                h.ssrc,
                h.sequence_number,
                roc,
            )
            .unwrap();
        buf.split_off(start)
    }

    fn header(seq: u16) -> Header {
        Header {
            version: 2,
            payload_type: 96,
            sequence_number: seq,
            timestamp: 3000,
            ssrc: 0x1234_5678,
            ..Default::default()
        }
    }

    #[test]
    fn captured_keys_seal_exactly_as_rtc_does_and_rtc_opens_them() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (key, salt) = master(profile);
            let captured = capture(profile, &key, &salt);
            assert_eq!(captured.len(), 1, "{profile:?}: one context, one key set");
            let mut sealer = Sealer::new(&captured[0]).unwrap();
            let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            let mut rtc_rx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            let payload: Vec<u8> = (0..1188u32).map(|i| i as u8).collect();
            for seq in [65533u16, 65534, 65535, 0, 1] {
                let h = header(seq);
                let roc = u32::from(seq < 100);
                let ours = seal_packet(&mut sealer, &h, &payload, roc);
                let mut plain = vec![0; h.marshal_size()];
                h.marshal_to(&mut plain).unwrap();
                plain.extend_from_slice(&payload);
                let theirs = rtc_tx.encrypt_rtp(&plain).unwrap();
                assert_eq!(ours, theirs.to_vec(), "{profile:?} seq {seq}");
                let opened = rtc_rx.decrypt_rtp(&ours).unwrap();
                assert_eq!(&opened[h.marshal_size()..], &payload[..]);
            }
        }
    }

    #[test]
    fn opener_opens_what_rtc_seals_across_a_wrap_and_refuses_tampering() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (key, salt) = master(profile);
            let captured = capture(profile, &key, &salt);
            let mut opener = Opener::new(&captured[0]).unwrap();
            let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            for (i, seq) in [65533u16, 65534, 65535, 0, 1, 2].into_iter().enumerate() {
                let h = header(seq);
                let payload: Vec<u8> = (0..1100u32).map(|b| (b as u8) ^ (i as u8)).collect();
                let mut plain = vec![0; h.marshal_size()];
                h.marshal_to(&mut plain).unwrap();
                plain.extend_from_slice(&payload);
                let sealed = rtc_tx.encrypt_rtp(&plain).unwrap().to_vec();
                // A flipped bit in the payload or the header: refused, and the next good packet
                // still opens (nothing was committed).
                for at in [h.marshal_size() + 10, 3] {
                    let mut bad = sealed.clone();
                    bad[at] ^= 1;
                    assert!(
                        opener
                            .open(&mut bad, h.marshal_size(), h.ssrc, seq)
                            .is_err(),
                        "{profile:?} seq {seq}: tampered byte {at} accepted"
                    );
                }
                let mut got = sealed.clone();
                let range = opener
                    .open(&mut got, h.marshal_size(), h.ssrc, seq)
                    .unwrap_or_else(|e| panic!("{profile:?} seq {seq}: {e}"));
                assert_eq!(&got[range], &payload[..], "{profile:?} seq {seq}");
            }
            let mut short = vec![0x80; 20];
            assert!(
                opener.open(&mut short, 12, 1, 1).is_err(),
                "too short for a tag"
            );
        }
    }

    /// The SRTCP keys captured with a context check what rtc seals (encrypted compound packets,
    /// one SSRC after another) and refuse a flipped bit anywhere, a packet of random bytes, and
    /// one too short for a tag; the first packet of a new RTP stream is told authentic or not
    /// without a trace in the opener.
    #[test]
    fn srtcp_and_first_srtp_packets_are_authenticated_before_any_state() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (key, salt) = master(profile);
            let captured = capture(profile, &key, &salt);
            let rtcp_keys = captured[0].rtcp.as_ref().expect("SRTCP keys captured");
            let mut auth = RtcpAuth::new(captured[0].transform, rtcp_keys).unwrap();
            let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            let mut scratch = Vec::new();
            for ssrc in [1u32, 0x1234_5678, 0xdead_beef] {
                // A receiver report with one report block, as a receive-only client sends.
                let mut rr = vec![0x81, 201, 0, 7];
                rr.extend_from_slice(&ssrc.to_be_bytes());
                rr.extend_from_slice(&[0x11; 24]);
                let sealed = rtc_tx.encrypt_rtcp(&rr).unwrap().to_vec();
                assert!(
                    auth.authentic(&sealed, &mut scratch),
                    "{profile:?}: rtc's SRTCP refused"
                );
                for at in [1, 5, 12, sealed.len() - 1, sealed.len() - 5] {
                    let mut bad = sealed.clone();
                    bad[at] ^= 0x10;
                    assert!(
                        !auth.authentic(&bad, &mut scratch),
                        "{profile:?}: flipped byte {at} accepted"
                    );
                }
            }
            let mut noise: Vec<u8> = (0..80u32).map(|i| (i * 37 + 11) as u8).collect();
            noise[0] = 0x81;
            noise[1] = 200;
            assert!(!auth.authentic(&noise, &mut scratch), "{profile:?}: noise");
            assert!(!auth.authentic(&noise[..12], &mut scratch), "too short");

            let mut opener = Opener::new(&captured[0]).unwrap();
            let h = header(40_000);
            let mut plain = vec![0; h.marshal_size()];
            h.marshal_to(&mut plain).unwrap();
            plain.extend_from_slice(&[7; 300]);
            let sealed = rtc_tx.encrypt_rtp(&plain).unwrap().to_vec();
            let mut bad = sealed.clone();
            bad[40] ^= 1;
            let hl = h.marshal_size();
            assert!(!opener.authentic_first(&bad, hl, h.ssrc, 40_000, &mut scratch));
            assert!(opener.authentic_first(&sealed, hl, h.ssrc, 40_000, &mut scratch));
            assert!(opener.streams.is_empty(), "{profile:?}: state kept");
            // And the opener still opens it afterwards (nothing was committed).
            let mut got = sealed.clone();
            assert!(opener.open(&mut got, hl, h.ssrc, 40_000).is_ok());
        }
    }

    #[test]
    fn two_contexts_are_captured_in_order() {
        let provider = KeyCapture::new();
        take_captured();
        let profile = ProtectionProfile::AeadAes128Gcm;
        let (k1, s1) = master(profile);
        let (k2, s2) = (vec![9; 16], vec![3; 12]);
        Context::new(&k1, &s1, profile, None, None, provider.crypto()).unwrap();
        Context::new(&k2, &s2, profile, None, None, provider.crypto()).unwrap();
        let got = take_captured();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], capture(profile, &k1, &s1)[0]);
        assert_eq!(got[1], capture(profile, &k2, &s2)[0]);
        assert_ne!(got[0], got[1]);
        assert!(take_captured().is_empty(), "taken once");
    }

    #[test]
    fn opener_refuses_replays_and_packets_behind_its_window() {
        let profile = ProtectionProfile::AeadAes128Gcm;
        let (key, salt) = master(profile);
        let captured = capture(profile, &key, &salt);
        let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
        let sealed: Vec<(u16, Vec<u8>)> = (0..200u16)
            .map(|seq| {
                let h = header(seq);
                let mut plain = vec![0; h.marshal_size()];
                h.marshal_to(&mut plain).unwrap();
                plain.extend_from_slice(&[seq as u8; 100]);
                (seq, rtc_tx.encrypt_rtp(&plain).unwrap().to_vec())
            })
            .collect();
        let hl = header(0).marshal_size();
        let ssrc = header(0).ssrc;
        let mut opener = Opener::new(&captured[0]).unwrap();
        let open = |o: &mut Opener, seq: u16| {
            let mut p = sealed[usize::from(seq)].1.clone();
            o.open(&mut p, hl, ssrc, seq).map(|_| ())
        };
        // Packets 0..=9 arrive, 5 missing; then 5 late (still in the window): fine once.
        for seq in (0..10).filter(|s| *s != 5) {
            assert_eq!(open(&mut opener, seq), Ok(()), "seq {seq}");
        }
        assert_eq!(open(&mut opener, 7), Err(OpenError::Replayed));
        assert_eq!(open(&mut opener, 5), Ok(()), "late but within the window");
        assert_eq!(open(&mut opener, 5), Err(OpenError::Replayed));
        // A tampered packet is refused without being marked: the genuine one still opens.
        let mut bad = sealed[10].1.clone();
        bad[hl + 3] ^= 1;
        assert_eq!(
            opener.open(&mut bad, hl, ssrc, 10),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(open(&mut opener, 10), Ok(()));
        // Far ahead, then a packet 64 or more behind: refused, one 63 behind is not.
        assert_eq!(open(&mut opener, 150), Ok(()));
        assert_eq!(open(&mut opener, 86), Err(OpenError::Replayed), "64 behind");
        assert_eq!(open(&mut opener, 87), Ok(()), "63 behind");
        // Resumed after rtc opened up to 190: 190 and before refused, 191 opens.
        let mut resumed = Opener::new(&captured[0]).unwrap();
        resumed.resume(ssrc, 190, 0);
        assert_eq!(open(&mut resumed, 190), Err(OpenError::Replayed));
        assert_eq!(open(&mut resumed, 191), Ok(()));
        assert_eq!(
            open(&mut resumed, 189),
            Err(OpenError::Replayed),
            "opened by rtc, as far as the opener can tell"
        );
    }

    #[test]
    fn rollover_counts_wraps_and_places_retransmissions() {
        let mut r = Rollover::default();
        assert_eq!(r.roc_for(65534), 0);
        assert_eq!(r.roc_for(65535), 0);
        assert_eq!(r.roc_for(0), 1);
        assert_eq!(r.roc_for(65535), 0, "a retransmission from before the wrap");
        assert_eq!(r.roc_for(1), 1);
        assert_eq!(r.roc_for(0), 1, "a retransmission after the wrap");
    }
}
