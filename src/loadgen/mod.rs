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
//! Here the run's phases: set the rooms up, wait until every receiver has media, measure a window,
//! collect the clients. The parts: [`cli`] (the flags), [`shape`] (what a shape makes of them),
//! [`ferry`] and [`janus`] (a room set up through each server's signaling), [`client`] (one
//! client's loop), [`peer`] (its connection and media), [`ws`] (the JSON WebSocket), [`measure`]
//! (what is counted and read from the server), [`report`] (the figures, as JSON and for people).

mod churn;
mod cli;
mod client;
mod ferry;
mod janus;
mod measure;
mod peer;
mod report;
mod shape;
mod ws;

pub use cli::{LoadgenArgs, Shape, Target};
pub use peer::{opus, vp8};
pub use report::print_human;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use client::{ClientResult, Ctx};
use measure::{Probe, Shared};
use peer::Source;
use report::{Clients, Window};
use shape::Plan;

/// Run the load and print the report. Returns an error when the load could not be set up.
pub async fn run(args: LoadgenArgs) -> Result<Value, String> {
    let srtp_profiles = args.check()?;
    let url = args.server_url();
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
    shared.tcp = args.tcp;
    shared.srtp_profiles = srtp_profiles;
    shared.downlinks = args.downlinks.iter().map(|k| k * 1000).collect();
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
            simulcast: args.simulcast,
        },
        local_ip: args.local_ip,
        pace: Duration::from_secs_f64(1.0 / f64::from(args.join_rate.max(1))),
    };
    if args.churn {
        return churn::run(&args, &url, &probe, &ctx).await;
    }
    let plan = Plan::new(&args);
    let started = Instant::now();
    let tasks = set_up(&args, &url, &ctx).await?;
    wait_for_receivers(&shared, &plan, started).await;
    let window = measure_window(&args, &ctx, &probe).await?;
    let clients = collect(tasks).await;
    Ok(report::build(
        &args, &plan, &shared, &baseline, &window, clients,
    ))
}

/// Every room set up through the target's signaling; the clients' tasks.
async fn set_up(
    args: &LoadgenArgs,
    url: &str,
    ctx: &Ctx,
) -> Result<Vec<JoinHandle<ClientResult>>, String> {
    eprintln!(
        "loadgen: {:?} at {url}: {} room(s) of {} publisher(s) and {} subscriber(s) ({:?}), {} kbit/s video{}{} per publisher",
        args.target,
        args.rooms,
        args.publishers,
        args.subscribers,
        args.shape,
        args.video_kbps,
        if args.simulcast { " (simulcast)" } else { "" },
        if args.no_audio { "" } else { " + audio" }
    );
    let mut tasks = Vec::new();
    let mut stream_index = 0u32;
    for r in 0..args.rooms {
        tasks.extend(match args.target {
            Target::Ferry => ferry::setup_room(args, url, ctx, r, &mut stream_index).await?,
            Target::Janus => janus::setup_room(args, url, ctx, r, &mut stream_index).await?,
        });
    }
    Ok(tasks)
}

/// Wait until every receiving client sees media (or 30 s), showing progress.
async fn wait_for_receivers(shared: &Shared, plan: &Plan, started: Instant) {
    let (expected_receivers, clients_total) = (plan.expected_receivers, plan.clients);
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
}

/// After a 2 s settling time, the measured window (`--duration`), showing progress each second;
/// the clients stop half a second after it.
async fn measure_window(args: &LoadgenArgs, ctx: &Ctx, probe: &Probe) -> Result<Window, String> {
    let shared = &ctx.shared;
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
    Ok(Window {
        seconds: elapsed,
        before,
        after,
        sent: sent1 - sent0,
        received: recv1 - recv0,
    })
}

/// Every client's result, once they stopped.
async fn collect(tasks: Vec<JoinHandle<ClientResult>>) -> Clients {
    let mut c = Clients::default();
    for t in tasks {
        match t.await {
            Ok(r) => {
                if let Some(e) = r.error {
                    c.errors.push(e);
                }
                if let Some(j) = r.join_ms {
                    c.joins.push(j);
                }
                c.receivers += u64::from(!r.loss.is_empty());
                for l in r.loss {
                    c.expected += l.expected();
                    c.unique += l.unique;
                }
            }
            Err(e) => c.errors.push(format!("client task: {e}")),
        }
    }
    c.joins.sort_by(f64::total_cmp);
    c
}
