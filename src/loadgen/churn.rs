//! `ferry loadgen --churn`: members come and go for a while, the way a long-running server sees
//! them — joining and leaving, vanishing without a close, abandoning relay connections
//! mid-handshake, connecting to the relay and receiving for a moment — while the server's
//! memory, descriptors, tasks and table sizes are sampled. For leak hunting: after the churn
//! stops, every table should drain back to zero (`benches/soak.sh` runs it for half an hour).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::cli::LoadgenArgs;
use super::client::Ctx;
use super::ferry::{Signaling, ws_url};
use super::measure::{Probe, http_get};
use super::peer::{Peer, Signal};

/// What one cycle does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cycle {
    /// hello, join, leave, close.
    Clean,
    /// hello, create a room, join, leave, close.
    OwnRoom,
    /// hello, join, then the TCP connection drops without a close (held for a resume, then a
    /// leave).
    Vanish,
    /// hello, join, subscribe and offer a relay connection, then vanish before ICE and DTLS.
    Abandon,
    /// hello, join, subscribe, relay connection up and media received, then leave.
    Relay,
}

impl Cycle {
    /// Cycle `i`'s kind: a relay cycle every `media_every` (alternating abandoned and full),
    /// a room of its own every 50th, a vanish every 5th, otherwise clean.
    fn of(i: u64, media_every: u64) -> Cycle {
        if media_every > 0 && i % media_every == media_every - 1 {
            if (i / media_every).is_multiple_of(2) {
                Cycle::Abandon
            } else {
                Cycle::Relay
            }
        } else if i % 50 == 17 {
            Cycle::OwnRoom
        } else if i % 5 == 3 {
            Cycle::Vanish
        } else {
            Cycle::Clean
        }
    }
}

/// Run the churn: `args.churn_cycles` cycles (0: no limit) or `args.duration`, whichever ends
/// first, by `args.churn_workers` workers; a sample every `args.churn_sample`; then up to
/// `args.churn_settle` for the tables to drain. The report has every sample.
pub(super) async fn run(
    args: &LoadgenArgs,
    url: &str,
    probe: &Probe,
    ctx: &Ctx,
) -> Result<Value, String> {
    let started = Instant::now();
    let ends = started + args.duration;
    // A relayed room everyone joins, with one publisher for the relay cycles to receive.
    let mut control = Signaling::connect(&ws_url(args, url, "lg-churn-control")).await?;
    let room = control
        .request("createRoom", json!({"mode": "relay"}))
        .await?["roomId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut publisher = Signaling::connect(&ws_url(args, url, "lg-churn-publisher")).await?;
    publisher
        .request("joinRoom", json!({"roomId": room}))
        .await?;
    let publisher_id = publisher.user_id.clone();
    publisher.publishing = Some(0);
    *ctx.stop_at.lock().expect("lock") = Some(tokio::time::Instant::from_std(ends));
    let publishing = ctx.spawn(publisher, Some(0), false);
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.churn_workers.max(1) {
        let (args, url, room, publisher_id, ctx) = (
            args.clone(),
            url.to_string(),
            room.clone(),
            publisher_id.clone(),
            ctx.clone(),
        );
        let (done, errors, next) = (done.clone(), errors.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= ends || (args.churn_cycles > 0 && i >= args.churn_cycles) {
                    return;
                }
                if args.churn_rate > 0.0 {
                    let at = started + Duration::from_secs_f64(i as f64 / args.churn_rate);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
                let kind = Cycle::of(i, args.churn_media_every);
                let r = cycle(kind, &args, &url, &room, &publisher_id, &ctx, i).await;
                if let Err(e) = r {
                    let key = format!("{kind:?}: {}", e.chars().take(120).collect::<String>());
                    *errors.lock().expect("lock").entry(key).or_default() += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut samples = Vec::new();
    let mut last_sample = Instant::now() - args.churn_sample;
    while workers.iter().any(|w| !w.is_finished()) {
        if last_sample.elapsed() >= args.churn_sample {
            last_sample = Instant::now();
            let s = sample(probe, started, done.load(Ordering::Relaxed)).await?;
            eprintln!("loadgen churn: {}", line(&s));
            samples.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    let churn_seconds = started.elapsed().as_secs_f64();
    // The publisher and the control member go too; then the tables should drain.
    *ctx.stop_at.lock().expect("lock") = Some(tokio::time::Instant::now());
    let _ = publishing.await;
    drop(control);
    let settle_until = Instant::now() + args.churn_settle;
    let settled = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = sample(probe, started, done.load(Ordering::Relaxed)).await?;
        let busy: Vec<String> = s["tables"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(t, n)| n.as_f64().unwrap_or(0.0) > 0.0 && !LINGER.contains(&t.as_str()))
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        if busy.is_empty() || Instant::now() >= settle_until {
            eprintln!("loadgen churn: after it stopped: {}", line(&s));
            samples.push(s);
            break busy;
        }
    };
    let cycles = done.load(Ordering::Relaxed);
    Ok(json!({
        "churn": true,
        "cycles": cycles,
        "seconds": churn_seconds,
        "cycles_per_s": cycles as f64 / churn_seconds.max(1e-9),
        "errors": errors.lock().expect("lock").iter().map(|(k, n)| format!("{n} x {k}")).collect::<Vec<_>>(),
        "not_drained": settled,
        "rss_slope_kib_per_min": rss_slope(&samples),
        "samples": samples,
    }))
}

/// Tables that keep entries after everyone left, for a while by design: rooms (until
/// `empty_room_ttl`) and who created them.
const LINGER: [&str; 2] = ["rooms", "room_creators"];

/// One cycle of `kind`.
async fn cycle(
    kind: Cycle,
    args: &LoadgenArgs,
    url: &str,
    room: &str,
    publisher: &str,
    ctx: &Ctx,
    i: u64,
) -> Result<(), String> {
    let mut sig = Signaling::connect(&ws_url(args, url, &format!("lg-churn-{i}"))).await?;
    let room = if kind == Cycle::OwnRoom {
        sig.request("createRoom", json!({})).await?["roomId"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        room.to_string()
    };
    sig.request("joinRoom", json!({"roomId": room})).await?;
    match kind {
        Cycle::Clean | Cycle::OwnRoom => {
            sig.request("leaveRoom", json!({})).await?;
            sig.close().await;
        }
        Cycle::Vanish => drop(sig),
        Cycle::Abandon | Cycle::Relay => {
            sig.subscribe_to = vec![publisher.to_string()];
            let mut p = Peer::new(ctx.local_ip, None, ctx.shared.clone()).await?;
            sig.open(&mut p).await?;
            if kind == Cycle::Abandon {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while p.first_media_at.is_none() && tokio::time::Instant::now() < deadline {
                p.pump(
                    &mut sig,
                    tokio::time::Instant::now() + Duration::from_millis(20),
                )
                .await;
            }
            if p.first_media_at.is_none() {
                return Err(format!("no media within 10 s (connected: {})", p.connected));
            }
            sig.request("leaveRoom", json!({})).await?;
            sig.close().await;
        }
    }
    Ok(())
}

/// The server now: RSS, open descriptors (with `--server-pid`), tasks and table sizes (from its
/// metrics).
async fn sample(probe: &Probe, started: Instant, cycles: u64) -> Result<Value, String> {
    let mut s = json!({ "t": started.elapsed().as_secs_f64(), "cycles": cycles });
    if let Some(pid) = probe.pid {
        if let Some((_, rss)) = crate::metrics::process_usage(pid) {
            s["rss_kib"] = json!(rss / 1024);
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            s["fds"] = json!(fds.count());
        }
    }
    if let Some(url) = &probe.metrics_url {
        let text = http_get(url).await?;
        let mut tables = serde_json::Map::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("ferry_table_entries{table=\"")
                && let Some((t, v)) = rest.split_once("\"} ")
            {
                tables.insert(t.to_string(), json!(v.trim().parse::<f64>().unwrap_or(0.0)));
            }
            if let Some(v) = l.strip_prefix("ferry_tasks ") {
                s["tasks"] = json!(v.trim().parse::<f64>().unwrap_or(0.0));
            }
            if let Some(v) = l.strip_prefix("process_resident_memory_bytes ")
                && s.get("rss_kib").is_none()
            {
                s["rss_kib"] = json!((v.trim().parse::<f64>().unwrap_or(0.0) / 1024.0) as u64);
            }
            if let Some(v) = l.strip_prefix("process_open_fds ")
                && s.get("fds").is_none()
            {
                s["fds"] = json!(v.trim().parse::<f64>().unwrap_or(0.0));
            }
        }
        s["tables"] = Value::Object(tables);
    }
    Ok(s)
}

fn line(s: &Value) -> String {
    let tables: Vec<String> = s["tables"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_f64().unwrap_or(0.0) > 0.0)
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    format!(
        "t={:.0}s cycles={} rss={} KiB fds={} tasks={} tables: {}",
        s["t"].as_f64().unwrap_or(0.0),
        s["cycles"],
        s["rss_kib"],
        s["fds"],
        s["tasks"],
        if tables.is_empty() {
            "all empty".to_string()
        } else {
            tables.join(" ")
        }
    )
}

/// The RSS trend (KiB per minute, least squares) over the samples after the first fifth (the
/// warm-up); `null` with fewer than 4 of them.
fn rss_slope(samples: &[Value]) -> Value {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s["t"].as_f64()?, s["rss_kib"].as_f64()?)))
        .collect();
    let points = &points[points.len() / 5..];
    if points.len() < 4 {
        return Value::Null;
    }
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var == 0.0 {
        return Value::Null;
    }
    json!(cov / var * 60.0)
}
