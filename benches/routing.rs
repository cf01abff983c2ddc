//! The per-subscriber cost of forwarding one 1200-byte video packet on the relay's own path, for
//! fan-outs of 1, 10 and 100 subscribers: the code the forwarder runs for every connected
//! subscriber (`ferry::media::bench::Fanout` runs the forwarder's `SealedCopy::mapped` and
//! `seal_copy`): sequence number and timestamp munging, the header rewritten to the subscriber's
//! SSRC, payload type and extension IDs, SRTP sealing into the send batch, the NACK record, and
//! then the batch grouped per destination into GSO runs (what the send does before its syscalls;
//! the syscalls are not here).
//!
//! - `forward_1200B_video`: AEAD_AES_128_GCM (what webrtc-rs peers pick);
//! - `forward_1200B_video_aes256_gcm`: AEAD_AES_256_GCM (Chrome's choice when only GCM is offered);
//! - `forward_1200B_video_aes_cm`: AES_CM_128_HMAC_SHA1_80 (what Chrome picks by default);
//! - `aes_128_gcm_seal_alone`: the floor under the first, ring's AES-128-GCM sealing 1200 bytes
//!   and nothing else;
//! - `rtc_srtp_context`: for comparison, the arithmetic of the path before the relay sealed
//!   itself: header marshalled per copy and sealed by rtc's SRTP context (`encrypt_rtp_with_header`,
//!   AES-128-GCM); rtc's interceptor chain, which that path also ran, is not in it.
//!
//! Run: `cargo bench --bench routing`. Criterion reports time per packet in; with the throughput set
//! to the fan-out, "elem/s" is subscribers served per second, i.e. 1 / (time per subscriber).

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry::media::bench::Fanout;
use ferry::media::srtp::Transform;
use rtc::crypto::providers::RingCrypto;
use rtc::crypto::{AeadAlgorithm, StreamCipherAlgorithm};
use rtc::rtp::header::{Extension, Header};
use rtc::shared::marshal::{Marshal, MarshalSize};
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

const FANOUTS: [usize; 3] = [1, 10, 100];
/// GSO segments per send (what quinn-udp reports on these machines' loopback).
const MAX_SEGMENTS: usize = 64;

/// A publisher's video packet as Chrome sends it: transport-cc (id 1, not forwarded),
/// video-orientation (id 2, forwarded) and abs-send-time (id 3, not forwarded); 1200 bytes.
fn video_packet() -> rtc::rtp::Packet {
    let header = Header {
        version: 2,
        marker: false,
        payload_type: 100,
        sequence_number: 1,
        timestamp: 90_000,
        ssrc: 0xdead_beef,
        extension: true,
        extension_profile: 0xBEDE,
        extensions: vec![
            Extension {
                id: 1,
                payload: Bytes::from_static(&[0x01, 0x02]),
            },
            Extension {
                id: 2,
                payload: Bytes::from_static(&[0x01]),
            },
            Extension {
                id: 3,
                payload: Bytes::from_static(&[0x10, 0x20, 0x30]),
            },
        ],
        ..Default::default()
    };
    let payload_len = 1200 - header.marshal_size();
    rtc::rtp::Packet {
        header,
        payload: Bytes::from(vec![0xab_u8; payload_len]),
    }
}

fn own_path(c: &mut Criterion, name: &str, transform: Transform) {
    let mut packet = video_packet();
    let mut group = c.benchmark_group(name);
    // Every copy: 12-byte header, a one-byte extension block (4 bytes) holding the remapped
    // extension (2 bytes) and the transport-wide sequence number (3 bytes) padded to 8, the
    // payload and the tag.
    let tag = match transform {
        Transform::Gcm(_) => 16,
        Transform::Cm(_) => 10,
    };
    let copy_len = 24 + packet.payload.len() + tag;
    for n in FANOUTS {
        let mut fanout = Fanout::new(n, transform);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                packet.header.sequence_number = packet.header.sequence_number.wrapping_add(1);
                packet.header.timestamp = packet.header.timestamp.wrapping_add(3000);
                let queued = fanout.forward(&mut packet, Instant::now());
                assert_eq!(queued, n);
                assert_eq!(fanout.drain(MAX_SEGMENTS), n * copy_len);
            })
        });
    }
    group.finish();
}

fn rtc_context(c: &mut Criterion) {
    let packet = video_packet();
    let mut group = c.benchmark_group("rtc_srtp_context");
    for n in FANOUTS {
        let mut subs: Vec<(u32, Context)> = (0..n)
            .map(|i| {
                let context = Context::new(
                    &[i as u8; 16],
                    &[0x5a; 12],
                    ProtectionProfile::AeadAes128Gcm,
                    None,
                    None,
                    &RingCrypto,
                )
                .expect("SRTP context");
                (0x1000_0000 + i as u32, context)
            })
            .collect();
        let mut seq: u16 = 0;
        let mut scratch = BytesMut::with_capacity(1500);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                for (ssrc, context) in subs.iter_mut() {
                    let mut h = packet.header.clone();
                    h.ssrc = *ssrc;
                    h.sequence_number = seq;
                    scratch.clear();
                    scratch.resize(h.marshal_size(), 0);
                    h.marshal_to(&mut scratch).expect("header fits");
                    scratch.extend_from_slice(&packet.payload);
                    let protected = context
                        .encrypt_rtp_with_header(&scratch, &h)
                        .expect("encrypt");
                    std::hint::black_box(protected);
                }
            })
        });
    }
    group.finish();
}

/// The floor under `forward_1200B_video`: ring's AES-128-GCM alone sealing the same 1200 bytes in
/// place (nonce, 20 bytes of AAD, tag), per subscriber key.
fn aes_gcm_alone(c: &mut Criterion) {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let mut group = c.benchmark_group("aes_128_gcm_seal_alone");
    for n in FANOUTS {
        let keys: Vec<LessSafeKey> = (0..n)
            .map(|i| LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[i as u8; 16]).expect("key")))
            .collect();
        let mut buf = vec![0xab_u8; 1200];
        let mut seq: u32 = 0;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                for key in &keys {
                    let mut iv = [0u8; 12];
                    iv[8..].copy_from_slice(&seq.to_be_bytes());
                    let (aad, payload) = buf.split_at_mut(20);
                    let tag = key
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(iv),
                            Aad::from(&*aad),
                            payload,
                        )
                        .expect("seal");
                    let _ = std::hint::black_box(tag);
                }
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    own_path(
        c,
        "forward_1200B_video",
        Transform::Gcm(AeadAlgorithm::Aes128Gcm),
    );
    own_path(
        c,
        "forward_1200B_video_aes256_gcm",
        Transform::Gcm(AeadAlgorithm::Aes256Gcm),
    );
    own_path(
        c,
        "forward_1200B_video_aes_cm",
        Transform::Cm(StreamCipherAlgorithm::Aes128Ctr),
    );
    aes_gcm_alone(c);
    rtc_context(c);
}

criterion_group!(routing, benches);
criterion_main!(routing);
