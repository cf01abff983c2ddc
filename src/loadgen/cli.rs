//! The command line: `ferry loadgen`'s flags (target, shape, load) and their checks.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;

use super::peer::STAMP;

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
    /// Publishers send video as three simulcast layers (rids q, h, f, as the SDK sends a camera:
    /// quarter, half and full resolution) at 1/16, 1/4 and all of `--video-kbps`; each
    /// subscriber's route takes one of them (what its downlink estimate fits).
    #[arg(long)]
    pub simulcast: bool,
    /// Subscribers' downlinks, kbit/s, given out in turn (0: not limited), e.g. `300,1000,0`:
    /// each such subscriber drops what arrives beyond its rate (a token bucket holding 50 ms of
    /// it, at least 3 kB), as a thin link's queue does; its transport-cc feedback tells the relay.
    /// Not with `--light-subscribers` (they send no feedback).
    #[arg(long, value_delimiter = ',')]
    pub downlinks: Vec<u64>,
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
    /// The clients reach the relay over TCP (ICE-TCP: an active TCP candidate, RFC 4571 framing)
    /// instead of UDP, as clients on networks without UDP do.
    #[arg(long)]
    pub tcp: bool,
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
    /// Churn instead of a steady load: members join and leave, vanish without a close, abandon
    /// relay connections mid-handshake, connect to the relay and leave, for `--duration` or
    /// `--churn-cycles`; the server's RSS, descriptors, tasks and table sizes are sampled (leak
    /// hunting; `benches/soak.sh`).
    #[arg(long)]
    pub churn: bool,
    /// Stop the churn after this many cycles (0: only `--duration` ends it).
    #[arg(long, default_value_t = 0)]
    pub churn_cycles: u64,
    /// Cycles run at once.
    #[arg(long, default_value_t = 8)]
    pub churn_workers: u32,
    /// Cycles started per second at most (0: as fast as the workers go).
    #[arg(long, default_value_t = 0.0)]
    pub churn_rate: f64,
    /// A relay cycle (an abandoned handshake, or a full connection receiving media, in turn)
    /// every this many cycles (0: none).
    #[arg(long, default_value_t = 10)]
    pub churn_media_every: u64,
    /// How often the server is sampled during the churn.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub churn_sample: Duration,
    /// After the churn, how long to wait for the server's tables to drain.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub churn_settle: Duration,
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

impl LoadgenArgs {
    /// The flags checked; the SRTP profiles the clients offer, when given.
    pub(super) fn check(&self) -> Result<Option<Vec<SrtpProtectionProfile>>, String> {
        if !self.downlinks.is_empty() && self.light_subscribers {
            return Err(
                "--downlinks needs subscribers that send feedback: not with --light-subscribers"
                    .into(),
            );
        }
        if self.packet_bytes < STAMP || self.packet_bytes > 1400 {
            return Err("--packet-bytes must be between 16 and 1400".into());
        }
        let srtp_profiles = match &self.srtp_profiles {
            Some(names) => Some(
                crate::config::parse_srtp_profiles(names)
                    .map_err(|e| format!("--srtp-profiles: {e}"))?,
            ),
            None => None,
        };
        if !(self.pacing == 0.0 || (1.0..=100.0).contains(&self.pacing)) {
            return Err("--pacing must be 0 (a frame at once) or between 1 and 100".into());
        }
        if self.fps == 0 || self.fps > 120 {
            return Err("--fps must be between 1 and 120".into());
        }
        Ok(srtp_profiles)
    }

    /// The server's address, the target's default when not given.
    pub(super) fn server_url(&self) -> String {
        self.url.clone().unwrap_or_else(|| {
            match self.target {
                Target::Ferry => "http://127.0.0.1:8080",
                Target::Janus => "ws://127.0.0.1:8188",
            }
            .to_string()
        })
    }
}
