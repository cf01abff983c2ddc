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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, SymbolTypeTcc, TransportLayerCc,
};

/// Where an estimate starts before any feedback (libwebrtc's default start rate).
pub const START_BPS: f64 = 300_000.0;
const MIN_BPS: f64 = 30_000.0;
const MAX_BPS: f64 = 50_000_000.0;

/// Packets sent within this span of a group's first form one group (a frame's burst).
const GROUP_SPAN_US: i64 = 5_000;
/// Delay samples in the trendline's regression, and its smoothing and gain (libwebrtc's).
const TREND_WINDOW: usize = 20;
const SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
/// Overuse must last this long (ms of send time) before it counts.
const OVERUSE_MS: f64 = 10.0;
/// How fast the overuse threshold follows the signal, up and down.
const K_UP: f64 = 0.0087;
const K_DOWN: f64 = 0.039;
/// On overuse the rate drops to this share of what was delivered.
const BETA: f64 = 0.85;
/// Loss above which the rate is cut, and below which it may grow.
const LOSS_HIGH: f64 = 0.10;
const LOSS_LOW: f64 = 0.02;
/// Packets of feedback a loss figure is made of, at least.
const LOSS_PACKETS: u32 = 20;
/// After a cut, for this long, the estimate stays under this many times what the cut left.
const CUT_MEMORY: Duration = Duration::from_secs(6);
const CUT_CEILING: f64 = 1.5;
/// The delivered rate is measured over this window of arrival time.
const ACKED_WINDOW_US: i64 = 500_000;

/// What the delay gradient says of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Normal,
    /// Queues are building: sending faster than the path carries.
    Over,
    /// Queues are draining.
    Under,
}

/// One packet's fate, as feedback tells it: when it was sent and arrived (the receiver's clock;
/// `None`: lost), its size, and the probe cluster it belonged to (0: none).
#[derive(Clone, Copy, Debug)]
pub struct PacketResult {
    pub send_us: i64,
    pub recv_us: Option<i64>,
    pub size: u32,
    pub cluster: u16,
}

/// The trendline filter and overuse detector (libwebrtc's `TrendlineEstimator`).
#[derive(Debug)]
struct Trendline {
    samples: VecDeque<(f64, f64)>,
    first_arrival_us: Option<i64>,
    accumulated_ms: f64,
    smoothed_ms: f64,
    deltas: u32,
    threshold: f64,
    last_threshold_us: Option<i64>,
    over_ms: Option<f64>,
    over_count: u32,
    prev_trend: f64,
    usage: Usage,
}

impl Default for Trendline {
    fn default() -> Self {
        Trendline {
            samples: VecDeque::with_capacity(TREND_WINDOW + 1),
            first_arrival_us: None,
            accumulated_ms: 0.0,
            smoothed_ms: 0.0,
            deltas: 0,
            threshold: 12.5,
            last_threshold_us: None,
            over_ms: None,
            over_count: 0,
            prev_trend: 0.0,
            usage: Usage::Normal,
        }
    }
}

impl Trendline {
    /// The next group: how much longer (ms) it took to arrive after the previous one than it
    /// took to send, and when it arrived.
    fn update(&mut self, recv_delta_ms: f64, send_delta_ms: f64, arrival_us: i64) {
        self.deltas = (self.deltas + 1).min(1000);
        self.accumulated_ms += recv_delta_ms - send_delta_ms;
        self.smoothed_ms = SMOOTHING * self.smoothed_ms + (1.0 - SMOOTHING) * self.accumulated_ms;
        let first = *self.first_arrival_us.get_or_insert(arrival_us);
        self.samples
            .push_back(((arrival_us - first) as f64 / 1000.0, self.smoothed_ms));
        if self.samples.len() > TREND_WINDOW {
            self.samples.pop_front();
        }
        let trend = if self.samples.len() == TREND_WINDOW {
            slope(&self.samples).unwrap_or(self.prev_trend)
        } else {
            self.prev_trend
        };
        self.detect(trend, send_delta_ms, arrival_us);
    }

    fn detect(&mut self, trend: f64, send_delta_ms: f64, now_us: i64) {
        if self.deltas < 2 {
            self.usage = Usage::Normal;
            return;
        }
        let modified = f64::from(self.deltas.min(60)) * trend * TREND_GAIN;
        if modified > self.threshold {
            let over = self
                .over_ms
                .map_or(send_delta_ms / 2.0, |t| t + send_delta_ms);
            self.over_ms = Some(over);
            self.over_count += 1;
            if over > OVERUSE_MS && self.over_count > 1 && trend >= self.prev_trend {
                self.over_ms = Some(0.0);
                self.over_count = 0;
                self.usage = Usage::Over;
            }
        } else {
            self.over_ms = None;
            self.over_count = 0;
            self.usage = if modified < -self.threshold {
                Usage::Under
            } else {
                Usage::Normal
            };
        }
        self.prev_trend = trend;
        self.adapt_threshold(modified, now_us);
    }

    fn adapt_threshold(&mut self, modified: f64, now_us: i64) {
        let last = *self.last_threshold_us.get_or_insert(now_us);
        self.last_threshold_us = Some(now_us);
        // A spike far above the threshold (a route change, a burst) does not move it.
        if modified.abs() > self.threshold + 15.0 {
            return;
        }
        let k = if modified.abs() < self.threshold {
            K_DOWN
        } else {
            K_UP
        };
        let dt_ms = ((now_us - last) as f64 / 1000.0).clamp(0.0, 100.0);
        self.threshold =
            (self.threshold + k * (modified.abs() - self.threshold) * dt_ms).clamp(6.0, 600.0);
    }
}

/// The least-squares slope of `(x, y)` points.
fn slope(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in points {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    (den > 0.0).then(|| num / den)
}

/// A burst of packets sent together: its first and last send time, last arrival.
#[derive(Clone, Copy, Debug)]
struct Group {
    first_send_us: i64,
    last_send_us: i64,
    last_recv_us: i64,
}

/// A probe cluster's packets as feedback reported them.
#[derive(Default, Debug)]
struct ClusterStats {
    id: u16,
    sent: Vec<(i64, u32)>,
    recv: Vec<(i64, u32)>,
}

impl ClusterStats {
    /// Empty, its lists' room kept.
    fn clear(&mut self) {
        self.id = 0;
        self.sent.clear();
        self.recv.clear();
    }

    /// The rate the cluster was sent at and (from its later half, past any bucket a shaper
    /// starts with) the rate it arrived at, bits/s.
    fn rates(&mut self) -> Option<(f64, f64)> {
        let rate = |p: &[(i64, u32)]| {
            let (first, last) = (p.first()?.0, p.last()?.0);
            let bytes: u64 = p[1..].iter().map(|(_, s)| u64::from(*s)).sum();
            (last > first).then(|| bytes as f64 * 8e6 / (last - first) as f64)
        };
        if self.recv.len() < 8 {
            return None;
        }
        self.recv.sort_by_key(|(t, _)| *t);
        let send = rate(&self.sent)?;
        let recv = rate(&self.recv[self.recv.len() / 2..])?;
        Some((send, recv))
    }
}

/// The estimate: delay-based AIMD, loss-based cuts, probe results.
#[derive(Debug)]
pub struct Estimator {
    bps: f64,
    trend: Trendline,
    current: Option<Group>,
    previous: Option<Group>,
    /// Received (arrival µs, bytes) within [`ACKED_WINDOW_US`].
    acked: VecDeque<(i64, u32)>,
    acked_bytes: u64,
    first_arrival_us: Option<i64>,
    last_update_us: Option<i64>,
    last_decrease_us: Option<i64>,
    /// The delivered rate at the last decrease: near it, growth is additive.
    capacity: Option<f64>,
    lost: u32,
    reported: u32,
    last_loss_cut_us: Option<i64>,
    /// The last loss figure was between [`LOSS_LOW`] and [`LOSS_HIGH`]: hold.
    loss_hold: bool,
    /// The last cut (loss or overuse): when, and the estimate it left. For [`CUT_MEMORY`] the
    /// estimate does not grow past [`CUT_CEILING`] times that: a link that just proved full is
    /// not taken at its word by a probe a shaper's bucket let through.
    cut: Option<(i64, f64)>,
    cluster: ClusterStats,
    /// What the last batch of feedback said of the delay gradient.
    pub usage: Usage,
}

impl Default for Estimator {
    fn default() -> Self {
        Estimator::new(START_BPS)
    }
}

impl Estimator {
    pub fn new(start_bps: f64) -> Estimator {
        Estimator {
            bps: start_bps,
            trend: Trendline::default(),
            current: None,
            previous: None,
            acked: VecDeque::new(),
            acked_bytes: 0,
            first_arrival_us: None,
            last_update_us: None,
            last_decrease_us: None,
            capacity: None,
            lost: 0,
            reported: 0,
            last_loss_cut_us: None,
            loss_hold: false,
            cut: None,
            cluster: ClusterStats::default(),
            usage: Usage::Normal,
        }
    }

    /// The estimate, bits/s.
    pub fn bps(&self) -> u64 {
        self.bps as u64
    }

    /// The rate feedback says was delivered lately, bits/s (`None` before half a second of it).
    pub fn acked_bps(&self) -> Option<f64> {
        let (first, last) = (self.first_arrival_us?, self.acked.back()?.0);
        (last - first >= ACKED_WINDOW_US)
            .then(|| self.acked_bytes as f64 * 8e6 / ACKED_WINDOW_US as f64)
    }

    /// One feedback message's packets, in sequence order, at `now_us` (the relay's clock).
    /// The loss of this batch (`None`: too few packets to say).
    pub fn on_feedback(&mut self, results: &[PacketResult], now_us: i64) -> Option<f64> {
        let mut over = false;
        for r in results {
            self.reported += 1;
            if r.cluster != 0 && r.cluster == self.cluster.id {
                self.cluster.sent.push((r.send_us, r.size));
            }
            let Some(recv) = r.recv_us else {
                self.lost += 1;
                continue;
            };
            if r.cluster != 0 && r.cluster == self.cluster.id {
                self.cluster.recv.push((recv, r.size));
            }
            self.add_acked(recv, r.size);
            self.add_to_group(r.send_us, recv);
            over |= self.trend.usage == Usage::Over;
        }
        self.usage = if over { Usage::Over } else { self.trend.usage };
        let loss = self.loss(now_us);
        self.update_rate(now_us);
        loss
    }

    fn add_acked(&mut self, recv_us: i64, size: u32) {
        self.first_arrival_us.get_or_insert(recv_us);
        self.acked.push_back((recv_us, size));
        self.acked_bytes += u64::from(size);
        let newest = self.acked.back().map_or(recv_us, |a| a.0.max(recv_us));
        while let Some(&(t, s)) = self.acked.front() {
            if newest - t <= ACKED_WINDOW_US {
                break;
            }
            self.acked.pop_front();
            self.acked_bytes -= u64::from(s);
        }
    }

    fn add_to_group(&mut self, send_us: i64, recv_us: i64) {
        match self.current.as_mut() {
            Some(g) if send_us - g.first_send_us <= GROUP_SPAN_US => {
                g.last_send_us = g.last_send_us.max(send_us);
                g.last_recv_us = g.last_recv_us.max(recv_us);
                return;
            }
            Some(g) if send_us < g.first_send_us => return, // reordered: older than the group
            _ => {}
        }
        let done = self.current.replace(Group {
            first_send_us: send_us,
            last_send_us: send_us,
            last_recv_us: recv_us,
        });
        if let (Some(prev), Some(done)) = (self.previous, done) {
            let send_delta = (done.last_send_us - prev.last_send_us) as f64 / 1000.0;
            let recv_delta = (done.last_recv_us - prev.last_recv_us) as f64 / 1000.0;
            self.trend.update(recv_delta, send_delta, done.last_recv_us);
        }
        if done.is_some() {
            self.previous = done;
        }
    }

    /// The loss figure once [`LOSS_PACKETS`] were reported; a cut when it is high.
    fn loss(&mut self, now_us: i64) -> Option<f64> {
        if self.reported < LOSS_PACKETS {
            return None;
        }
        let loss = f64::from(self.lost) / f64::from(self.reported);
        (self.lost, self.reported) = (0, 0);
        self.loss_hold = loss >= LOSS_LOW;
        let since_cut = self.last_loss_cut_us.map_or(i64::MAX, |t| now_us - t);
        if loss > LOSS_HIGH && since_cut >= 300_000 {
            self.bps = (self.bps * (1.0 - 0.5 * loss)).max(MIN_BPS);
            self.last_loss_cut_us = Some(now_us);
            self.last_decrease_us = Some(now_us);
            self.capacity = self.acked_bps();
            self.cut = Some((now_us, self.bps));
        }
        Some(loss)
    }

    /// AIMD on the delay signal, capped by what was delivered.
    fn update_rate(&mut self, now_us: i64) {
        let dt = self
            .last_update_us
            .map_or(0.0, |t| ((now_us - t) as f64 / 1e6).clamp(0.0, 1.0));
        self.last_update_us = Some(now_us);
        let acked = self.acked_bps();
        match self.usage {
            Usage::Over => {
                // At most one decrease per 200 ms: one queue is one event.
                if self.last_decrease_us.is_none_or(|t| now_us - t >= 200_000) {
                    let base = acked.unwrap_or(self.bps);
                    self.bps = (BETA * base).min(self.bps).max(MIN_BPS);
                    self.last_decrease_us = Some(now_us);
                    self.capacity = Some(base);
                    self.cut = Some((now_us, self.bps));
                }
            }
            Usage::Under => {}
            Usage::Normal if self.loss_hold => {}
            Usage::Normal => {
                if let (Some(c), Some(a)) = (self.capacity, acked)
                    && a > c * 1.5
                {
                    self.capacity = None;
                }
                let near = self.capacity.is_some_and(|c| self.bps > c * 0.9);
                let grown = if near {
                    // About a packet per response time (a round trip plus 100 ms).
                    self.bps + 1200.0 * 8.0 / 0.15 * dt
                } else {
                    self.bps * 1.08f64.powf(dt)
                };
                // Not above what the path was seen to carry, by much.
                let cap = acked
                    .map_or(f64::MAX, |a| 1.5 * a + 10_000.0)
                    .min(self.ceiling(now_us));
                if grown > self.bps {
                    self.bps = grown.min(cap.max(self.bps));
                }
            }
        }
        self.bps = self.bps.clamp(MIN_BPS, MAX_BPS);
    }

    /// Packets of cluster `id` are being sent: feedback on them is collected.
    pub fn start_cluster(&mut self, id: u16) {
        self.cluster.clear();
        self.cluster.id = id;
    }

    /// The cluster's packets were all reported: what the path carried of it (bits/s), which
    /// the estimate takes when it is higher and the path was not overused. `None`: too few
    /// packets arrived to say.
    pub fn finish_cluster(&mut self) -> Option<f64> {
        let rates = self.cluster.rates();
        self.cluster.clear();
        let (send, recv) = rates?;
        // Arrived slower than sent: the path is full; what arrived is about its capacity.
        Some(if recv < 0.9 * send {
            0.95 * recv
        } else {
            send.min(recv)
        })
    }

    /// A probe found the path carries `carried` bits/s: the estimate takes it (up to the
    /// ceiling a recent cut left), unless the path is queueing.
    pub fn raise(&mut self, carried: f64, now_us: i64) {
        let carried = carried.min(self.ceiling(now_us));
        if self.usage != Usage::Over && carried > self.bps {
            self.bps = carried.clamp(MIN_BPS, MAX_BPS);
        }
    }

    /// How far the estimate may grow now (see `cut`).
    fn ceiling(&self, now_us: i64) -> f64 {
        match self.cut {
            Some((at, bps)) if now_us - at < CUT_MEMORY.as_micros() as i64 => bps * CUT_CEILING,
            _ => f64::MAX,
        }
    }
}

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
                Some(found)
            }
            _ => None,
        }
    }

    /// Checked once a second: true once, when no feedback came for [`FEEDBACK_WAIT`] (a client
    /// without transport-cc): its routes stop waiting for an estimate.
    pub fn silent(&mut self, now: Instant) -> bool {
        if self.active || self.gave_up {
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

    /// The estimate (bits/s), once the subscriber's feedback drives it.
    pub fn estimate(&self) -> Option<u64> {
        self.active.then(|| self.estimator.bps())
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

#[cfg(test)]
mod tests {
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
        let (mut arrivals, mut fb_from, mut fb_count) =
            (Vec::<(u16, Option<i64>)>::new(), 0u16, 0u8);
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
}
