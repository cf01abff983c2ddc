//! Heap allocations per forwarded packet in the relay, counted by a global allocator on the
//! server's media thread (the relay's core runs there alone; signaling and the test's WebRTC peers
//! run elsewhere and are not counted).
//!
//! The performance milestone's target is zero in steady state. Each forwarded copy is rewritten
//! and sealed by the relay itself into the reused send batch (`media::srtp`): zero per copy,
//! asserted below. Each packet *in* still goes through webrtc-rs `rtc`'s receive pipeline (SRTP
//! decrypt, interceptors), which allocates; that is measured and bounded (docs/performance.md).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::rtc_client::MediaClient;
use common::*;
use ferry::signal::hub::Hub;
use serde_json::json;

struct Counting;

static SERVER_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static ON_SERVER: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if ON_SERVER.try_with(|c| c.get()).unwrap_or(false) {
        SERVER_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SLICE: Duration = Duration::from_millis(5);

/// A server whose media thread counts every allocation it makes.
async fn server() -> (std::net::SocketAddr, Arc<Hub>) {
    let server = ferry::server::Server::bind(test_config())
        .await
        .expect("bind")
        .on_media_thread_start(|| ON_SERVER.with(|c| c.set(true)));
    let (addr, hub) = (server.local_addr(), server.hub());
    // Runs until the test process ends.
    tokio::spawn(server.run());
    (addr, hub)
}

fn payload(i: u16) -> Bytes {
    Bytes::from(format!("ferry-payload-{i:06}-").repeat(50))
}

fn forwarded(hub: &Hub) -> u64 {
    hub.metrics.rtp_out.iter().map(|c| c.get()).sum()
}

async fn pump_all(publ: &mut MediaClient, subs: &mut [MediaClient]) {
    publ.pump(SLICE).await;
    for s in subs.iter_mut() {
        s.pump(SLICE).await;
    }
}

/// Allocations on the server per packet in, with `n` subscribers, in steady state.
async fn allocations_per_packet_in(addr: std::net::SocketAddr, hub: &Hub, n: usize) -> f64 {
    let mut a = Client::joined_hello(addr, "publisher").await;
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut subs = Vec::new();
    for i in 0..n {
        let mut b = Client::joined_hello(addr, &format!("sub{i}")).await;
        b.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        b.request("subscribe", json!({"userId": a.user_id}))
            .await
            .unwrap();
        subs.push(b);
    }
    let mut publ = MediaClient::connect(a, true).await;
    let mut subs: Vec<MediaClient> = {
        let mut v = Vec::new();
        for b in subs {
            v.push(MediaClient::connect(b, false).await);
        }
        v
    };
    for _ in 0..1000 {
        pump_all(&mut publ, &mut subs).await;
        if publ.connected && subs.iter().all(|s| s.connected) {
            break;
        }
    }
    assert!(publ.connected && subs.iter().all(|s| s.connected));
    // Warm up: routes, renegotiation, keyframe requests, buffers growing to their size.
    let mut seq = 0u16;
    while subs.iter().any(|s| s.received.len() < 150) && seq < 2000 {
        publ.send(seq, payload(seq));
        seq += 1;
        pump_all(&mut publ, &mut subs).await;
    }
    assert!(subs.iter().all(|s| s.received.len() >= 150), "warm-up");
    let (a0, f0) = (SERVER_ALLOCATIONS.load(Ordering::Relaxed), forwarded(hub));
    // Bursts of BURST packets (a video frame's worth) per round of pumping, so that what every
    // connection does per unit of time (timers, RTCP reports) weighs little per packet.
    const MEASURED: u16 = 400;
    const BURST: u16 = 10;
    for _ in 0..MEASURED / BURST {
        for _ in 0..BURST {
            publ.send(seq, payload(seq));
            seq += 1;
        }
        pump_all(&mut publ, &mut subs).await;
    }
    let (a1, f1) = (SERVER_ALLOCATIONS.load(Ordering::Relaxed), forwarded(hub));
    // The connections' timers and reports allocate per unit of time, not per packet: count them
    // over as many rounds without media, and leave them out.
    for _ in 0..MEASURED / BURST {
        pump_all(&mut publ, &mut subs).await;
    }
    let idle = SERVER_ALLOCATIONS.load(Ordering::Relaxed) - a1;
    let packets_in = f64::from(MEASURED);
    assert!(
        (f1 - f0) as f64 >= 0.9 * packets_in * n as f64,
        "{} forwarded for {packets_in} in to {n}",
        f1 - f0
    );
    (a1 - a0).saturating_sub(idle) as f64 / packets_in
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_forwarded_packet() {
    // The clients negotiate no transport-cc: their feedback messages (which rtc parses into lists,
    // a few per message, and which come as often as the test's rounds of pumping happen to
    // allow) would be counted per packet and hide what a copy costs. The estimator's own work is
    // per feedback message and measured in docs/performance.md.
    common::rtc_client::without_transport_cc();
    let (addr, hub) = server().await;
    let one = allocations_per_packet_in(addr, &hub, 1).await;
    let six = allocations_per_packet_in(addr, &hub, 6).await;
    // allocations per packet in = per_in + per_copy * subscribers
    let per_copy = (six - one) / 5.0;
    let per_in = one - per_copy;
    eprintln!(
        "server allocations: {one:.2} per packet with 1 subscriber, {six:.2} with 6 \
         => {per_in:.2} per packet in + {per_copy:.2} per forwarded copy"
    );
    // A forwarded copy is written and sealed into the send batch: nothing allocated. What is
    // left is the connections' own timers and reports, spread over the packets.
    assert!(
        per_copy < 0.5,
        "{per_copy:.2} allocations per forwarded copy"
    );
    // The packet in: opened by the relay into a buffer of its own, parsed over that buffer's
    // shared bytes (the header's extension list allocates), shown to rtc's receiving interceptors.
    assert!(
        one < 12.0,
        "{one:.1} allocations per packet with one subscriber"
    );
}
