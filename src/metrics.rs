//! Prometheus metrics. One registry per server instance (so tests can run several servers in one
//! process); labels are low-cardinality only, never a room or a user. The catalogue, with when each
//! metric moves, is docs/metrics.md.
//!
//! Every label value the code can produce is created at start (zero), so that dashboards and alert
//! rules find a series before the first event: a rate over a missing series is "no data", not 0.

use crate::signal::protocol::{ErrorCode, MODE_REASONS};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// `ferry_signal_messages_total{type}`: the request types, then `unknown` (a type Ferry does not
/// know) and `invalid` (not a request at all).
/// A new request type belongs here too (a unit test checks that these parse).
pub const MESSAGE_TYPES: [&str; 15] = [
    "hello",
    "ping",
    "createRoom",
    "joinRoom",
    "leaveRoom",
    "offer",
    "answer",
    "candidate",
    "bye",
    "reportMode",
    "subscribe",
    "unsubscribe",
    "setVideoQuality",
    "unknown",
    "invalid",
];

/// `ferry_signal_errors_total{code}` beyond the protocol's error codes: a connection refused for
/// `max_connections`.
pub const EXTRA_ERROR_CODES: [&str; 0] = [];

/// `ferry_media_dropped_total{reason}`: every reason the media path drops for.
pub const DROP_REASONS: [&str; 14] = [
    "malformed",
    "unexpected_stun",
    "unknown_peer",
    "undecryptable",
    "sender_refused",
    "no_sender",
    "send_buffer_full",
    "connection_failed",
    "not_connected",
    "unauthenticated",
    "rate_limited",
    "too_many_streams",
    "not_publisher",
    "tcp_overflow",
];

/// `ferry_http_refused_total{reason}`'s values.
pub const HTTP_REFUSALS: [&str; 4] = ["per_ip", "pending", "pending_per_ip", "origin"];

/// `ferry_table_entries{table}`'s values: the signaling hub's tables, then the media shards'.
pub const HUB_TABLES: [&str; 6] = [
    "sessions",
    "resume_tokens",
    "rooms",
    "room_creators",
    "relay_track_rooms",
    "pending_addresses",
];
pub const MEDIA_TABLES: [&str; 11] = [
    "connections",
    "connection_users",
    "connection_ufrags",
    "connection_addresses",
    "routed_tracks",
    "routes",
    "subscriptions",
    "qualities",
    "timers",
    "left_members",
    "tcp_clients",
];

/// `ferry_limit_refusals_total{limit}`'s values.
pub const LIMITS: [&str; 2] = ["relay_connections_per_minute", "handshakes_per_ip"];

/// `ferry_session_resumes_total{result}`'s values.
pub const RESUME_RESULTS: [&str; 3] = ["resumed", "expired", "unknown"];

/// `ferry_peer_connections{state}`: the states a relay connection is counted in.
pub const PEER_STATES: [&str; 5] = ["new", "connecting", "connected", "disconnected", "failed"];

pub struct Metrics {
    pub registry: Registry,
    /// `ferry_ready`: 1 while accepting new sessions, 0 once a drain started (as `/readyz`).
    pub ready: IntGauge,
    pub ws_connections: IntGauge,
    pub rooms: IntGauge,
    pub room_members: IntGauge,
    pub signal_messages: IntCounterVec,
    pub signal_errors: IntCounterVec,
    pub stun_bindings: IntCounter,
    pub media_dropped: IntCounterVec,
    /// `ferry_keyframe_requests_total{reason}`: new_subscriber | subscriber (a relayed PLI/FIR).
    pub keyframe_requests_new_subscriber: IntCounter,
    pub keyframe_requests_relayed: IntCounter,
    /// `layer_switch`: a route waits for a keyframe of the simulcast layer it moves to.
    pub keyframe_requests_layer_switch: IntCounter,
    /// `ferry_layer_switches_total{direction}`: routes that moved to another simulcast layer.
    pub layer_switches: IntCounterVec,
    /// `ferry_pairs{mode}`: pairs of room members by how their media travels.
    pub pairs_p2p: IntGauge,
    pub pairs_relay: IntGauge,
    pub fallbacks: IntCounterVec,
    pub relay_connections: IntGauge,
    /// `ferry_media_packets_total{direction,kind}`, labels resolved once: [in, out] x [audio, video].
    pub rtp_in: [IntCounter; 2],
    pub rtp_out: [IntCounter; 2],
    /// `ferry_media_bytes_total{direction,kind}` (RTP payload bytes), resolved the same way.
    pub bytes_in: [IntCounter; 2],
    pub bytes_out: [IntCounter; 2],
    pub peer_connections: IntGaugeVec,
    pub forward_latency: Histogram,
    /// `ferry_nacks_total{direction}`: NACK feedback received from subscribers / sent to publishers.
    pub nacks_received: IntCounter,
    pub nacks_sent: IntCounter,
    /// `ferry_retransmits_total`: RTP packets resent to subscribers from the retransmission buffer.
    pub retransmits: IntCounter,
    /// `ferry_connection_failures_total{stage}`: relay connections that failed, at ICE or at DTLS.
    pub failures_ice: IntCounter,
    pub failures_dtls: IntCounter,
    /// `ferry_srtp_sessions_total{sealer}`: relay connections whose DTLS handshake completed, by
    /// who seals their relayed packets: `relay` (the relay's own path) or `rtc`.
    pub srtp_sealed_by_relay: IntCounter,
    pub srtp_sealed_by_rtc: IntCounter,
    /// `ferry_srtp_profiles_total{profile}`: the same connections by the SRTP protection profile
    /// their client chose (`unknown`: sealed by rtc, the relay did not learn it).
    pub srtp_profiles: IntCounterVec,
    /// `ferry_srtp_opened_total{by}`: RTP packets from publishers opened (authenticated and
    /// decrypted) by the relay's own packet-in path, or by rtc's receive pipeline.
    pub srtp_opened_by_relay: IntCounter,
    pub srtp_opened_by_rtc: IntCounter,
    /// `ferry_media_tcp_connections`: clients connected to the media port over TCP (ICE-TCP).
    pub media_tcp_connections: IntGauge,
    /// `ferry_downlink_estimate_bps`: each subscriber's downlink bandwidth estimate, observed once a second.
    pub downlink_estimate: Histogram,
    /// `ferry_bwe_probes_total{result}`: probes of subscribers' downlinks, by whether they found room.
    pub bwe_probes: IntCounterVec,
    /// `ferry_simulcast_layer_bytes_total{layer}`: payload bytes of simulcast video sent to subscribers, per layer (low, medium, high).
    pub layer_bytes: [IntCounter; 3],
    /// `ferry_simulcast_layers_paused`: publishers' simulcast layers paused because nobody takes them.
    pub layers_paused: IntGauge,
    /// `ferry_media_tcp_refused_total`: TCP connections to the media port refused at the cap.
    pub media_tcp_refused: IntCounter,
    /// `ferry_http_refused_total{reason}`: connections to the HTTP port closed at a limit.
    pub http_refused: IntCounterVec,
    /// `ferry_sessions_reconnecting`: sessions whose connection dropped, held for a resume.
    pub sessions_reconnecting: IntGauge,
    /// `ferry_table_entries{table}`: entries in the server's tables (leaks show here).
    pub tables: IntGaugeVec,
    /// `ferry_tasks`: live tokio tasks.
    pub tasks: IntGauge,
    /// `ferry_limit_refusals_total{limit}`: requests refused at a per-client limit.
    pub limit_refusals: IntCounterVec,
    /// `ferry_session_resumes_total{result}`: resumes and held sessions that expired.
    pub session_resumes: IntCounterVec,
}

/// `ferry_srtp_profiles_total`'s `profile` values.
pub const SRTP_PROFILE_LABELS: [&str; 4] =
    ["aes128-gcm", "aes256-gcm", "aes128-cm-sha1-80", "unknown"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let ws_connections = IntGauge::new(
            "ferry_ws_connections",
            "Open signaling WebSocket connections.",
        )
        .expect("valid metric");
        let rooms = IntGauge::new("ferry_rooms", "Rooms that exist.").expect("valid metric");
        let room_members = IntGauge::new(
            "ferry_room_members",
            "Members in all rooms (a user in a room counts once).",
        )
        .expect("valid metric");
        let signal_messages = IntCounterVec::new(
            Opts::new(
                "ferry_signal_messages_total",
                "Signaling requests received, by message type (\"invalid\" when unparseable).",
            ),
            &["type"],
        )
        .expect("valid metric");
        let signal_errors = IntCounterVec::new(
            Opts::new(
                "ferry_signal_errors_total",
                "Signaling error responses and error closes, by error code.",
            ),
            &["code"],
        )
        .expect("valid metric");
        let stun_bindings = IntCounter::new(
            "ferry_stun_bindings_total",
            "STUN binding requests answered on the media port (server-reflexive address discovery).",
        )
        .expect("valid metric");
        let media_dropped = IntCounterVec::new(
            Opts::new(
                "ferry_media_dropped_total",
                "Datagrams and packets dropped on the media path, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let pairs = IntGaugeVec::new(
            Opts::new(
                "ferry_pairs",
                "Pairs of room members by how their media travels (p2p or relay), as clients report.",
            ),
            &["mode"],
        )
        .expect("valid metric");
        let pairs_p2p = pairs.with_label_values(&["p2p"]);
        let pairs_relay = pairs.with_label_values(&["relay"]);
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "ferry_fallbacks_total",
                "Clients that moved their media to the relay, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let keyframe_requests = IntCounterVec::new(
            Opts::new(
                "ferry_keyframe_requests_total",
                "Keyframe requests (PLI) sent to publishers: reason new_subscriber, subscriber (a subscriber's PLI/FIR relayed upstream, throttled), or layer_switch (a subscriber moves to another simulcast layer).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let keyframe_requests_new_subscriber =
            keyframe_requests.with_label_values(&["new_subscriber"]);
        let keyframe_requests_relayed = keyframe_requests.with_label_values(&["subscriber"]);
        let keyframe_requests_layer_switch = keyframe_requests.with_label_values(&["layer_switch"]);
        let layer_switches = IntCounterVec::new(
            Opts::new(
                "ferry_layer_switches_total",
                "Subscribers' routes that moved to another simulcast layer of a publisher's video: direction up or down.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        for d in ["up", "down"] {
            layer_switches.with_label_values(&[d]);
        }
        let relay_connections = IntGauge::new(
            "ferry_relay_connections",
            "Client connections to the relay (server-side peer connections).",
        )
        .expect("valid metric");
        let media_packets = IntCounterVec::new(
            Opts::new(
                "ferry_media_packets_total",
                "RTP packets through the relay: direction in (from publishers) or out (to subscribers), kind audio or video.",
            ),
            &["direction", "kind"],
        )
        .expect("valid metric");
        let rtp_in = [
            media_packets.with_label_values(&["in", "audio"]),
            media_packets.with_label_values(&["in", "video"]),
        ];
        let rtp_out = [
            media_packets.with_label_values(&["out", "audio"]),
            media_packets.with_label_values(&["out", "video"]),
        ];
        let media_bytes = IntCounterVec::new(
            Opts::new(
                "ferry_media_bytes_total",
                "RTP payload bytes through the relay, by direction and kind.",
            ),
            &["direction", "kind"],
        )
        .expect("valid metric");
        let bytes_in = [
            media_bytes.with_label_values(&["in", "audio"]),
            media_bytes.with_label_values(&["in", "video"]),
        ];
        let bytes_out = [
            media_bytes.with_label_values(&["out", "audio"]),
            media_bytes.with_label_values(&["out", "video"]),
        ];
        let peer_connections = IntGaugeVec::new(
            Opts::new(
                "ferry_peer_connections",
                "Relay (server-side) peer connections by state: new, connecting, connected, disconnected, failed.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let forward_latency = Histogram::with_opts(
            HistogramOpts::new(
                "ferry_forward_latency_seconds",
                "Time inside the relay from a publisher's datagram being read from the socket to every copy of it being handed to the kernel.",
            )
            .buckets(vec![
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.001_5, 0.002,
                0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )
        .expect("valid metric");
        let nacks = IntCounterVec::new(
            Opts::new(
                "ferry_nacks_total",
                "RTCP NACK feedback messages: direction received (from subscribers, answered from the retransmission buffer) or sent (to publishers, for losses on their leg).",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let nacks_received = nacks.with_label_values(&["received"]);
        let nacks_sent = nacks.with_label_values(&["sent"]);
        let retransmits = IntCounter::new(
            "ferry_retransmits_total",
            "RTP packets resent to subscribers from the relay's retransmission buffer (answers to their NACKs).",
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "ferry_connection_failures_total",
                "Relay peer connections that failed, by stage: ice (no connectivity) or dtls (connected, handshake failed).",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let srtp_sessions = IntCounterVec::new(
            Opts::new(
                "ferry_srtp_sessions_total",
                "Relay connections whose DTLS handshake completed, by who seals the packets relayed to them: relay (Ferry's own path, every accepted profile) or rtc (the connection's own pipeline, only if the keys could not be learned).",
            ),
            &["sealer"],
        )
        .expect("valid metric");
        let srtp_profiles = IntCounterVec::new(
            Opts::new(
                "ferry_srtp_profiles_total",
                "Relay connections whose DTLS handshake completed, by the SRTP protection profile the client chose (unknown: sealed by rtc).",
            ),
            &["profile"],
        )
        .expect("valid metric");
        for p in SRTP_PROFILE_LABELS {
            srtp_profiles.with_label_values(&[p]);
        }
        let srtp_opened = IntCounterVec::new(
            Opts::new(
                "ferry_srtp_opened_total",
                "RTP packets from publishers opened (authenticated, decrypted) by: relay (Ferry's own packet-in path) or rtc (the connection's pipeline: each stream's first packets, then only what the relay cannot open itself).",
            ),
            &["by"],
        )
        .expect("valid metric");
        let srtp_opened_by_relay = srtp_opened.with_label_values(&["relay"]);
        let srtp_opened_by_rtc = srtp_opened.with_label_values(&["rtc"]);
        let srtp_sealed_by_relay = srtp_sessions.with_label_values(&["relay"]);
        let srtp_sealed_by_rtc = srtp_sessions.with_label_values(&["rtc"]);
        let failures_ice = failures.with_label_values(&["ice"]);
        let failures_dtls = failures.with_label_values(&["dtls"]);
        for t in MESSAGE_TYPES {
            signal_messages.with_label_values(&[t]);
        }
        for code in ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .chain(EXTRA_ERROR_CODES)
        {
            signal_errors.with_label_values(&[code]);
        }
        for r in DROP_REASONS {
            media_dropped.with_label_values(&[r]);
        }
        for r in MODE_REASONS {
            fallbacks.with_label_values(&[r]);
        }
        for st in PEER_STATES {
            peer_connections.with_label_values(&[st]);
        }
        let ready = IntGauge::new(
            "ferry_ready",
            "1 while the server accepts new sessions, 0 once it is draining (as /readyz answers).",
        )
        .expect("valid metric");
        ready.set(1);
        let build_info = IntGaugeVec::new(
            Opts::new("ferry_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let downlink_estimate = Histogram::with_opts(
            HistogramOpts::new(
                "ferry_downlink_estimate_bps",
                "Subscribers' downlink bandwidth estimates (bits/s, from their transport-cc feedback), each observed once a second.",
            )
            .buckets(vec![
                100e3, 200e3, 300e3, 500e3, 750e3, 1e6, 1.5e6, 2e6, 3e6, 5e6, 10e6, 20e6,
            ]),
        )
        .expect("valid metric");
        let bwe_probes = IntCounterVec::new(
            Opts::new(
                "ferry_bwe_probes_total",
                "Probes of subscribers' downlinks (padding up to a target rate) to move a route up a simulcast layer: result room (the link carried the target) or no_room.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in ["room", "no_room"] {
            bwe_probes.with_label_values(&[r]);
        }
        let layer_bytes_vec = IntCounterVec::new(
            Opts::new(
                "ferry_simulcast_layer_bytes_total",
                "Payload bytes of simulcast video the relay sent to subscribers, by layer: low, medium, high.",
            ),
            &["layer"],
        )
        .expect("valid metric");
        let layer_bytes =
            ["low", "medium", "high"].map(|l| layer_bytes_vec.with_label_values(&[l]));
        let layers_paused = IntGauge::new(
            "ferry_simulcast_layers_paused",
            "Simulcast layers of publishers' video the relay asked them to pause, because no subscriber takes them (dynacast).",
        )
        .expect("valid metric");
        let media_tcp_connections = IntGauge::new(
            "ferry_media_tcp_connections",
            "Clients connected to the media port over TCP (ICE-TCP, for networks without UDP).",
        )
        .expect("valid metric");
        let media_tcp_refused = IntCounter::new(
            "ferry_media_tcp_refused_total",
            "TCP connections to the media port refused because media_tcp_max_connections were open.",
        )
        .expect("valid metric");
        let http_refused = IntCounterVec::new(
            Opts::new(
                "ferry_http_refused_total",
                "Connections to the HTTP port closed at a limit: per_ip (max_connections_per_ip TCP connections from one address), pending (max_pending_connections WebSockets before hello), pending_per_ip (max_pending_per_ip of them from one address).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in HTTP_REFUSALS {
            http_refused.with_label_values(&[r]);
        }
        let sessions_reconnecting = IntGauge::new(
            "ferry_sessions_reconnecting",
            "Sessions whose connection dropped without a close, held for resume_timeout so that the client can resume them (the room sees them as reconnecting).",
        )
        .expect("valid metric");
        let session_resumes = IntCounterVec::new(
            Opts::new(
                "ferry_session_resumes_total",
                "Session resumes: resumed (a new connection took the session over), expired (held for resume_timeout and nobody resumed it: the member left), unknown (a resume with a token of no live session: it ended, or the server restarted).",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in RESUME_RESULTS {
            session_resumes.with_label_values(&[r]);
        }
        let tables = IntGaugeVec::new(
            Opts::new(
                "ferry_table_entries",
                "Entries in the server's tables, signaling (sessions, resume_tokens, rooms, room_creators, relay_track_rooms, pending_addresses) and media, summed over shards (connections and their indexes by user, ufrag and address, routed_tracks, routes, subscriptions, qualities, timers, left_members, tcp_clients). With no one connected every one goes back to 0 (rooms after empty_room_ttl); one that keeps growing is a leak.",
            ),
            &["table"],
        )
        .expect("valid metric");
        for t in HUB_TABLES.iter().chain(MEDIA_TABLES.iter()) {
            tables.with_label_values(&[t]);
        }
        let limit_refusals = IntCounterVec::new(
            Opts::new(
                "ferry_limit_refusals_total",
                "Refused at a per-client limit: relay_connections_per_minute (an offer to the server past a session's max_relay_connections_per_minute new relay connections: answered rate_limited), handshakes_per_ip (an ICE check of a new relay connection from an address with max_handshakes_per_ip connections already in their handshake: dropped).",
            ),
            &["limit"],
        )
        .expect("valid metric");
        for l in LIMITS {
            limit_refusals.with_label_values(&[l]);
        }
        let tasks = IntGauge::new(
            "ferry_tasks",
            "Live tokio tasks (each session is one, plus a fixed few).",
        )
        .expect("valid metric");
        for c in [
            Box::new(ws_connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_refused.clone()),
            Box::new(sessions_reconnecting.clone()),
            Box::new(tables.clone()),
            Box::new(tasks.clone()),
            Box::new(limit_refusals.clone()),
            Box::new(session_resumes.clone()),
            Box::new(media_tcp_connections.clone()),
            Box::new(layers_paused.clone()),
            Box::new(downlink_estimate.clone()),
            Box::new(bwe_probes.clone()),
            Box::new(layer_bytes_vec),
            Box::new(media_tcp_refused.clone()),
            Box::new(rooms.clone()),
            Box::new(room_members.clone()),
            Box::new(signal_messages.clone()),
            Box::new(signal_errors.clone()),
            Box::new(stun_bindings.clone()),
            Box::new(media_dropped.clone()),
            Box::new(keyframe_requests),
            Box::new(layer_switches.clone()),
            Box::new(pairs),
            Box::new(fallbacks.clone()),
            Box::new(relay_connections.clone()),
            Box::new(media_packets),
            Box::new(media_bytes),
            Box::new(peer_connections.clone()),
            Box::new(forward_latency.clone()),
            Box::new(build_info),
            Box::new(nacks),
            Box::new(retransmits.clone()),
            Box::new(failures),
            Box::new(srtp_sessions),
            Box::new(srtp_profiles.clone()),
            Box::new(srtp_opened.clone()),
            Box::new(ready.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(process::ProcessCollector::new()))
            .expect("process collector registered once");
        Metrics {
            registry,
            ready,
            ws_connections,
            rooms,
            room_members,
            signal_messages,
            signal_errors,
            stun_bindings,
            media_dropped,
            keyframe_requests_new_subscriber,
            keyframe_requests_relayed,
            keyframe_requests_layer_switch,
            layer_switches,
            pairs_p2p,
            pairs_relay,
            fallbacks,
            relay_connections,
            rtp_in,
            rtp_out,
            bytes_in,
            bytes_out,
            peer_connections,
            forward_latency,
            nacks_received,
            nacks_sent,
            retransmits,
            failures_ice,
            failures_dtls,
            srtp_sealed_by_relay,
            srtp_sealed_by_rtc,
            srtp_profiles,
            srtp_opened_by_relay,
            srtp_opened_by_rtc,
            media_tcp_connections,
            layers_paused,
            downlink_estimate,
            bwe_probes,
            layer_bytes,
            media_tcp_refused,
            http_refused,
            sessions_reconnecting,
            session_resumes,
            tables,
            tasks,
            limit_refusals,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at each scrape. Ferry's own rather
/// than the prometheus crate's, whose `process_cpu_seconds_total` counts whole seconds only (a
/// lightly loaded server shows 0 % CPU, then a jump); this one has the kernel's clock-tick
/// resolution (10 ms).
#[cfg(target_os = "linux")]
mod process {
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{Counter, IntGauge};

    pub struct ProcessCollector {
        descs: Vec<Desc>,
        cpu: Counter,
        open_fds: IntGauge,
        max_fds: IntGauge,
        virtual_bytes: IntGauge,
        resident_bytes: IntGauge,
        start_time: IntGauge,
        threads: IntGauge,
        clock_ticks: f64,
        page_size: i64,
    }

    /// A value from the process's ELF auxiliary vector (what `sysconf` reads too).
    fn auxv(key: u64) -> Option<u64> {
        let bytes = std::fs::read("/proc/self/auxv").ok()?;
        const W: usize = std::mem::size_of::<usize>();
        bytes.chunks_exact(2 * W).find_map(|pair| {
            let k = usize::from_ne_bytes(pair[..W].try_into().ok()?) as u64;
            let v = usize::from_ne_bytes(pair[W..].try_into().ok()?) as u64;
            (k == key).then_some(v)
        })
    }

    const AT_PAGESZ: u64 = 6;
    const AT_CLKTCK: u64 = 17;

    /// The fields of `/proc/<pid>/stat` (`pid` may be `self`) after the command name: `fields[0]`
    /// is field 3 (state).
    fn stat_fields(pid: &str) -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 1..];
        Some(
            after
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect(),
        )
    }

    /// Field `n` of `/proc/self/stat`, numbered as in proc(5).
    fn field(fields: &[u64], n: usize) -> Option<u64> {
        fields.get(n - 3).copied()
    }

    /// User + system CPU time of all the process's threads, in clock ticks.
    fn cpu_ticks(fields: &[u64]) -> u64 {
        field(fields, 14).unwrap_or(0) + field(fields, 15).unwrap_or(0)
    }

    /// CPU seconds and resident memory (`VmRSS`, bytes) of another process.
    pub fn usage(pid: u32) -> Option<(f64, u64)> {
        let ticks = cpu_ticks(&stat_fields(&pid.to_string())?);
        let clock_ticks = auxv(AT_CLKTCK).filter(|t| *t > 0).unwrap_or(100) as f64;
        let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
        Some((ticks as f64 / clock_ticks, rss_kb * 1024))
    }

    /// CPU seconds all the machine's CPUs spent busy (not idle, not waiting for I/O) since boot.
    pub fn machine_busy() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
        let clock_ticks = auxv(AT_CLKTCK).filter(|t| *t > 0).unwrap_or(100) as f64;
        Some(busy as f64 / clock_ticks)
    }

    fn boot_time() -> Option<u64> {
        std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    }

    fn max_open_files() -> Option<i64> {
        std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|soft| soft.parse().ok())
    }

    impl ProcessCollector {
        pub fn new() -> ProcessCollector {
            let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
            let cpu = Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            )
            .expect("valid metric");
            let open_fds = gauge("process_open_fds", "Number of open file descriptors.");
            let max_fds = gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            );
            let virtual_bytes = gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            );
            let resident_bytes = gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            );
            let start_time = gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            );
            let threads = gauge("process_threads", "Number of OS threads in the process.");
            let clock_ticks = auxv(AT_CLKTCK).filter(|t| *t > 0).unwrap_or(100) as f64;
            let page_size = auxv(AT_PAGESZ).filter(|p| *p > 0).unwrap_or(4096) as i64;
            if let (Some(boot), Some(start)) =
                (boot_time(), stat_fields("self").and_then(|f| field(&f, 22)))
            {
                start_time.set((boot as f64 + start as f64 / clock_ticks) as i64);
            }
            let descs = [
                cpu.desc(),
                open_fds.desc(),
                max_fds.desc(),
                virtual_bytes.desc(),
                resident_bytes.desc(),
                start_time.desc(),
                threads.desc(),
            ]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
            ProcessCollector {
                descs,
                cpu,
                open_fds,
                max_fds,
                virtual_bytes,
                resident_bytes,
                start_time,
                threads,
                clock_ticks,
                page_size,
            }
        }
    }

    impl Collector for ProcessCollector {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                // The directory handle being read is one of them.
                self.open_fds.set(dir.count() as i64 - 1);
            }
            if let Some(max) = max_open_files() {
                self.max_fds.set(max);
            }
            if let Some(f) = stat_fields("self") {
                let total = cpu_ticks(&f) as f64 / self.clock_ticks;
                // Concurrent scrapes: never move the counter backwards.
                let past = self.cpu.get();
                if total > past {
                    self.cpu.inc_by(total - past);
                }
                self.threads.set(field(&f, 20).unwrap_or(0) as i64);
                self.virtual_bytes.set(field(&f, 23).unwrap_or(0) as i64);
                self.resident_bytes
                    .set(field(&f, 24).unwrap_or(0) as i64 * self.page_size);
            }
            [
                self.cpu.collect(),
                self.open_fds.collect(),
                self.max_fds.collect(),
                self.virtual_bytes.collect(),
                self.resident_bytes.collect(),
                self.start_time.collect(),
                self.threads.collect(),
            ]
            .into_iter()
            .flatten()
            .collect()
        }
    }
}

/// CPU seconds (user + system, all threads) and resident memory (`VmRSS`, bytes) of process `pid`,
/// read from `/proc`; `None` when it cannot be read. For `ferry loadgen --server-pid`, which
/// measures servers that have no `/metrics` (Janus) the same way as Ferry.
#[cfg(target_os = "linux")]
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    process::usage(pid)
}

#[cfg(not(target_os = "linux"))]
pub fn process_usage(_pid: u32) -> Option<(f64, u64)> {
    None
}

/// CPU seconds the whole machine (all CPUs) spent busy since boot, from `/proc/stat`: what else
/// ran during a measurement.
#[cfg(target_os = "linux")]
pub fn machine_busy_seconds() -> Option<f64> {
    process::machine_busy()
}

#[cfg(not(target_os = "linux"))]
pub fn machine_busy_seconds() -> Option<f64> {
    None
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::protocol::RequestType;

    #[test]
    fn message_type_labels_are_request_types() {
        for t in &MESSAGE_TYPES[..MESSAGE_TYPES.len() - 2] {
            assert_eq!(RequestType::parse(t).map(|r| r.as_str()), Some(*t));
        }
    }

    #[test]
    fn known_label_values_exist_from_the_start() {
        let m = Metrics::new();
        let text = m.render();
        for r in DROP_REASONS {
            let line = format!("ferry_media_dropped_total{{reason=\"{r}\"}} 0\n");
            assert!(text.contains(&line), "{line}");
        }
        for c in ErrorCode::ALL {
            let line = format!("ferry_signal_errors_total{{code=\"{}\"}} 0\n", c.as_str());
            assert!(text.contains(&line), "{line}");
        }
        for r in MODE_REASONS {
            let line = format!("ferry_fallbacks_total{{reason=\"{r}\"}} 0\n");
            assert!(text.contains(&line), "{line}");
        }
        for st in PEER_STATES {
            let line = format!("ferry_peer_connections{{state=\"{st}\"}} 0\n");
            assert!(text.contains(&line), "{line}");
        }
        assert!(text.contains("ferry_signal_messages_total{type=\"invalid\"} 0\n"));
        assert!(text.contains("ferry_ready 1\n"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_this_process() {
        let m = Metrics::new();
        let read = |text: &str, name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .parse()
                .unwrap()
        };
        // Burn CPU until the counter moves by 50 ms (clock-tick resolution, not whole seconds);
        // bounded in wall time, whatever else the machine is doing.
        let before = read(&m.render(), "process_cpu_seconds_total");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let mut cpu = before;
        while cpu < before + 0.05 && t.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            cpu = read(&m.render(), "process_cpu_seconds_total");
        }
        assert!(
            cpu >= before + 0.04 && cpu < before + 1.0,
            "CPU seconds move at tick resolution: {before} then {cpu}"
        );
        let text = m.render();
        let value = |name: &str| read(&text, name);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
        // Another process's figures (here our own PID) read the same /proc files.
        let (cpu_by_pid, rss_by_pid) = process_usage(std::process::id()).expect("own /proc");
        assert!(cpu_by_pid >= cpu, "{cpu_by_pid} vs {cpu}");
        assert!(rss_by_pid > 1_000_000, "{rss_by_pid}");
        assert!(process_usage(u32::MAX).is_none());
        assert!(machine_busy_seconds().expect("/proc/stat") >= cpu_by_pid - 1.0);
    }
}
