//! `ferry loadgen`: publishers and subscribers against a running Ferry (or, for comparisons, a
//! Janus VideoRoom), through the real signaling and real ICE/DTLS/SRTP (webrtc-rs `rtc` peers, one
//! UDP socket each, on this machine).
//!
//! Every payload starts with its send time and a per-stream counter, so subscribers measure loss
//! and latency (publishers and subscribers share this process's clock). At the end it reads the
//! server's own `/metrics` (deltas over the measured window) for CPU per forwarded packet, memory
//! per subscriber and the forwarding latency inside the server; with `--server-pid`, the server
//! process's CPU time and RSS from `/proc` (any server), per packet received by subscribers.
//!
//! The parts: [`cli`] (flags and the printed report), the shapes (what each room holds, below and
//! in [`ferry`] / [`janus`], which set a room up through each server's signaling), [`client`] (one
//! client's loop), [`peer`] (its connection and media), [`measure`] (what is counted and read from
//! the server), [`ws`] (the JSON WebSocket).

mod cli;
mod client;
mod ferry;
mod janus;
mod measure;
mod peer;
mod ws;

pub use cli::{LoadgenArgs, Shape, Target, print_human};
pub use peer::{opus, vp8};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use client::Ctx;
use measure::{Probe, ServerSample, Shared, histogram_quantile, histogram_share_within};
use peer::Source;

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
