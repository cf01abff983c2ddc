//! A subscriber's transport-cc feedback as the relay reads it: any RTCP bytes that parse as a
//! TransportLayerCc, against a log of stamped packets and probes, over time. No panic; the
//! estimate stays a finite rate within the estimator's bounds; padding and retransmission budgets
//! stay sane.
//!
//! Input: 4 bytes of schedule (packets stamped, their size, the time step, a probe goal), then
//! the feedback packets, each behind a 2-byte length.
#![no_main]

use std::time::{Duration, Instant};

use ferry::fuzzing::Downlink;
use libfuzzer_sys::fuzz_target;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (schedule, mut rest) = data.split_at(4);
    let start = Instant::now();
    let mut now = start;
    let mut d = Downlink::new(5);
    assert!(d.stamps());
    let mut next = 0u16;
    let mut feedbacks = 0;
    while rest.len() >= 2 && feedbacks < 64 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (fb, tail) = rest[2..].split_at(len);
        rest = tail;
        feedbacks += 1;
        // Packets sent since the last feedback.
        for _ in 0..schedule[0] % 64 {
            let seq = d.stamp(usize::from(schedule[1]) * 8 + 40, now);
            assert_eq!(seq, next, "stamps are consecutive");
            next = next.wrapping_add(1);
            now += Duration::from_micros(u64::from(schedule[2]) * 50);
            let padding = d.padding_due(now);
            assert!(padding < 10_000_000, "{padding}");
            let _ = d.padding_wake(now);
        }
        // As the relay gets it: rtc's parse of an RTCP compound packet, the transport-cc ones
        // taken out (TransportLayerCc::unmarshal on its own can overflow on a length rtc's
        // compound parse has refused before).
        let Ok(packets) = rtc::rtcp::packet::unmarshal(&mut &fb[..]) else {
            continue;
        };
        let ccs: Vec<&TransportLayerCc> = packets
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerCc>())
            .collect();
        if ccs.is_empty() {
            continue;
        }
        for cc in ccs {
            let _ = d.on_feedback(cc, now);
        }
        let est = d.estimate().expect("feedback came: an estimate");
        assert!((30_000..=50_000_000).contains(&est), "{est}");
        if let Some(acked) = d.estimator.acked_bps() {
            assert!(acked.is_finite() && acked >= 0.0, "{acked}");
        }
        d.want(f64::from(schedule[3]) * 100_000.0, now);
        let _ = d.reallocate(false, now);
        let _ = d.retransmit_allowed(1200, now);
        now += Duration::from_millis(u64::from(len as u8));
    }
});
