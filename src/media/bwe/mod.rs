//! A downlink bandwidth estimate per subscriber connection, from that subscriber's own
//! transport-cc feedback (draft-holmer-rmcat-transport-wide-cc-extensions):
//! - every packet the relay seals for the subscriber carries a transport-wide sequence number
//!   ([`Downlink::stamp`]), and the relay remembers when it sent it and how big it was;
//! - the subscriber's feedback says which arrived and when ([`Downlink::on_feedback`]);
//! - [`Estimator`] turns that into a rate the way libwebrtc's GCC does: the delay gradient of
//!   packet groups (a trendline over their one-way delay variation, with an adaptive overuse
//!   threshold) drives an AIMD controller capped by what was actually delivered, and loss above
//!   10 % cuts the rate;
//! - [`Probe`] finds room above the current estimate: for a short cluster the relay pads the
//!   subscriber's stream up to a target rate, and the rate the cluster arrived at becomes the
//!   estimate when the link carried it.
//!
//! Everything here runs on given times (`Instant`s, microseconds), never on a clock of its own,
//! so the tests drive it over a simulated link without sleeping.

mod estimator;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, SymbolTypeTcc, TransportLayerCc,
};

pub use estimator::{Estimator, PacketResult, Usage};
use estimator::{LOSS_HIGH, MAX_BPS, MIN_BPS};

/// How long a probe cluster pads, how often the padding is topped up, and how long after a
/// probe that found no room the next one waits (doubling up to the most).
pub const PROBE_LENGTH: Duration = Duration::from_millis(400);
pub const PROBE_TICK: Duration = Duration::from_millis(10);
const PROBE_AFTER_SUCCESS: Duration = Duration::from_millis(500);
const PROBE_BACKOFF: Duration = Duration::from_secs(2);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(6);

/// Probing for room above the estimate: a cluster of [`PROBE_LENGTH`] in which the relay pads
/// the subscriber's stream up to a target rate.
#[derive(Debug)]
pub struct Probe {
    id: u16,
    /// The cluster being sent: its target (bits/s), start, end, bytes sent so far.
    active: Option<(f64, Instant, Instant, u64)>,
    /// Sent and waiting for feedback on its last packet (that sequence number, since then).
    pending: Option<(u64, Instant)>,
    next_at: Option<Instant>,
    backoff: Duration,
    /// What the current or last probe asks of the path (bits/s).
    goal: f64,
    /// The last probe found no room: the next ones ask for little more than the estimate, so
    /// that a link that is full is not flooded again (cleared by a probe that finds room).
    gentle: bool,
}

/// How far above the estimate a probe may go: while probes find room, and after one did not.
const PROBE_REACH: f64 = 2.0;
const PROBE_REACH_GENTLE: f64 = 1.3;
/// A probe found room when the path carried this share of its target.
const PROBE_CARRIED: f64 = 0.93;

impl Default for Probe {
    fn default() -> Self {
        Probe {
            id: 0,
            active: None,
            pending: None,
            next_at: None,
            backoff: PROBE_BACKOFF,
            goal: 0.0,
            gentle: false,
        }
    }
}

impl Probe {
    /// The cluster id packets sent now belong to (0: none).
    pub fn cluster(&self) -> u16 {
        if self.active.is_some() { self.id } else { 0 }
    }
}

/// The relay's side of one subscriber connection's transport-cc: stamping, the send log,
/// feedback, the estimate, probing.
#[derive(Debug, Default)]
pub struct Downlink {
    /// The subscriber's transport-cc extension id (0: not negotiated; no estimate).
    pub ext_id: u8,
    next_seq: u64,
    log: Vec<Record>,
    base: Option<Instant>,
    /// The highest sequence number feedback covered (unwrapped).
    covered: Option<u64>,
    results: Vec<PacketResult>,
    pub estimator: Estimator,
    pub probe: Probe,
    /// Feedback came: the estimate is the subscriber's own.
    pub active: bool,
    /// When the relay first looked for feedback that has not come yet, and whether it stopped
    /// waiting (see [`Downlink::silent`]).
    waiting_since: Option<Instant>,
    pub gave_up: bool,
    /// When the routes were last fitted to the estimate, and to which.
    allocated: Option<(Instant, u64)>,
    /// Bytes of retransmissions it may be sent now, and when that was worked out.
    resend_tokens: f64,
    resend_at: Option<Instant>,
    /// The subscriber's own estimate (bits/s) from its last REMB: the estimate of a connection
    /// that sends no transport-cc feedback.
    remb: Option<f64>,
}

/// The share of the estimate retransmissions may take (a token bucket holding 200 ms of it).
const RETRANSMIT_SHARE: f64 = 0.25;

/// How often a subscriber's routes are fitted to its estimate, at most, unless it fell by more
/// than [`REALLOCATE_DROP`] or a probe ended.
const REALLOCATE_EVERY: Duration = Duration::from_millis(200);
const REALLOCATE_DROP: f64 = 0.85;

/// How long a connection may go without transport-cc feedback before its routes' layers no
/// longer wait for an estimate (they follow its receiver reports instead).
pub const FEEDBACK_WAIT: Duration = Duration::from_secs(3);

/// Sent packets remembered for feedback: 8 KiB a connection; half a second at 1000 packets/s,
/// two at a 2.5 Mbit/s video's 260 (browsers send feedback every 50-100 ms).
const LOG: usize = 512;

#[derive(Clone, Copy, Default, Debug)]
struct Record {
    send_us: i64,
    size: u16,
    cluster: u16,
    seq: u16,
    used: bool,
    reported: bool,
}

impl Downlink {
    /// Stamping under the subscriber's transport-cc extension `ext_id`.
    pub fn new(ext_id: u8) -> Downlink {
        Downlink {
            ext_id,
            ..Downlink::default()
        }
    }

    /// The relay has a transport-cc sequence number to put on the subscriber's packets.
    pub fn stamps(&self) -> bool {
        self.ext_id != 0
    }

    fn micros(&mut self, now: Instant) -> i64 {
        let base = *self.base.get_or_insert(now);
        now.saturating_duration_since(base).as_micros() as i64
    }

    /// A packet of `size` bytes (as sent) goes out now: its transport-wide sequence number.
    pub fn stamp(&mut self, size: usize, now: Instant) -> u16 {
        if self.log.is_empty() {
            self.log = vec![Record::default(); LOG];
        }
        let send_us = self.micros(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let cluster = self.probe.cluster();
        if let Some((_, _, _, sent)) = self.probe.active.as_mut() {
            *sent += size as u64;
        }
        self.log[seq as usize % LOG] = Record {
            send_us,
            size: size.min(usize::from(u16::MAX)) as u16,
            cluster,
            seq: seq as u16,
            used: true,
            reported: false,
        };
        seq as u16
    }

    /// The subscriber's feedback: the estimate updated. When it finished a probe: whether the
    /// probe found room up to what it asked for.
    pub fn on_feedback(&mut self, fb: &TransportLayerCc, now: Instant) -> Option<bool> {
        let now_us = self.micros(now);
        self.active = true;
        self.read_feedback(fb);
        let before = self.estimator.bps;
        let loss = self.estimator.on_feedback(&self.results, now_us);
        // The link just proved full (a cut of the estimate): the next probes are gentle.
        if self.estimator.bps < 0.8 * before {
            self.probe.gentle = true;
        }
        // A probe that makes the path lose or queue is stopped at once.
        if self.probe.active.is_some()
            && (self.estimator.usage == Usage::Over || loss.is_some_and(|l| l > LOSS_HIGH))
        {
            self.end_probe(now);
        }
        match self.probe.pending {
            Some((last, _)) if self.covered.is_some_and(|c| c >= last) => {
                Some(self.finish_probe(now, now_us))
            }
            _ => None,
        }
    }

    /// The packets `fb` reports that the log still holds and that no earlier feedback reported
    /// as received, into `results`; `covered` moves up to the highest sequence number in it.
    fn read_feedback(&mut self, fb: &TransportLayerCc) {
        self.results.clear();
        let mut arrival = i64::from(fb.reference_time) * 64_000;
        let mut deltas = fb.recv_deltas.iter();
        let count = usize::from(fb.packet_status_count);
        let mut i = 0usize;
        let mut highest = None;
        for chunk in &fb.packet_chunks {
            let (run, list): ((SymbolTypeTcc, usize), &[SymbolTypeTcc]) = match chunk {
                PacketStatusChunk::RunLengthChunk(c) => {
                    ((c.packet_status_symbol, usize::from(c.run_length)), &[])
                }
                PacketStatusChunk::StatusVectorChunk(c) => {
                    ((SymbolTypeTcc::PacketNotReceived, 0), &c.symbol_list[..])
                }
            };
            for symbol in std::iter::repeat_n(run.0, run.1).chain(list.iter().copied()) {
                if i >= count {
                    break;
                }
                let wire = fb.base_sequence_number.wrapping_add(i as u16);
                i += 1;
                let recv = match symbol {
                    SymbolTypeTcc::PacketReceivedSmallDelta
                    | SymbolTypeTcc::PacketReceivedLargeDelta => {
                        arrival += deltas.next().map_or(0, |d| d.delta);
                        Some(arrival)
                    }
                    SymbolTypeTcc::PacketReceivedWithoutDelta => Some(arrival),
                    SymbolTypeTcc::PacketNotReceived => None,
                };
                let Some(seq) = self.unwrap(wire) else {
                    continue;
                };
                highest = highest.max(Some(seq));
                let rec = &mut self.log[seq as usize % LOG];
                if !rec.used || rec.seq != wire || rec.reported {
                    continue;
                }
                rec.reported = recv.is_some();
                self.results.push(PacketResult {
                    send_us: rec.send_us,
                    recv_us: recv,
                    size: u32::from(rec.size),
                    cluster: rec.cluster,
                });
            }
        }
        if let Some(h) = highest {
            self.covered = Some(self.covered.map_or(h, |c| c.max(h)));
        }
    }

    /// Feedback covers the last packet of the pending probe: whether the path carried it (the
    /// estimate then takes the carried rate), and when the next probe may go.
    fn finish_probe(&mut self, now: Instant, now_us: i64) -> bool {
        self.probe.pending = None;
        let carried = self.estimator.finish_cluster();
        // The link carried what was asked of it (the goal, or less: a gentle probe).
        // All of it, headroom included: a full link carries a little less than a gentle
        // probe asks, and that is no room.
        let found = carried.is_some_and(|c| c >= PROBE_CARRIED * self.probe.goal);
        if let (true, Some(c)) = (found, carried) {
            self.estimator.raise(c, now_us);
        }
        self.probe.gentle = !found;
        let wait = if found {
            self.probe.backoff = PROBE_BACKOFF;
            PROBE_AFTER_SUCCESS
        } else {
            let w = self.probe.backoff;
            self.probe.backoff = (w * 2).min(PROBE_BACKOFF_MAX);
            w
        };
        self.probe.next_at = Some(now + wait);
        found
    }

    /// Checked once a second: true once, when no feedback came for [`FEEDBACK_WAIT`] (a client
    /// without transport-cc): its routes stop waiting for an estimate.
    pub fn silent(&mut self, now: Instant) -> bool {
        if self.active || self.gave_up || self.remb.is_some() {
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        self.gave_up = now.saturating_duration_since(since) >= FEEDBACK_WAIT;
        self.gave_up
    }

    /// The layer a new route of this connection starts at: the lowest while an estimate is to
    /// be had (it moves up as the estimate allows), else none of its own (`None`).
    pub fn starting_fit(&self) -> Option<u8> {
        (!self.gave_up).then_some(0)
    }

    /// Whether the routes should be fitted to the estimate again now (`probed`: a probe just
    /// ended); if so, that is noted.
    pub fn reallocate(&mut self, probed: bool, now: Instant) -> bool {
        let Some(est) = self.estimate() else {
            return false;
        };
        let due = match self.allocated {
            None => true,
            Some((at, last)) => {
                probed
                    || (est as f64) < REALLOCATE_DROP * last as f64
                    || now.saturating_duration_since(at) >= REALLOCATE_EVERY
            }
        };
        if due {
            self.allocated = Some((now, est));
        }
        due
    }

    /// Whether a retransmission of `bytes` fits the connection's share for them now (always,
    /// without an estimate).
    pub fn retransmit_allowed(&mut self, bytes: usize, now: Instant) -> bool {
        let Some(est) = self.estimate() else {
            return true;
        };
        let rate = est as f64 * RETRANSMIT_SHARE / 8.0;
        let depth = (rate * 0.2).max(3000.0);
        let elapsed = self
            .resend_at
            .map_or(f64::MAX, |t| now.saturating_duration_since(t).as_secs_f64());
        self.resend_at = Some(now);
        self.resend_tokens = (self.resend_tokens + elapsed * rate).min(depth);
        if self.resend_tokens < bytes as f64 {
            return false;
        }
        self.resend_tokens -= bytes as f64;
        true
    }

    /// The full sequence number of `wire`, one of the last [`LOG`] sent.
    fn unwrap(&self, wire: u16) -> Option<u64> {
        let next = self.next_seq;
        let back = u64::from((next as u16).wrapping_sub(wire));
        (back >= 1 && back <= LOG as u64 && back <= next).then(|| next - back)
    }

    /// The estimate (bits/s), once the subscriber's feedback drives it: its transport-cc
    /// feedback, or where it sends none, its REMB.
    pub fn estimate(&self) -> Option<u64> {
        if self.active {
            Some(self.estimator.bps())
        } else {
            self.remb.map(|b| b as u64)
        }
    }

    /// A REMB from the subscriber (its receiver's own estimate, `bps`): the estimate of a
    /// connection that sends no transport-cc feedback (a client that negotiated only
    /// `goog-remb`). Whether it is (transport-cc feedback, when it comes, takes precedence).
    /// No probing follows it: the client's estimate climbs by itself.
    pub fn on_remb(&mut self, bps: f32) -> bool {
        if self.active || !bps.is_finite() {
            return false;
        }
        self.remb = Some(f64::from(bps).clamp(MIN_BPS, MAX_BPS));
        // Its routes follow the estimate again if they had stopped waiting for one.
        self.gave_up = false;
        true
    }

    /// The subscriber's routes would take `goal` bits/s: probe towards it when the estimate is
    /// short of it and no probe is under way or waiting.
    pub fn want(&mut self, goal: f64, now: Instant) {
        let est = self.estimator.bps;
        let p = &mut self.probe;
        // Feedback on a probe's tail that never comes (lost) does not stop probing for good.
        if p.pending
            .is_some_and(|(_, t)| now.saturating_duration_since(t) > PROBE_BACKOFF_MAX)
        {
            p.pending = None;
            self.estimator.cluster.clear();
        }
        if !self.active
            || goal <= est
            || p.active.is_some()
            || p.pending.is_some()
            || p.next_at.is_some_and(|t| now < t)
        {
            return;
        }
        p.id = p.id.wrapping_add(1).max(1);
        // Up to the goal with some headroom, but not far beyond what is known to fit.
        let reach = if p.gentle {
            PROBE_REACH_GENTLE
        } else {
            PROBE_REACH
        };
        let target = (goal * 1.1).min(est * reach);
        p.goal = target;
        p.active = Some((target, now, now + PROBE_LENGTH, 0));
        self.estimator.start_cluster(p.id);
    }

    /// Padding bytes due now to keep the probe cluster at its target (0: none; the probe ends
    /// when its time is up).
    pub fn padding_due(&mut self, now: Instant) -> usize {
        let Some((target, start, end, sent)) = self.probe.active else {
            return 0;
        };
        if now >= end {
            self.end_probe(now);
            return 0;
        }
        let elapsed = now.saturating_duration_since(start).as_secs_f64() + PROBE_TICK.as_secs_f64();
        let due = target / 8.0 * elapsed;
        (due - sent as f64).max(0.0) as usize
    }

    /// When padding is due next (`None`: no probe under way).
    pub fn padding_wake(&self, now: Instant) -> Option<Instant> {
        self.probe
            .active
            .map(|(_, _, end, _)| (now + PROBE_TICK).min(end))
    }

    fn end_probe(&mut self, now: Instant) {
        if self.probe.active.take().is_some() {
            self.probe.pending = Some((self.next_seq.saturating_sub(1), now));
            self.probe.next_at = Some(now + PROBE_BACKOFF_MAX);
        }
    }
}

/// The layer (of `rates`, bits/s each, lowest first) a route takes within `budget` bits/s: the
/// highest that fits, where a layer above the route's `current` one must fit with
/// [`UP_HEADROOM`] to spare (so a link at the edge does not flap). The lowest is always taken.
pub fn fit_layer(rates: &[f64], budget: f64, current: Option<u8>) -> u8 {
    let mut best = 0u8;
    for (l, rate) in rates.iter().enumerate().skip(1) {
        let above = current.is_none_or(|c| l > usize::from(c));
        let cost = if above { rate * UP_HEADROOM } else { *rate };
        if cost > budget {
            break;
        }
        best = l as u8;
    }
    best
}

/// How much more than its bitrate the estimate must leave before a route moves up a layer.
pub const UP_HEADROOM: f64 = 1.15;
