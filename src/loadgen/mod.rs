//! `ferry loadgen`: publishers and subscribers against a running Ferry (or, for comparisons, a
//! Janus VideoRoom), through the real signaling and real ICE/DTLS/SRTP (webrtc-rs `rtc` peers, one
//! UDP socket each, on this machine).
//!
//! Every payload starts with its send time and a per-stream counter, so subscribers measure loss
//! and latency (publishers and subscribers share this process's clock). At the end it reads the
//! server's own `/metrics` (deltas over the measured window) for CPU per forwarded packet, memory
//! per subscriber and the forwarding latency inside the server; with `--server-pid`, the server
//! process's CPU time and RSS from `/proc` (any server), per packet received by subscribers.

mod ferry;
mod janus;
mod peer;
pub use peer::{opus, vp8};
mod ws;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, ValueEnum};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use peer::{Peer, Source};
use ws::Signal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// Each room: `publishers` publish, `subscribers` receive every publisher.
    Broadcast,
    /// Each room: `publishers` members each publish and receive every other member (N x N);
    /// `subscribers` extra members only receive.
    Meeting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Ferry, through its signaling at `<url>/ws`.
    Ferry,
    /// A Janus VideoRoom, through Janus's WebSocket transport at `<url>`.
    Janus,
}

#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// The server to load.
    #[arg(long, value_enum, default_value = "ferry")]
    pub target: Target,
    /// The server's address: Ferry's HTTP address (signaling at /ws, metrics at /metrics;
    /// default http://127.0.0.1:8080), or Janus's WebSocket transport (default ws://127.0.0.1:8188).
    #[arg(long)]
    pub url: Option<String>,
    /// Where Ferry's Prometheus metrics are, when not `<url>/metrics`.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Also measure this process (the server's PID) from /proc: CPU time and RSS, for any target.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The local address the clients' UDP sockets bind to (their ICE candidate).
    #[arg(long, default_value = "127.0.0.1")]
    pub local_ip: IpAddr,
    #[arg(long, value_enum, default_value = "broadcast")]
    pub shape: Shape,
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Publishing members per room.
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Receiving-only members per room.
    #[arg(long, default_value_t = 10)]
    pub subscribers: u32,
    /// Measured time, after everyone joined and a 2 s warm-up.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Video bitrate per publisher, kbit/s.
    #[arg(long, default_value_t = 2500)]
    pub video_kbps: u64,
    /// Video RTP payload size, bytes.
    #[arg(long, default_value_t = 1200)]
    pub packet_bytes: usize,
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    /// Send each video frame's packets paced at this multiple of the video bitrate, as a
    /// browser's pacer does (libwebrtc: 2.5), instead of all at once (0, the default: the worst
    /// case for the relay's queueing).
    #[arg(long, default_value_t = 0.0)]
    pub pacing: f64,
    /// Publish video only (no 50 packets/s Opus-like audio).
    #[arg(long)]
    pub no_audio: bool,
    /// Check the whole payload of one received packet in this many (the rest are only counted).
    #[arg(long, default_value_t = 16)]
    pub verify_every: u64,
    /// Receive every datagram on its own: the clients' sockets without UDP GRO. On loopback the
    /// sending server's CPU time includes the kernel's delivery to the receiving socket; with GRO
    /// (the default) a GSO send is delivered whole, without it one datagram at a time.
    #[arg(long)]
    pub no_gro: bool,
    /// Subscribers open the relayed SRTP themselves (with the keys of their DTLS handshake) and
    /// only count, instead of passing every packet through webrtc-rs's receive pipeline: about
    /// 10x less load-generator CPU per packet, for runs that would otherwise saturate the
    /// machine. They then send the server no receiver reports, NACKs or transport-cc feedback.
    #[arg(long)]
    pub light_subscribers: bool,
    /// The DTLS-SRTP profiles the clients offer, in their order of preference (the server takes
    /// the first it accepts), e.g. `aes128-cm-sha1-80,aes128-gcm` as Chrome offers them; default
    /// webrtc-rs's (AES-128-GCM first).
    #[arg(long, value_delimiter = ',')]
    pub srtp_profiles: Option<Vec<String>>,
    /// Clients joining per second.
    #[arg(long, default_value_t = 100)]
    pub join_rate: u32,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// Mint tokens with this API key and secret when the server requires them.
    #[arg(long, env = "FERRY_API_KEY")]
    pub api_key: Option<String>,
    #[arg(long, env = "FERRY_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
}

impl Default for LoadgenArgs {
    /// The command line's defaults.
    fn default() -> Self {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadgenArgs,
        }
        Cli::parse_from(["loadgen"]).args
    }
}

/// Latency buckets per power of two (a bucket's width is 1/8 of its octave: ~12 %).
const LATENCY_STEPS: usize = 8;

/// The latency bucket of `us` microseconds.
fn latency_bucket(us: u64) -> usize {
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
fn latency_bucket_bound(i: usize) -> u64 {
    let (octave, step) = (i / LATENCY_STEPS, (i % LATENCY_STEPS) as u64);
    ((9 + step) << octave) >> 3
}

/// Counters every client bumps.
pub struct Shared {
    epoch: Instant,
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
    /// What the clients offer (`--srtp-profiles`).
    pub srtp_profiles: Option<Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>>,
    /// Latency histogram, µs: each power of two split into `LATENCY_STEPS` buckets.
    latency: [AtomicU64; 32 * LATENCY_STEPS],
    latency_max: AtomicU64,
}

impl Shared {
    fn new(verify_every: u64) -> Shared {
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
    fn latency_quantile(&self, q: f64) -> Option<u64> {
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
    first: Option<u32>,
    highest: u32,
    /// Bit i: counter `highest - i` was seen.
    window: u128,
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
struct MetricsSample {
    cpu: f64,
    rss: f64,
    out_packets: f64,
    latency_buckets: Vec<(f64, f64)>,
}

/// The server at one moment: its metrics (Ferry) and its process as /proc sees it (`--server-pid`).
struct ServerSample {
    metrics: Option<MetricsSample>,
    /// CPU seconds, RSS bytes.
    process: Option<(f64, u64)>,
    /// This load generator's CPU seconds, and the whole machine's busy CPU seconds: what else ran.
    own_cpu: Option<f64>,
    machine_busy: Option<f64>,
}

/// Where the server's figures come from.
struct Probe {
    metrics_url: Option<String>,
    pid: Option<u32>,
}

impl Probe {
    async fn sample(&self) -> Result<ServerSample, String> {
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

async fn http_get(url: &str) -> Result<String, String> {
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

fn parse_metrics(text: &str) -> MetricsSample {
    let mut s = MetricsSample {
        cpu: 0.0,
        rss: 0.0,
        out_packets: 0.0,
        latency_buckets: Vec::new(),
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

/// A cumulative histogram's counts over the window: (upper bound, count up to it).
fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
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
fn histogram_share_within(before: &[(f64, f64)], after: &[(f64, f64)], le: f64) -> Option<f64> {
    let deltas = histogram_delta(before, after);
    let total = deltas.last()?.1;
    let within = deltas.iter().find(|(l, _)| *l == le)?.1;
    (total > 0.0).then(|| 100.0 * within / total)
}

/// The `q` quantile of a cumulative histogram delta (upper bound of its bucket), seconds.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
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

pub struct ClientResult {
    join_ms: Option<f64>,
    loss: Vec<StreamLoss>,
    error: Option<String>,
}

/// What every client task shares.
#[derive(Clone)]
pub struct Ctx {
    shared: Arc<Shared>,
    /// When clients stop (set once the measured window is known).
    stop_at: Arc<Mutex<Option<tokio::time::Instant>>>,
    source: Source,
    local_ip: IpAddr,
    /// Between two joins.
    pace: Duration,
}

impl Ctx {
    /// Start a client on `sig`: publishing as stream `publishing` when given; `receives`: it
    /// must get media (an error otherwise).
    fn spawn<S: Signal>(
        &self,
        sig: S,
        publishing: Option<u32>,
        receives: bool,
    ) -> JoinHandle<ClientResult> {
        tokio::spawn(client(self.clone(), sig, publishing, receives))
    }
}

/// Run the load and print the report. Returns an error when the load could not be set up.
pub async fn run(args: LoadgenArgs) -> Result<Value, String> {
    if args.packet_bytes < peer::STAMP || args.packet_bytes > 1400 {
        return Err("--packet-bytes must be between 16 and 1400".into());
    }
    let srtp_profiles = match &args.srtp_profiles {
        Some(names) => Some(
            crate::config::parse_srtp_profiles(names)
                .map_err(|e| format!("--srtp-profiles: {e}"))?,
        ),
        None => None,
    };
    if !(args.pacing == 0.0 || (1.0..=100.0).contains(&args.pacing)) {
        return Err("--pacing must be 0 (a frame at once) or between 1 and 100".into());
    }
    if args.fps == 0 || args.fps > 120 {
        return Err("--fps must be between 1 and 120".into());
    }
    let url = args.url.clone().unwrap_or_else(|| {
        match args.target {
            Target::Ferry => "http://127.0.0.1:8080",
            Target::Janus => "ws://127.0.0.1:8188",
        }
        .to_string()
    });
    let probe = Probe {
        metrics_url: (args.target == Target::Ferry).then(|| {
            args.metrics_url
                .clone()
                .unwrap_or_else(|| format!("{}/metrics", url.trim_end_matches('/')))
        }),
        pid: args.server_pid,
    };
    // Fail early, with a clear message, when the server is not there; its memory before we join.
    let baseline = probe.sample().await?;
    let mut shared = Shared::new(args.verify_every);
    shared.gro = !args.no_gro;
    shared.light = args.light_subscribers;
    shared.srtp_profiles = srtp_profiles;
    let shared = Arc::new(shared);
    let ctx = Ctx {
        shared: shared.clone(),
        stop_at: Arc::new(Mutex::new(None)),
        source: Source {
            video_bps: args.video_kbps * 1000,
            packet_bytes: args.packet_bytes,
            fps: args.fps,
            audio: !args.no_audio,
            pacing_factor: args.pacing,
        },
        local_ip: args.local_ip,
        pace: Duration::from_secs_f64(1.0 / f64::from(args.join_rate.max(1))),
    };
    // Clients that must receive media: subscribers, and in a meeting publishers that have others
    // to receive from.
    let expected_receivers = u64::from(args.rooms)
        * match args.shape {
            Shape::Meeting if args.publishers > 1 => u64::from(args.subscribers + args.publishers),
            _ => u64::from(args.subscribers),
        }
        * u64::from(args.publishers > 0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut stream_index = 0u32;
    let clients_total = args.rooms * (args.publishers + args.subscribers);
    eprintln!(
        "loadgen: {:?} at {url}: {} room(s) of {} publisher(s) and {} subscriber(s) ({:?}), {} kbit/s video{} per publisher",
        args.target,
        args.rooms,
        args.publishers,
        args.subscribers,
        args.shape,
        args.video_kbps,
        if args.no_audio { "" } else { " + audio" }
    );
    for r in 0..args.rooms {
        tasks.extend(match args.target {
            Target::Ferry => ferry::setup_room(&args, &url, &ctx, r, &mut stream_index).await?,
            Target::Janus => janus::setup_room(&args, &url, &ctx, r, &mut stream_index).await?,
        });
    }
    // Wait until every receiving client sees media (or 30 s), showing progress.
    let joined_deadline = Instant::now() + Duration::from_secs(30);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let received = shared.received.load(Ordering::Relaxed);
        let sent = shared.sent.load(Ordering::Relaxed);
        let receiving = shared.receiving.load(Ordering::Relaxed);
        eprintln!(
            "loadgen: joining: {receiving} of {expected_receivers} receiving, {clients_total} clients, {sent} packets sent, {received} received ({} /s)",
            (received - last) * 2
        );
        last = received;
        if receiving >= expected_receivers && Instant::now() > started + Duration::from_secs(2) {
            break;
        }
        if Instant::now() > joined_deadline {
            eprintln!("loadgen: not every client receives yet after 30 s; measuring anyway");
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = probe.sample().await?;
    let (sent0, recv0) = (
        shared.sent.load(Ordering::Relaxed),
        shared.received.load(Ordering::Relaxed),
    );
    shared.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let end = tokio::time::Instant::now() + args.duration;
    *ctx.stop_at.lock().expect("lock") = Some(end + Duration::from_millis(500));
    let mut last = recv0;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end - tokio::time::Instant::now())).await;
        let r = shared.received.load(Ordering::Relaxed);
        eprintln!(
            "loadgen: {:>4.0} s  {} packets/s received, latency p50 {} µs p99 {} µs",
            t0.elapsed().as_secs_f64(),
            r - last,
            shared.latency_quantile(0.5).unwrap_or(0),
            shared.latency_quantile(0.99).unwrap_or(0),
        );
        last = r;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let after = probe.sample().await?;
    shared.measuring.store(false, Ordering::Relaxed);
    let (sent1, recv1) = (
        shared.sent.load(Ordering::Relaxed),
        shared.received.load(Ordering::Relaxed),
    );
    let mut joins = Vec::new();
    let (mut expected, mut unique) = (0u64, 0u64);
    let mut errors = Vec::new();
    let mut receivers = 0u64;
    for t in tasks {
        match t.await {
            Ok(r) => {
                if let Some(e) = r.error {
                    errors.push(e);
                }
                if let Some(j) = r.join_ms {
                    joins.push(j);
                }
                receivers += u64::from(!r.loss.is_empty());
                for l in r.loss {
                    expected += l.expected();
                    unique += l.unique;
                }
            }
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    joins.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| -> Option<f64> {
        (!v.is_empty()).then(|| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1])
    };
    let subscribers_total = u64::from(args.rooms * args.subscribers)
        + if args.shape == Shape::Meeting {
            u64::from(args.rooms * args.publishers)
        } else {
            0
        };
    let per_subscriber =
        |grown: f64| (subscribers_total > 0).then(|| grown.max(0.0) / subscribers_total as f64);
    let received = (recv1 - recv0) as f64;
    // Receivers of each published packet.
    let fanout = match args.shape {
        Shape::Broadcast => args.subscribers,
        Shape::Meeting => args.subscribers + args.publishers.saturating_sub(1),
    };
    let per_received = |cpu: f64| (received > 0.0).then(|| cpu * 1e6 / received);
    let loss = if expected > 0 {
        100.0 * (1.0 - unique as f64 / expected as f64)
    } else {
        100.0
    };
    // Ferry's own figures (null for Janus).
    let m = [&baseline, &before, &after].map(|s| s.metrics.as_ref());
    let (forwarded, cpu, rss, latency, within_1ms) = match m {
        [Some(m0), Some(b), Some(a)] => (
            Some(a.out_packets - b.out_packets),
            Some(a.cpu - b.cpu),
            Some((m0.rss, a.rss)),
            [0.5, 0.99].map(|q| histogram_quantile(&b.latency_buckets, &a.latency_buckets, q)),
            histogram_share_within(&b.latency_buckets, &a.latency_buckets, 0.001),
        ),
        _ => (None, None, None, [None, None], None),
    };
    // The server process from /proc (any target).
    let process = match [&baseline, &before, &after].map(|s| s.process) {
        [Some(p0), Some(b), Some(a)] => Some(json!({
            "pid": args.server_pid,
            "cpu_seconds": a.0 - b.0,
            "cpu_us_per_received_packet": per_received(a.0 - b.0),
            "rss_bytes": a.1,
            "rss_bytes_before": p0.1,
            "rss_bytes_per_subscriber": per_subscriber(a.1 as f64 - p0.1 as f64),
        })),
        _ => None,
    };
    let server_cpu = process
        .as_ref()
        .and_then(|p| p["cpu_seconds"].as_f64())
        .or(cpu);
    let delta = |f: fn(&ServerSample) -> Option<f64>| Some(f(&after)? - f(&before)?);
    let own_cpu = delta(|s| s.own_cpu);
    let machine_busy = delta(|s| s.machine_busy);
    let report = json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "shape": format!("{:?}", args.shape).to_lowercase(),
        "rooms": args.rooms, "publishers_per_room": args.publishers, "subscribers_per_room": args.subscribers,
        "video_kbps": args.video_kbps, "audio": !args.no_audio, "pacing": args.pacing,
        "light_subscribers": args.light_subscribers, "receive_gro": !args.no_gro,
        "srtp_profiles": args.srtp_profiles,
        "seconds": elapsed,
        "packets_sent_per_s": (sent1 - sent0) as f64 / elapsed,
        "packets_received_per_s": received / elapsed,
        // What the subscribers got of what they should have (every publisher's packets to every
        // receiver in its room) over the window: below 100 when packets are lost, and also when
        // they queue up somewhere (the loss figure only counts gaps).
        "delivered_percent": (sent1 > sent0 && fanout > 0).then(|| 100.0 * received / ((sent1 - sent0) as f64 * fanout as f64)),
        "server_forwarded_per_s": forwarded.map(|f| f / elapsed),
        "loss_percent": loss,
        "receiving_clients": receivers,
        "clients_without_media": expected_receivers.saturating_sub(receivers),
        "latency_us": {
            "p50": shared.latency_quantile(0.5), "p99": shared.latency_quantile(0.99),
            "max": shared.latency_max.load(Ordering::Relaxed),
        },
        "server_forward_latency_s": { "p50": latency[0], "p99": latency[1], "within_1ms_percent": within_1ms },
        "server_cpu_seconds": cpu,
        "server_cpu_us_per_forwarded_packet": cpu.zip(forwarded).and_then(|(c, f)| (f > 0.0).then(|| c * 1e6 / f)),
        "server_cpu_us_per_received_packet": server_cpu.and_then(per_received),
        "server_rss_bytes": rss.map(|r| r.1),
        "server_rss_bytes_before": rss.map(|r| r.0),
        "server_rss_bytes_per_subscriber": rss.and_then(|(r0, r1)| per_subscriber(r1 - r0)),
        "server_process": process,
        // Where the machine's CPU went during the window: server, this load generator, the rest.
        "loadgen_cpu_seconds": own_cpu,
        "machine_busy_cpu_seconds": machine_busy,
        "other_cpu_seconds": machine_busy.zip(own_cpu).zip(server_cpu).map(|((m, o), s)| m - o - s),
        "join_ms": { "p50": pct(&joins, 0.5), "p99": pct(&joins, 0.99), "n": joins.len() },
        "corrupt_payloads": shared.corrupt.load(Ordering::Relaxed),
        // Received datagrams too short for the stamp, or (light subscribers) that did not open.
        "malformed_packets": shared.malformed.load(Ordering::Relaxed),
        "packets_opened_by_light_subscribers": shared.opened_light.load(Ordering::Relaxed),
        "keyframe_requests": shared.keyframe_requests.load(Ordering::Relaxed),
        "errors": errors,
    });
    Ok(report)
}

/// Print a report for people.
pub fn print_human(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    let mb = |v: &Value, unit: f64| f(&v.as_f64().map_or(Value::Null, |x| json!(x / unit)));
    println!(
        "ferry loadgen ({}): {} x ({} -> {}) {} for {:.0} s",
        r["target"].as_str().unwrap_or(""),
        r["rooms"],
        r["publishers_per_room"],
        r["subscribers_per_room"],
        r["shape"].as_str().unwrap_or(""),
        r["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  forwarded by the server: {} packets/s; received by subscribers: {} packets/s",
        f(&r["server_forwarded_per_s"]),
        f(&r["packets_received_per_s"])
    );
    println!(
        "  loss: {}%, delivered {}% (receiving clients: {}, without any media: {})",
        f(&r["loss_percent"]),
        f(&r["delivered_percent"]),
        r["receiving_clients"],
        r["clients_without_media"]
    );
    println!(
        "  latency publisher -> subscriber (µs, bucket upper bounds): p50 {} p99 {} max {}",
        r["latency_us"]["p50"], r["latency_us"]["p99"], r["latency_us"]["max"]
    );
    if r["server_cpu_seconds"].is_number() {
        println!(
            "  inside the server (s, bucket upper bounds): p50 {} p99 {}; {} % within 1 ms",
            r["server_forward_latency_s"]["p50"],
            r["server_forward_latency_s"]["p99"],
            f(&r["server_forward_latency_s"]["within_1ms_percent"])
        );
        println!(
            "  server CPU (its metrics): {} µs per forwarded packet ({} s in all); RSS {} MB, {} kB more per subscriber",
            f(&r["server_cpu_us_per_forwarded_packet"]),
            f(&r["server_cpu_seconds"]),
            mb(&r["server_rss_bytes"], 1e6),
            mb(&r["server_rss_bytes_per_subscriber"], 1e3),
        );
    }
    let p = &r["server_process"];
    if p.is_object() {
        println!(
            "  server process {} (/proc): {} s CPU, {} µs per packet received; RSS {} MB, {} kB more per subscriber",
            p["pid"],
            f(&p["cpu_seconds"]),
            f(&p["cpu_us_per_received_packet"]),
            mb(&p["rss_bytes"], 1e6),
            mb(&p["rss_bytes_per_subscriber"], 1e3),
        );
    }
    println!(
        "  server CPU per packet received by subscribers: {} µs",
        f(&r["server_cpu_us_per_received_packet"])
    );
    println!(
        "  machine CPU in the window: {} s busy, of which this loadgen {} s and other processes {} s",
        f(&r["machine_busy_cpu_seconds"]),
        f(&r["loadgen_cpu_seconds"]),
        f(&r["other_cpu_seconds"]),
    );
    println!(
        "  join -> first media (ms): p50 {} p99 {} (n = {})",
        f(&r["join_ms"]["p50"]),
        f(&r["join_ms"]["p99"]),
        r["join_ms"]["n"]
    );
    if r["corrupt_payloads"].as_u64().unwrap_or(0) > 0 {
        println!("  CORRUPT payloads: {}", r["corrupt_payloads"]);
    }
    for e in r["errors"].as_array().into_iter().flatten() {
        println!("  error: {e}");
    }
}

/// One client: its peer connection, opened through `sig`, sending when it publishes and
/// counting what it receives, until the run's stop time.
async fn client<S: Signal>(
    ctx: Ctx,
    mut sig: S,
    publishing: Option<u32>,
    receives: bool,
) -> ClientResult {
    let joined = Instant::now();
    let mut result = ClientResult {
        join_ms: None,
        loss: Vec::new(),
        error: None,
    };
    let publish = publishing.map(|s| (ctx.source, s));
    let mut p = match Peer::new(ctx.local_ip, publish, ctx.shared.clone()).await {
        Ok(p) => p,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    if let Err(e) = sig.open(&mut p).await {
        result.error = Some(format!("{}: {e}", sig.who()));
        return result;
    }
    let src = publish.map(|(s, _)| s);
    let frame_every = src.map_or(Duration::from_secs(3600), |s| {
        Duration::from_secs_f64(1.0 / f64::from(s.fps))
    });
    let frame_bytes = src.map_or(0, |s| (s.video_bps / 8 / u64::from(s.fps)) as usize);
    let audio_every = Duration::from_millis(20);
    let mut next_frame = tokio::time::Instant::now();
    let mut next_audio = tokio::time::Instant::now();
    loop {
        let stop = *ctx.stop_at.lock().expect("lock");
        let now = tokio::time::Instant::now();
        if stop.is_some_and(|s| now >= s) {
            break;
        }
        if let Some(s) = src
            && p.connected
        {
            if now >= next_frame {
                p.send_frame(
                    true,
                    frame_bytes,
                    s.packet_bytes,
                    s.packet_gap(),
                    Instant::now(),
                );
                next_frame += frame_every;
                if next_frame < now {
                    next_frame = now + frame_every;
                }
            }
            if s.audio && now >= next_audio {
                p.send_frame(false, 100, s.packet_bytes, None, Instant::now());
                next_audio += audio_every;
                if next_audio < now {
                    next_audio = now + audio_every;
                }
            }
        }
        let mut until = now + Duration::from_millis(50);
        if let Some(at) = p.send_due(Instant::now()) {
            until = until.min(tokio::time::Instant::from_std(at));
        }
        if src.is_some() && p.connected {
            until = until.min(next_frame).min(if src.is_some_and(|s| s.audio) {
                next_audio
            } else {
                until
            });
        }
        if let Some(s) = stop {
            until = until.min(s);
        }
        p.pump(&mut sig, until).await;
    }
    if receives && p.first_media_at.is_none() {
        result.error = Some(format!(
            "{}: no media received (connection {})",
            sig.who(),
            if p.connected {
                "connected"
            } else {
                "never connected"
            }
        ));
    }
    result.join_ms = p
        .first_media_at
        .map(|t| t.saturating_duration_since(joined).as_secs_f64() * 1000.0);
    result.loss = std::mem::take(&mut p.loss).into_values().collect();
    result
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
