//! The report: the run's figures as JSON (what `--json` prints and the tests read), and the same
//! for people.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::cli::LoadgenArgs;
use super::measure::{ServerSample, Shared, histogram_quantile, histogram_share_within};
use super::shape::Plan;

/// The measured window: the server before and after it, what the clients sent and received in it.
pub(super) struct Window {
    pub(super) seconds: f64,
    pub(super) before: ServerSample,
    pub(super) after: ServerSample,
    /// Packets the clients sent and received in the window.
    pub(super) sent: u64,
    pub(super) received: u64,
}

/// What the clients reported when they stopped.
#[derive(Default)]
pub(super) struct Clients {
    /// Join times (ms to the first media), sorted.
    pub(super) joins: Vec<f64>,
    /// Packets every receiver should have had and the unique ones it had, summed over the streams.
    pub(super) expected: u64,
    pub(super) unique: u64,
    pub(super) receivers: u64,
    pub(super) errors: Vec<String>,
}

/// The report of a run: `baseline` is the server before anyone joined.
pub(super) fn build(
    args: &LoadgenArgs,
    plan: &Plan,
    shared: &Shared,
    baseline: &ServerSample,
    window: &Window,
    clients: Clients,
) -> Value {
    let (before, after, elapsed) = (&window.before, &window.after, window.seconds);
    let joins = &clients.joins;
    let pct = |v: &[f64], q: f64| -> Option<f64> {
        (!v.is_empty()).then(|| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1])
    };
    let subscribers_total = plan.subscribers;
    let per_subscriber =
        |grown: f64| (subscribers_total > 0).then(|| grown.max(0.0) / subscribers_total as f64);
    let received = window.received as f64;
    let sent = window.sent;
    let fanout = plan.fanout;
    let per_received = |cpu: f64| (received > 0.0).then(|| cpu * 1e6 / received);
    let loss = if clients.expected > 0 {
        100.0 * (1.0 - clients.unique as f64 / clients.expected as f64)
    } else {
        100.0
    };
    // Ferry's own figures (null for Janus).
    let m = [baseline, before, after].map(|s| s.metrics.as_ref());
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
    // What the relay sent of each simulcast layer, kbit/s.
    let layer_kbps = match [before, after].map(|s| s.metrics.as_ref()) {
        [Some(b), Some(a)] if window.seconds > 0.0 => Some(
            [0, 1, 2]
                .map(|i| (a.layer_bytes[i] - b.layer_bytes[i]) * 8.0 / 1000.0 / window.seconds),
        ),
        _ => None,
    };
    // The server process from /proc (any target).
    let process = match [baseline, before, after].map(|s| s.process) {
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
    let delta = |f: fn(&ServerSample) -> Option<f64>| Some(f(after)? - f(before)?);
    let own_cpu = delta(|s| s.own_cpu);
    let machine_busy = delta(|s| s.machine_busy);
    json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "shape": format!("{:?}", args.shape).to_lowercase(),
        "rooms": args.rooms, "publishers_per_room": args.publishers, "subscribers_per_room": args.subscribers,
        "video_kbps": args.video_kbps, "audio": !args.no_audio, "pacing": args.pacing,
        "light_subscribers": args.light_subscribers, "receive_gro": !args.no_gro,
        "srtp_profiles": args.srtp_profiles,
        "seconds": elapsed,
        "packets_sent_per_s": sent as f64 / elapsed,
        "packets_received_per_s": received / elapsed,
        // What the subscribers got of what they should have (every publisher's packets to every
        // receiver in its room) over the window: below 100 when packets are lost, and also when
        // they queue up somewhere (the loss figure only counts gaps).
        "delivered_percent": (sent > 0 && fanout > 0).then(|| 100.0 * received / (sent as f64 * fanout as f64)),
        "server_forwarded_per_s": forwarded.map(|f| f / elapsed),
        "loss_percent": loss,
        "receiving_clients": clients.receivers,
        "clients_without_media": plan.expected_receivers.saturating_sub(clients.receivers),
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
        "join_ms": { "p50": pct(joins, 0.5), "p99": pct(joins, 0.99), "n": joins.len() },
        "simulcast_kbps_by_layer": layer_kbps.map(|[l, m, h]| json!({"low": l, "medium": m, "high": h})),
        // Datagrams the subscribers' emulated downlinks (`--downlinks`) dropped.
        "downlink_drops": shared.shaped.load(Ordering::Relaxed),
        "corrupt_payloads": shared.corrupt.load(Ordering::Relaxed),
        "publisher_layers_paused": shared.layers_paused.load(Ordering::Relaxed),
        // Received datagrams too short for the stamp, or (light subscribers) that did not open.
        "malformed_packets": shared.malformed.load(Ordering::Relaxed),
        "packets_opened_by_light_subscribers": shared.opened_light.load(Ordering::Relaxed),
        "keyframe_requests": shared.keyframe_requests.load(Ordering::Relaxed),
        "errors": clients.errors,
    })
}

/// Print a report for people.
pub fn print_human(r: &Value) {
    if r["churn"] == true {
        println!(
            "ferry loadgen churn: {} cycles in {:.0} s ({:.1}/s); RSS slope after warm-up {} KiB/min; not drained after: {}",
            r["cycles"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["cycles_per_s"].as_f64().unwrap_or(0.0),
            r["rss_slope_kib_per_min"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            r["not_drained"]
        );
        for e in r["errors"].as_array().into_iter().flatten() {
            println!("  error: {}", e.as_str().unwrap_or_default());
        }
        return;
    }
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
    let l = &r["simulcast_kbps_by_layer"];
    if l.is_object()
        && l.as_object()
            .into_iter()
            .flatten()
            .any(|(_, v)| v.as_f64().unwrap_or(0.0) > 0.0)
    {
        println!(
            "  simulcast sent by layer (kbit/s): low {}, medium {}, high {}; emulated downlinks dropped {} datagrams; layers paused at the publishers (dynacast) {}",
            f(&l["low"]),
            f(&l["medium"]),
            f(&l["high"]),
            r["downlink_drops"],
            r["publisher_layers_paused"]
        );
    }
    if r["corrupt_payloads"].as_u64().unwrap_or(0) > 0 {
        println!("  CORRUPT payloads: {}", r["corrupt_payloads"]);
    }
    for e in r["errors"].as_array().into_iter().flatten() {
        println!("  error: {e}");
    }
}
