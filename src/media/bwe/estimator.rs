//! The estimator: packet groups, the trendline over their delay variation, the overuse
//! detector with its adaptive threshold, the AIMD rate controller and the loss cuts.

use std::collections::VecDeque;
use std::time::Duration;

/// Where an estimate starts before any feedback (libwebrtc's default start rate).
pub const START_BPS: f64 = 300_000.0;
pub(super) const MIN_BPS: f64 = 30_000.0;
pub(super) const MAX_BPS: f64 = 50_000_000.0;

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
pub(super) const LOSS_HIGH: f64 = 0.10;
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
pub(super) struct ClusterStats {
    id: u16,
    sent: Vec<(i64, u32)>,
    recv: Vec<(i64, u32)>,
}

impl ClusterStats {
    /// Empty, its lists' room kept.
    pub(super) fn clear(&mut self) {
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
    pub(super) bps: f64,
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
    pub(super) cluster: ClusterStats,
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
