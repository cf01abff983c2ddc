//! The command line (`ferry loadgen`'s flags: target, shape, load) and the report for people.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde_json::{Value, json};

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
