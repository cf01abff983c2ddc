use super::*;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    RecvDelta, StatusChunkTypeTcc, StatusVectorChunk, SymbolSizeTypeTcc,
};
use rtc::shared::marshal::{Marshal, Unmarshal};

/// A bottleneck: a FIFO draining at `bps`, dropping what would wait longer than `queue_us`
/// (what `tc tbf ... latency` does), then `prop_us` of propagation.
/// With `burst` bytes of tokens, as `tc tbf ... burst` has: a packet leaves as soon as the
/// bucket holds its size, which it refills at `bps` up to `burst`.
struct Link {
    bps: f64,
    queue_us: i64,
    prop_us: i64,
    free_at_us: i64,
    burst: f64,
    tokens: f64,
}

impl Link {
    fn send(&mut self, at_us: i64, size: usize) -> Option<i64> {
        let start = self.free_at_us.max(at_us);
        let refill = (start - self.free_at_us).max(0) as f64 * self.bps / 8e6;
        let tokens = (self.tokens + refill).min(self.burst);
        let short = (size as f64 - tokens).max(0.0);
        let depart = start + (short * 8e6 / self.bps) as i64;
        if depart - at_us > self.queue_us {
            return None;
        }
        self.tokens = tokens + short - size as f64;
        self.free_at_us = depart;
        Some(depart + self.prop_us)
    }
}

/// The receiver's transport-cc feedback for sequence numbers `from..to` (`arrivals` by
/// sequence number, µs), as Chromium sends it: two-bit status vectors, deltas in 250 µs,
/// a 64 ms reference time; marshalled and parsed back as the relay would get it.
fn feedback(from: u16, to: u16, arrivals: &[Option<i64>], count: u8) -> TransportLayerCc {
    let first = arrivals.iter().flatten().next().copied().unwrap_or(0);
    let reference = first / 64_000;
    let mut prev = reference * 64_000;
    let (mut chunks, mut deltas) = (Vec::new(), Vec::new());
    for seven in arrivals.chunks(7) {
        let mut symbols = Vec::new();
        for a in seven {
            match a {
                None => symbols.push(SymbolTypeTcc::PacketNotReceived),
                Some(t) => {
                    let q = (t - prev) / 250 * 250;
                    prev += q;
                    let small = (0..=63_750).contains(&q);
                    let typ = if small {
                        SymbolTypeTcc::PacketReceivedSmallDelta
                    } else {
                        SymbolTypeTcc::PacketReceivedLargeDelta
                    };
                    symbols.push(typ);
                    deltas.push(RecvDelta {
                        type_tcc_packet: typ,
                        delta: q,
                    });
                }
            }
        }
        symbols.resize(7, SymbolTypeTcc::PacketNotReceived);
        chunks.push(PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
            type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
            symbol_size: SymbolSizeTypeTcc::TwoBit,
            symbol_list: symbols,
        }));
    }
    let fb = TransportLayerCc {
        sender_ssrc: 1,
        media_ssrc: 2,
        base_sequence_number: from,
        packet_status_count: to.wrapping_sub(from),
        reference_time: reference as u32,
        fb_pkt_count: count,
        packet_chunks: chunks,
        recv_deltas: deltas,
    };
    let wire = fb.marshal().expect("marshal");
    TransportLayerCc::unmarshal(&mut &wire[..]).expect("parse")
}

/// Simulcast layers of a camera, bits/s.
const LAYERS: [f64; 3] = [150_000.0, 500_000.0, 1_500_000.0];

/// The relay sending one simulcast route to one subscriber over `link`, whose capacity
/// `capacity(t)` sets (t in s), for `secs`: every 5 ms of simulated time, frames of the
/// layer the estimate fits, padding when probing, feedback every 50 ms. The layer and
/// estimate every 100 ms.
fn run(capacity: impl Fn(f64) -> f64, secs: f64) -> Vec<(f64, u8, u64)> {
    run_with_burst(capacity, 0.0, secs)
}

/// [`run`] over a link whose shaper has a bucket of `burst` bytes.
fn run_with_burst(capacity: impl Fn(f64) -> f64, burst: f64, secs: f64) -> Vec<(f64, u8, u64)> {
    let t0 = Instant::now();
    let mut link = Link {
        bps: capacity(0.0),
        queue_us: 50_000,
        prop_us: 20_000,
        free_at_us: 0,
        burst,
        tokens: burst,
    };
    let mut dl = Downlink::new(5);
    let mut layer: Option<u8> = None;
    let (mut arrivals, mut fb_from, mut fb_count) = (Vec::<(u16, Option<i64>)>::new(), 0u16, 0u8);
    let mut out = Vec::new();
    let mut frame_debt = 0.0;
    let steps = (secs * 200.0) as i64;
    for step in 0..steps {
        let us = step * 5_000;
        let now = t0 + Duration::from_micros(us as u64);
        link.bps = capacity(us as f64 / 1e6);
        let mut send = |dl: &mut Downlink, size: usize| {
            let seq = dl.stamp(size, now);
            arrivals.push((seq, link.send(us, size)));
        };
        // A frame every 33 ms, of the current layer, in packets of up to 1200 bytes.
        if step % 7 == 0 {
            let l = layer.map_or(0, usize::from);
            frame_debt += LAYERS[l] / 8.0 * 0.035;
            while frame_debt > 0.0 {
                let size = frame_debt.clamp(100.0, 1200.0) as usize;
                send(&mut dl, size);
                frame_debt -= size as f64;
            }
        }
        if step % 2 == 0 {
            let mut pad = dl.padding_due(now);
            while pad > 0 {
                let size = pad.min(300);
                send(&mut dl, size.max(40));
                pad = pad.saturating_sub(size);
            }
        }
        // Feedback every 50 ms on what arrived by then (FIFO: in order).
        if step % 10 == 9 {
            let ready = arrivals
                .iter()
                .rposition(|(_, a)| a.is_some_and(|t| t <= us))
                .map_or(0, |i| i + 1);
            if ready > 0 {
                let batch: Vec<_> = arrivals.drain(..ready).collect();
                let to = batch.last().unwrap().0.wrapping_add(1);
                let times: Vec<_> = batch.iter().map(|(_, a)| *a).collect();
                let fb = feedback(fb_from, to, &times, fb_count);
                (fb_from, fb_count) = (to, fb_count.wrapping_add(1));
                dl.on_feedback(&fb, now);
                let est = dl.estimate().unwrap() as f64;
                let l = fit_layer(&LAYERS, est, layer);
                layer = Some(l);
                if let Some(next) = LAYERS.get(usize::from(l) + 1) {
                    dl.want(*next * UP_HEADROOM, now);
                }
            }
        }
        if step % 20 == 0 {
            out.push((us as f64 / 1e6, layer.unwrap_or(0), dl.estimator.bps()));
        }
    }
    out
}

fn layer_at(trace: &[(f64, u8, u64)], t: f64) -> u8 {
    trace.iter().rev().find(|(s, _, _)| *s <= t).unwrap().1
}

#[test]
fn the_estimate_finds_a_clean_link_and_the_top_layer_within_seconds() {
    let trace = run(|_| 5_000_000.0, 15.0);
    let first_top = trace.iter().find(|(_, l, _)| *l == 2).map(|(t, _, _)| *t);
    assert!(first_top.is_some_and(|t| t < 6.0), "{trace:?}");
    assert!(
        trace
            .iter()
            .skip_while(|(t, _, _)| *t < 8.0)
            .all(|(_, l, _)| *l == 2),
        "{trace:?}"
    );
}

#[test]
fn a_thin_link_gets_the_layer_that_fits_and_stays_there() {
    let trace = run(|_| 300_000.0, 30.0);
    let late: Vec<_> = trace.iter().filter(|(t, _, _)| *t >= 5.0).collect();
    assert!(late.iter().all(|(_, l, _)| *l == 0), "{trace:?}");
    assert!(late.iter().all(|(_, _, e)| *e < 450_000), "{trace:?}");
}

#[test]
fn a_link_that_drops_and_recovers_is_followed_down_and_back_up() {
    let cap = |t: f64| {
        if (20.0..40.0).contains(&t) {
            300_000.0
        } else {
            3_000_000.0
        }
    };
    let trace = run(cap, 55.0);
    eprintln!("{trace:?}");
    assert_eq!(layer_at(&trace, 19.9), 2, "{trace:?}");
    // Down within a few seconds of the drop, and kept down (no flapping up).
    let down = trace
        .iter()
        .find(|(t, l, _)| *t >= 20.0 && *l == 0)
        .map(|(t, _, _)| t - 20.0);
    assert!(
        down.is_some_and(|d| d < 3.0),
        "down after {down:?}: {trace:?}"
    );
    assert!(
        trace
            .iter()
            .filter(|(t, _, _)| (24.0..40.0).contains(t))
            .all(|(_, l, _)| *l == 0),
        "{trace:?}"
    );
    // Back to the top within ~10 s of the recovery.
    let up = trace
        .iter()
        .find(|(t, l, _)| *t >= 40.0 && *l == 2)
        .map(|(t, _, _)| t - 40.0);
    assert!(up.is_some_and(|d| d < 10.0), "up after {up:?}: {trace:?}");
}

/// As in the mid-call Chromium test: the shaper lets 16 kB through at once, so a 400 ms probe
/// on the thin link can look carried, and the estimate creeps up on it once the ceiling of the
/// last cut has lapsed (6 s). What holds: the top layer is never tried on the thin link, the
/// middle one only briefly (about every 10 s here, each undone within half a second), and the
/// route is on the lowest nearly all the time. (A known limit: a longer memory of the cut
/// would stop the tries and slow the recovery.)
#[test]
fn a_shaper_bucket_does_not_lift_a_thin_link_to_a_layer_it_cannot_carry() {
    let cap = |t: f64| {
        if (10.0..40.0).contains(&t) {
            300_000.0
        } else {
            3_000_000.0
        }
    };
    let trace = run_with_burst(cap, 16_000.0, 55.0);
    let thin: Vec<u8> = trace
        .iter()
        .filter(|(t, _, _)| (14.0..40.0).contains(t))
        .map(|(_, l, _)| *l)
        .collect();
    assert!(thin.iter().all(|l| *l < 2), "{trace:?}");
    let lowest = thin.iter().filter(|l| **l == 0).count();
    assert!(
        lowest * 10 >= thin.len() * 9,
        "{lowest} of {}: {trace:?}",
        thin.len()
    );
    let up = trace
        .iter()
        .find(|(t, l, _)| *t >= 40.0 && *l == 2)
        .map(|(t, _, _)| t - 40.0);
    assert!(up.is_some_and(|d| d < 12.0), "up after {up:?}: {trace:?}");
}

#[test]
fn fit_layer_needs_headroom_to_go_up_but_not_to_stay() {
    assert_eq!(fit_layer(&LAYERS, 100_000.0, None), 0);
    assert_eq!(
        fit_layer(&LAYERS, 550_000.0, Some(0)),
        0,
        "500k * 1.15 > 550k"
    );
    assert_eq!(
        fit_layer(&LAYERS, 550_000.0, Some(1)),
        1,
        "staying needs no headroom"
    );
    assert_eq!(fit_layer(&LAYERS, 2_000_000.0, Some(0)), 2);
}

#[test]
fn feedback_for_unknown_or_old_sequence_numbers_is_ignored() {
    let t0 = Instant::now();
    let mut dl = Downlink::new(3);
    for i in 0..10 {
        dl.stamp(1000, t0 + Duration::from_millis(i));
    }
    // Sequence numbers never sent (far ahead) and a replay of the same feedback.
    let fb = feedback(500, 510, &[Some(1000); 10], 0);
    dl.on_feedback(&fb, t0 + Duration::from_millis(50));
    assert!(dl.results.is_empty());
    let arrivals: Vec<_> = (0..10).map(|i| Some(30_000 + i * 1000)).collect();
    let fb = feedback(0, 10, &arrivals, 1);
    dl.on_feedback(&fb, t0 + Duration::from_millis(60));
    assert_eq!(dl.results.len(), 10);
    dl.on_feedback(&fb, t0 + Duration::from_millis(70));
    assert!(dl.results.is_empty(), "each packet counts once");
}

#[test]
fn remb_is_the_estimate_only_without_transport_cc_feedback() {
    let t0 = Instant::now();
    let mut dl = Downlink::new(0);
    assert_eq!(dl.estimate(), None);
    // Given up on transport-cc (3 s without): a REMB brings an estimate back.
    assert!(!dl.silent(t0));
    assert!(dl.silent(t0 + FEEDBACK_WAIT));
    assert_eq!(dl.starting_fit(), None);
    assert!(dl.on_remb(450_000.0));
    assert_eq!(dl.estimate(), Some(450_000));
    assert_eq!(
        dl.starting_fit(),
        Some(0),
        "routes follow the estimate again"
    );
    assert!(!dl.silent(t0 + 2 * FEEDBACK_WAIT));
    assert!(!dl.on_remb(f32::NAN), "a broken REMB changes nothing");
    assert!(dl.on_remb(1.0));
    assert_eq!(dl.estimate(), Some(MIN_BPS as u64), "clamped");
    // Transport-cc feedback, once it comes, is the estimate; REMBs are ignored.
    let mut dl = Downlink::new(3);
    for i in 0..10 {
        dl.stamp(1000, t0 + Duration::from_millis(i));
    }
    let arrivals: Vec<_> = (0..10).map(|i| Some(30_000 + i * 1000)).collect();
    dl.on_feedback(
        &feedback(0, 10, &arrivals, 1),
        t0 + Duration::from_millis(60),
    );
    let est = dl.estimate().expect("an estimate");
    assert!(!dl.on_remb(10_000_000.0));
    assert_eq!(dl.estimate(), Some(est));
}
