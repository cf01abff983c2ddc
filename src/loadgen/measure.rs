//! The measurement: what the clients count (sent, received, loss per stream, latency histogram)
//! and what is read from the server (its `/metrics`, its process in /proc) before and after the
//! measured window.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Latency buckets per power of two (a bucket's width is 1/8 of its octave: ~12 %).
pub(super) const LATENCY_STEPS: usize = 8;

/// The latency bucket of `us` microseconds.
pub(super) fn latency_bucket(us: u64) -> usize {
    let us = us.max(1);
    let octave = 63 - us.leading_zeros() as usize;
    // The 3 bits after the leading one.
    let step = if octave >= 3 {
        (us >> (octave - 3)) & 7
    } else {
        (us << (3 - octave)) & 7
    } as usize;
    (octave * LATENCY_STEPS + step).min(32 * LATENCY_STEPS - 1)
}

/// The upper bound of latency bucket `i`, µs.
pub(super) fn latency_bucket_bound(i: usize) -> u64 {
    let (octave, step) = (i / LATENCY_STEPS, (i % LATENCY_STEPS) as u64);
    ((9 + step) << octave) >> 3
}

/// Counters every client bumps.
pub struct Shared {
    pub(super) epoch: Instant,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub corrupt: AtomicU64,
    pub malformed: AtomicU64,
    /// Packets light subscribers opened themselves.
    pub opened_light: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// Clients that received media.
    pub receiving: AtomicU64,
    pub measuring: AtomicBool,
    pub verify_every: u64,
    /// The clients' sockets receive with UDP GRO.
    pub gro: bool,
    /// Receive-only clients open SRTP themselves (`--light-subscribers`).
    pub light: bool,
    /// The clients reach the relay over ICE-TCP (`--tcp`).
    pub tcp: bool,
    /// Subscribers' emulated downlinks, bits/s (0: not limited), given out in turn
    /// (`--downlinks`).
    pub downlinks: Vec<u64>,
    pub next_downlink: AtomicU64,
    /// Datagrams the emulated downlinks dropped.
    pub shaped: AtomicU64,
    /// Simulcast layers the publishers have paused now, as the relay told them (dynacast).
    pub layers_paused: AtomicU64,
    /// What the clients offer (`--srtp-profiles`).
    pub srtp_profiles: Option<Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>>,
    /// Latency histogram, µs: each power of two split into `LATENCY_STEPS` buckets.
    pub(super) latency: [AtomicU64; 32 * LATENCY_STEPS],
    pub(super) latency_max: AtomicU64,
}

impl Shared {
    pub(super) fn new(verify_every: u64) -> Shared {
        Shared {
            epoch: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            opened_light: AtomicU64::new(0),
            keyframe_requests: AtomicU64::new(0),
            receiving: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            verify_every: verify_every.max(1),
            gro: true,
            light: false,
            tcp: false,
            downlinks: Vec::new(),
            next_downlink: AtomicU64::new(0),
            shaped: AtomicU64::new(0),
            layers_paused: AtomicU64::new(0),
            srtp_profiles: None,
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_max: AtomicU64::new(0),
        }
    }

    pub fn since_epoch(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch)
    }

    pub fn record_latency(&self, us: u64) {
        self.latency[latency_bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.latency_max.fetch_max(us, Ordering::Relaxed);
    }

    /// The `q` quantile of the latency histogram, µs (upper bound of its bucket).
    pub(super) fn latency_quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(latency_bucket_bound(i));
            }
        }
        None
    }
}

/// Loss accounting for one received stream: unique counters seen within a sliding window.
#[derive(Default)]
pub struct StreamLoss {
    pub(super) first: Option<u32>,
    pub(super) highest: u32,
    /// Bit i: counter `highest - i` was seen.
    pub(super) window: u128,
    pub unique: u64,
}

impl StreamLoss {
    pub fn saw(&mut self, c: u32) {
        let Some(_) = self.first else {
            self.first = Some(c);
            self.highest = c;
            self.window = 1;
            self.unique = 1;
            return;
        };
        if c > self.highest {
            let shift = c - self.highest;
            self.window = if shift >= 128 {
                0
            } else {
                self.window << shift
            };
            self.window |= 1;
            self.highest = c;
            self.unique += 1;
        } else {
            let back = self.highest - c;
            if back < 128 && self.window & (1 << back) == 0 {
                self.window |= 1 << back;
                self.unique += 1;
            }
        }
    }

    pub fn expected(&self) -> u64 {
        self.first.map_or(0, |f| u64::from(self.highest - f) + 1)
    }
}

/// Ferry's own figures, from its `/metrics`.
pub(super) struct MetricsSample {
    pub(super) cpu: f64,
    pub(super) rss: f64,
    pub(super) out_packets: f64,
    pub(super) latency_buckets: Vec<(f64, f64)>,
    /// Simulcast payload bytes sent, by layer (low, medium, high).
    pub(super) layer_bytes: [f64; 3],
}

/// The server at one moment: its metrics (Ferry) and its process as /proc sees it (`--server-pid`).
pub(super) struct ServerSample {
    pub(super) metrics: Option<MetricsSample>,
    /// CPU seconds, RSS bytes.
    pub(super) process: Option<(f64, u64)>,
    /// This load generator's CPU seconds, and the whole machine's busy CPU seconds: what else ran.
    pub(super) own_cpu: Option<f64>,
    pub(super) machine_busy: Option<f64>,
}

/// Where the server's figures come from.
pub(super) struct Probe {
    pub(super) metrics_url: Option<String>,
    pub(super) pid: Option<u32>,
}

impl Probe {
    pub(super) async fn sample(&self) -> Result<ServerSample, String> {
        let metrics = match &self.metrics_url {
            Some(url) => Some(parse_metrics(&http_get(url).await?)),
            None => None,
        };
        let process = match self.pid {
            Some(pid) => Some(
                crate::metrics::process_usage(pid)
                    .ok_or_else(|| format!("--server-pid {pid}: cannot read /proc/{pid}"))?,
            ),
            None => None,
        };
        Ok(ServerSample {
            metrics,
            process,
            own_cpu: crate::metrics::process_usage(std::process::id()).map(|u| u.0),
            machine_busy: crate::metrics::machine_busy_seconds(),
        })
    }
}

pub(super) async fn http_get(url: &str) -> Result<String, String> {
    // A minimal HTTP/1.0 GET on loopback: the metrics text, no client library needed.
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = body.split_once("\r\n\r\n").unwrap_or(("", ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "{url}: {}",
            head.lines().next().unwrap_or("no answer")
        ));
    }
    Ok(body.to_string())
}

pub(super) fn parse_metrics(text: &str) -> MetricsSample {
    let mut s = MetricsSample {
        cpu: 0.0,
        rss: 0.0,
        out_packets: 0.0,
        latency_buckets: Vec::new(),
        layer_bytes: [0.0; 3],
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if name == "process_cpu_seconds_total" {
            s.cpu = v;
        } else if name == "process_resident_memory_bytes" {
            s.rss = v;
        } else if name.starts_with("ferry_media_packets_total{") && name.contains("\"out\"") {
            s.out_packets += v;
        } else if let Some(layer) = name.strip_prefix("ferry_simulcast_layer_bytes_total{layer=\"")
        {
            if let Some(i) = ["low", "medium", "high"]
                .iter()
                .position(|l| layer.starts_with(&format!("{l}\"")))
            {
                s.layer_bytes[i] = v;
            }
        } else if let Some(le) = name
            .strip_prefix("ferry_forward_latency_seconds_bucket{le=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            s.latency_buckets.push((le, v));
        }
    }
    s
}

/// A Prometheus histogram's cumulative buckets: (upper bound `le`, count up to it).
pub(super) type Buckets = [(f64, f64)];

/// A cumulative histogram's counts over the window: (upper bound, count up to it).
fn histogram_delta(before: &Buckets, after: &Buckets) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, v)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, v)| *v);
            (*le, v - b)
        })
        .collect()
}

/// The percentage of a cumulative histogram delta's observations at or below `le` (one of its
/// bucket bounds), or None when it has none.
pub(super) fn histogram_share_within(before: &Buckets, after: &Buckets, le: f64) -> Option<f64> {
    let deltas = histogram_delta(before, after);
    let total = deltas.last()?.1;
    let within = deltas.iter().find(|(l, _)| *l == le)?.1;
    (total > 0.0).then(|| 100.0 * within / total)
}

/// The `q` quantile of a cumulative histogram delta (upper bound of its bucket), seconds.
pub(super) fn histogram_quantile(before: &Buckets, after: &Buckets, q: f64) -> Option<f64> {
    let deltas = histogram_delta(before, after);
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    deltas
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_an_eighth_of_an_octave_wide() {
        for us in (8..100_000u64).chain([1 << 20, 123_456_789]) {
            let i = latency_bucket(us);
            let (low, high) = (latency_bucket_bound(i - 1), latency_bucket_bound(i));
            assert!(low <= us && us < high, "{us} in [{low}, {high})");
            assert!((high - low) * 8 <= high, "{us}: [{low}, {high}) too wide");
        }
        assert_eq!(latency_bucket(0), latency_bucket(1));
        assert_eq!(latency_bucket(u64::MAX), 32 * LATENCY_STEPS - 1);
    }

    /// The server's histogram over the window: quantiles are bucket upper bounds, the share
    /// within a bound counts only the window's observations.
    #[test]
    fn server_histogram_deltas_give_quantiles_and_the_share_within_1ms() {
        let before = [
            (0.0005, 10.0),
            (0.001, 20.0),
            (0.002, 30.0),
            (f64::INFINITY, 30.0),
        ];
        // 100 more: 50 up to 0.5 ms, 30 in (0.5, 1] ms, 19 in (1, 2] ms, 1 above.
        let after = [
            (0.0005, 60.0),
            (0.001, 100.0),
            (0.002, 129.0),
            (f64::INFINITY, 130.0),
        ];
        assert_eq!(histogram_quantile(&before, &after, 0.5), Some(0.0005));
        assert_eq!(histogram_quantile(&before, &after, 0.8), Some(0.001));
        assert_eq!(histogram_quantile(&before, &after, 0.99), Some(0.002));
        assert_eq!(
            histogram_quantile(&before, &after, 1.0),
            Some(f64::INFINITY)
        );
        assert_eq!(histogram_share_within(&before, &after, 0.001), Some(80.0));
        assert_eq!(histogram_share_within(&before, &after, 0.003), None);
        assert_eq!(histogram_share_within(&before, &before, 0.001), None);
    }

    #[test]
    fn latency_quantiles_come_from_the_buckets() {
        let s = Shared::new(1);
        for us in 1..=1000 {
            s.record_latency(us);
        }
        let p50 = s.latency_quantile(0.5).unwrap();
        let p99 = s.latency_quantile(0.99).unwrap();
        assert!((500..=576).contains(&p50), "{p50}");
        assert!((990..=1088).contains(&p99), "{p99}");
    }
}
