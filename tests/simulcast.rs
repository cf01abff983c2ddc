//! Simulcast at the relay, with real webrtc-rs peers: a publisher sends three rid layers (q, h, f),
//! each subscriber receives the one it asked for (`setVideoQuality`), moves to another only at a
//! keyframe of it, and its stream stays one contiguous stream across the move (one SSRC, sequence
//! numbers without a gap, timestamps that go on).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::rtc_client::{MediaClient, Publish};
use common::*;
use serde_json::json;

const SLICE: Duration = Duration::from_millis(5);
/// A keyframe every this many frames, on every layer.
const GOP: u16 = 15;

/// Packet `i` of layer `layer`: a VP8 payload descriptor (start of partition 0), the frame header
/// (key or inter frame), then `L<layer> <i>` so the receiver can tell what it got.
/// `len` bytes in all.
fn vp8_sized(layer: u32, i: u16, len: usize) -> Bytes {
    let key = i.is_multiple_of(GOP);
    // X=1 S=1; I=1 L=1: a 15-bit picture id and TL0PICIDX, each layer numbering its frames on
    // its own (as an encoder's simulcast streams do).
    let pid = (layer as u16 * 10_000 + i) & 0x7fff;
    let tl0 = (layer as u16 * 80 + i) as u8;
    let mut v = vec![0x90, 0xc0, 0x80 | (pid >> 8) as u8, pid as u8, tl0];
    v.push(if key { 0x9c } else { 0x9d });
    v.extend_from_slice(format!("L{layer} {i:06}").as_bytes());
    v.resize(len, 0);
    Bytes::from(v)
}

/// (layer, frame index) of a received media packet; `None` for the relay's padding (a probe of
/// the subscriber's downlink: no payload, a sequence number of the stream's own).
fn media(p: &rtc::rtp::Packet) -> Option<(u32, u16)> {
    (!p.payload.is_empty()).then(|| what(p))
}

/// (layer, frame index) of a received payload.
fn what(p: &rtc::rtp::Packet) -> (u32, u16) {
    let s = std::str::from_utf8(&p.payload[6..15]).unwrap();
    (s[1..2].parse().unwrap(), s[3..].parse().unwrap())
}

/// The picture id and TL0PICIDX a subscriber received in a packet's VP8 payload descriptor.
fn picture(p: &rtc::rtp::Packet) -> (u16, u8) {
    let b = &p.payload;
    (u16::from_be_bytes([b[2] & 0x7f, b[3]]), b[4])
}

struct Room {
    publ: MediaClient,
    subs: Vec<MediaClient>,
    publisher: String,
}

impl Room {
    /// A relayed room: a simulcast publisher and `n` subscribers, all connected.
    async fn new(s: &TestServer, n: usize) -> Room {
        let mut a = Client::joined_hello(s.addr, "publisher").await;
        let room = a.create_room(json!({"mode": "relay"})).await;
        a.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        let publisher = a.user_id.clone();
        let local = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let publ = MediaClient::connect_full(
            a,
            Publish::Simulcast,
            0x5100_0000,
            false,
            Vec::new(),
            None,
            local(),
        )
        .await;
        let mut subs = Vec::new();
        for i in 0..n {
            let mut b = Client::joined_hello(s.addr, &format!("subscriber{i}")).await;
            b.request("joinRoom", json!({"roomId": room}))
                .await
                .unwrap();
            b.request("subscribe", json!({"userId": publisher}))
                .await
                .unwrap();
            subs.push(
                MediaClient::connect_full(b, false, 1, false, Vec::new(), None, local()).await,
            );
        }
        let mut room = Room {
            publ,
            subs,
            publisher,
        };
        for _ in 0..1000 {
            room.pump().await;
            if room.publ.connected && room.subs.iter().all(|s| s.connected) {
                return room;
            }
        }
        panic!("relay connections did not come up");
    }

    async fn pump(&mut self) {
        self.publ.pump(SLICE).await;
        for s in self.subs.iter_mut() {
            s.pump(SLICE).await;
        }
    }

    /// Frames `frames` on all three layers, one packet each.
    async fn send(&mut self, frames: std::ops::Range<u16>) {
        self.send_sized(frames, [200; 3]).await;
    }

    /// Frames `frames` on all three layers, one packet each, of `sizes` bytes per layer; then
    /// time for the last to arrive.
    async fn send_sized(&mut self, frames: std::ops::Range<u16>, sizes: [usize; 3]) {
        self.frames(frames, sizes).await;
        for _ in 0..40 {
            self.pump().await;
        }
    }

    /// Frames `frames` on all three layers, one packet each, of `sizes` bytes per layer.
    async fn frames(&mut self, frames: std::ops::Range<u16>, sizes: [usize; 3]) {
        for i in frames {
            for layer in 0..3 {
                let payload = vp8_sized(layer, i, sizes[layer as usize]);
                self.publ.send_layer(layer, i, payload);
            }
            self.pump().await;
        }
    }

    async fn set_quality(&mut self, sub: usize, quality: &str) {
        let publisher = self.publisher.clone();
        self.subs[sub]
            .ws
            .request(
                "setVideoQuality",
                json!({"userId": publisher, "quality": quality}),
            )
            .await
            .unwrap();
    }
}

/// Every change of layer in what a subscriber received is at a keyframe of the new layer.
fn check_switches_at_keyframes(got: &[(u32, u16)]) {
    for w in got.windows(2) {
        if w[0].0 != w[1].0 {
            assert_eq!(w[1].1 % GOP, 0, "a switch at a keyframe: {got:?}");
        }
    }
}

/// One relayed stream, checked: one SSRC, sequence numbers without a gap, timestamps never
/// going back.
fn check_contiguous(received: &[(String, rtc::rtp::Packet)]) {
    let ssrc = received[0].1.header.ssrc;
    for w in received.windows(2) {
        let (a, b) = (&w[0].1.header, &w[1].1.header);
        assert_eq!(b.ssrc, ssrc, "one SSRC for the subscriber's track");
        assert_eq!(
            b.sequence_number,
            a.sequence_number.wrapping_add(1),
            "no gap: {a:?} then {b:?}"
        );
        assert!(
            b.timestamp.wrapping_sub(a.timestamp) < 0x8000_0000,
            "timestamps go on"
        );
    }
    // One packet a frame: picture ids and TL0PICIDX (every frame a base-layer one here) go on by
    // one, across layer switches too, as a decoder expects of one stream.
    let pictures: Vec<((u16, u8), (u32, u16))> = received
        .iter()
        .filter(|(_, p)| !p.payload.is_empty())
        .map(|(_, p)| (picture(p), what(p)))
        .collect();
    for w in pictures.windows(2) {
        let ((pa, ta), (pb, tb)) = (w[0].0, w[1].0);
        assert_eq!(
            pb,
            (pa + 1) & 0x7fff,
            "picture ids go on: {:?} then {:?}",
            w[0],
            w[1]
        );
        assert_eq!(
            tb,
            ta.wrapping_add(1),
            "TL0PICIDX goes on: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscriber_receives_its_layer_and_switches_at_a_keyframe() {
    let s = spawn(test_config()).await;
    let mut room = Room::new(&s, 3).await;
    room.set_quality(0, "low").await;
    room.set_quality(1, "medium").await;
    // Subscriber 2 asks for nothing: the highest layer. Each route starts at the lowest and
    // climbs as its subscriber's downlink estimate (its transport-cc feedback, the relay's
    // probes) allows: about three seconds of frames.
    room.send(0..150).await;
    for (sub, layer) in [(0, 0), (1, 1), (2, 2)] {
        let got: Vec<(u32, u16)> = room.subs[sub]
            .received
            .iter()
            .filter_map(|(_, p)| media(p))
            .collect();
        assert!(!got.is_empty(), "subscriber {sub} received nothing");
        // A route starts lower and moves up, always at a keyframe. (Its very first keyframe may reach the
        // subscriber before it has taken the relay's offer of the track, and be dropped there:
        // the first packet it keeps is not always a keyframe.)
        check_switches_at_keyframes(&got);
        assert!(
            got[got.len() - 20..].iter().all(|(l, _)| *l == layer),
            "subscriber {sub} settles on layer {layer}: {got:?}"
        );
        check_contiguous(&room.subs[sub].received);
    }
    // Subscriber 2 goes down to the lowest: it keeps the highest until the lowest's next
    // keyframe, then only the lowest, as one stream.
    room.set_quality(2, "low").await;
    let before = room.subs[2].received.len();
    room.send(150..190).await;
    let got: Vec<(u32, u16)> = room.subs[2].received[before..]
        .iter()
        .filter_map(|(_, p)| media(p))
        .collect();
    let switch = got
        .iter()
        .position(|(l, _)| *l == 0)
        .expect("switched down");
    assert!(got[..switch].iter().all(|(l, _)| *l == 2), "{got:?}");
    assert!(got[switch..].iter().all(|(l, _)| *l == 0), "{got:?}");
    assert_eq!(
        got[switch].1 % GOP,
        0,
        "at a keyframe of the new layer: {got:?}"
    );
    check_contiguous(&room.subs[2].received);
    // Off: nothing more.
    room.set_quality(0, "off").await;
    let before = room.subs[0].received.len();
    room.send(190..210).await;
    assert_eq!(room.subs[0].received.len(), before, "off receives no video");
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(
        metric(&m, "ferry_layer_switches_total{direction=\"down\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "ferry_layer_switches_total{direction=\"up\"}").unwrap_or(0.0) >= 3.0,
        "each route's first layer counts as up: {m}"
    );
}

/// A subscriber that negotiated no transport-cc but sends REMB (its receiver's own estimate, as
/// a `goog-remb` client does): its layer follows the REMB. Low, it stays on the lowest layer
/// (longer than the relay waits for transport-cc feedback before it gives up on an estimate);
/// high, it climbs to the full layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_without_transport_cc_follows_its_remb() {
    common::rtc_client::without_transport_cc();
    let s = spawn(test_config()).await;
    let mut room = Room::new(&s, 1).await;
    // Layers of 100, 600 and 1200 bytes a frame; at the 40-100 frames/s of this loop, 32-80 k,
    // 190-480 k and 380-960 k bits/s.
    let sizes = [100, 600, 1200];
    let layers = |room: &Room, from: usize| -> Vec<u32> {
        room.subs[0].received[from..]
            .iter()
            .filter_map(|(_, p)| media(p))
            .map(|(l, _)| l)
            .collect()
    };
    // Low: the lowest layer only, for longer than the 3 s a connection is given to send
    // transport-cc feedback (the relay would fall back to its receiver reports: no loss, the
    // full layer).
    let mut frame = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        room.subs[0].send_remb(100_000.0);
        room.frames(frame..frame + 30, sizes).await;
        frame += 30;
    }
    let low = layers(&room, 0);
    assert!(low.len() > 100, "received {} packets", low.len());
    assert!(
        low[low.len() - 60..].iter().all(|l| *l == 0),
        "100 kbit/s: the lowest layer: {low:?}"
    );
    // High: the full layer, at one of its keyframes.
    let before = room.subs[0].received.len();
    for _ in 0..6 {
        room.subs[0].send_remb(10_000_000.0);
        room.frames(frame..frame + 30, sizes).await;
        frame += 30;
    }
    room.send_sized(frame..frame + 1, sizes).await;
    let high = layers(&room, before);
    assert!(
        high[high.len() - 20..].iter().all(|l| *l == 2),
        "10 Mbit/s: the full layer: {high:?}"
    );
    check_contiguous(&room.subs[0].received);
}

/// `setVideoQuality` refuses what it cannot apply, with a clear error and nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_video_quality_refuses_bad_input() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    let err = a
        .request("setVideoQuality", json!({"userId": "x", "quality": "low"}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "not_in_room", "{err:?}");
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut b = Client::joined_hello(s.addr, "b").await;
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let err = a
        .request(
            "setVideoQuality",
            json!({"userId": b.user_id, "quality": "ultra"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.0, "bad_request", "{err:?}");
    let err = a
        .request(
            "setVideoQuality",
            json!({"userId": "nobody", "quality": "low"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.0, "target_not_found", "{err:?}");
    let me = a.user_id.clone();
    let err = a
        .request("setVideoQuality", json!({"userId": me, "quality": "low"}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "target_not_found", "{err:?}");
    a.request(
        "setVideoQuality",
        json!({"userId": b.user_id, "quality": "off"}),
    )
    .await
    .expect("a member of the room");
}
