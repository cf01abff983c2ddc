//! The per-subscriber cost of forwarding one 1200-byte video packet: rewrite the RTP header to the
//! subscriber's SSRC, payload type and sequence number, then SRTP-protect it with
//! AEAD_AES_128_GCM (webrtc-rs `rtc` srtp, ring), for fan-outs of 1, 10 and 100 subscribers.
//!
//! This is the arithmetic the relay does per subscriber. The relay's current forwarding path
//! (`src/media`) also passes each packet through rtc's interceptor chain; that overhead is not in
//! this number (see docs/performance.md).
//!
//! The `_counted` group does the same plus what the relay's forwarder adds per subscriber for the
//! metrics (packets and bytes out, Prometheus counters with labels resolved once), to show what they
//! cost on the packet path.
//!
//! Run: `cargo bench --bench routing`. Criterion reports time per packet in; with the throughput set
//! to the fan-out, "elem/s" is subscribers served per second, i.e. 1 / (time per subscriber).

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rtc::crypto::providers::RingCrypto;
use rtc::rtp::header::Header;
use rtc::shared::marshal::{Marshal, MarshalSize};
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

struct Subscriber {
    ssrc: u32,
    payload_type: u8,
    seq_offset: u16,
    srtp: Context,
}

fn subscribers(n: usize) -> Vec<Subscriber> {
    (0..n)
        .map(|i| {
            let key = [i as u8; 16];
            let salt = [0x5a; 12];
            Subscriber {
                ssrc: 0x1000_0000 + i as u32,
                payload_type: 96 + (i % 4) as u8,
                seq_offset: (i * 7919) as u16,
                srtp: Context::new(
                    &key,
                    &salt,
                    ProtectionProfile::AeadAes128Gcm,
                    None,
                    None,
                    &RingCrypto,
                )
                .expect("SRTP context"),
            }
        })
        .collect()
}

fn fan_out(c: &mut Criterion) {
    run(c, "forward_1200B_video", None);
    let metrics = ferry::metrics::Metrics::new();
    run(c, "forward_1200B_video_counted", Some(&metrics));
    assert!(metrics.rtp_out[1].get() > 0);
}

fn run(c: &mut Criterion, name: &str, metrics: Option<&ferry::metrics::Metrics>) {
    let payload = Bytes::from(vec![0xab_u8; 1188]);
    let header = Header {
        version: 2,
        marker: false,
        payload_type: 100,
        sequence_number: 1,
        timestamp: 90_000,
        ssrc: 0xdead_beef,
        ..Default::default()
    };
    let mut group = c.benchmark_group(name);
    for n in [1usize, 10, 100] {
        let mut subs = subscribers(n);
        let mut seq: u16 = 0;
        let mut scratch = BytesMut::with_capacity(1500);
        let mut sent_bytes = 0usize;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                for s in subs.iter_mut() {
                    let mut h = header.clone();
                    h.ssrc = s.ssrc;
                    h.payload_type = s.payload_type;
                    h.sequence_number = seq.wrapping_add(s.seq_offset);
                    scratch.clear();
                    scratch.resize(h.marshal_size(), 0);
                    h.marshal_to(&mut scratch).expect("header fits");
                    scratch.extend_from_slice(&payload);
                    let protected = s
                        .srtp
                        .encrypt_rtp_with_header(&scratch, &h)
                        .expect("encrypt");
                    sent_bytes += protected.len();
                    if let Some(m) = metrics {
                        m.rtp_out[1].inc();
                        m.bytes_out[1].inc_by(payload.len() as u64);
                    }
                }
            })
        });
        assert!(sent_bytes > 0);
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
