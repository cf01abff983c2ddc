//! The relay with real WebRTC peers (webrtc-rs `rtc`) and no browser: payloads, SSRC rewrite,
//! sequence numbers, keyframe requests, NACK repair, and a publisher leaving.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::rtc_client::{MediaClient, RoomSockets, relay_room_on};
use common::*;
use ferry::config::Config;
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use serde_json::json;

const SLICE: Duration = Duration::from_millis(5);

fn payload(i: u16) -> Bytes {
    Bytes::from(format!("ferry-payload-{i:06}-").repeat(24))
}

/// A relayed room with a publisher and a subscriber of its tracks, both connected to the relay.
async fn relayed_pair(s: &TestServer) -> (MediaClient, MediaClient) {
    relay_room(s, true, false).await
}

/// Send `n` packets starting at `first`, pumping both sides, then let them settle.
async fn stream(publ: &mut MediaClient, sub: &mut MediaClient, first: u16, n: u16) {
    for i in first..first + n {
        publ.send(i, payload(i));
        publ.pump(SLICE).await;
        sub.pump(SLICE).await;
    }
    settle(publ, sub, 100).await;
}

/// Pump both sides for `rounds` slices each.
async fn settle(publ: &mut MediaClient, sub: &mut MediaClient, rounds: usize) {
    for _ in 0..rounds {
        publ.pump(SLICE).await;
        sub.pump(SLICE).await;
    }
}

/// The payload indices the subscriber received, checked packet by packet: intact payload, one
/// SSRC that is not the publisher's, sequence number in step with the payload.
fn check_received(sub: &MediaClient, publisher_ssrc: u32) -> Vec<u16> {
    assert!(!sub.received.is_empty(), "nothing relayed");
    let ssrc = sub.received[0].1.header.ssrc;
    assert_ne!(ssrc, publisher_ssrc, "SSRC rewritten per subscriber");
    let mut indices = Vec::new();
    let first = &sub.received[0].1;
    let first_idx: u16 = std::str::from_utf8(&first.payload[14..20])
        .unwrap()
        .parse()
        .unwrap();
    let seq_offset = first.header.sequence_number.wrapping_sub(first_idx);
    for (_, p) in &sub.received {
        assert_eq!(p.header.ssrc, ssrc, "one SSRC per relayed track");
        let idx: u16 = std::str::from_utf8(&p.payload[14..20])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(p.payload, payload(idx), "payload intact");
        assert_eq!(
            p.header.sequence_number,
            idx.wrapping_add(seq_offset),
            "sequence numbers follow the publisher's without gaps"
        );
        indices.push(idx);
    }
    indices.sort_unstable();
    indices.dedup();
    indices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_payloads_arrive_intact_with_rewritten_ssrc() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 300).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    // Everything from the first relayed packet on arrived, none missing.
    let (lo, hi) = (got[0], *got.last().unwrap());
    assert_eq!(hi, 299);
    assert_eq!(got.len(), usize::from(hi - lo + 1), "no gaps: {got:?}");
    assert!(got.len() > 200, "relayed {} of 300", got.len());
    // The subscriber joined mid-stream: the publisher was asked for a keyframe.
    assert!(
        publ.keyframe_requests >= 1,
        "no keyframe request reached the publisher"
    );
    assert!(
        sub.tracks
            .values()
            .any(|ids| ids.iter().any(|i| i.ends_with("~cam"))),
        "{:?}",
        sub.tracks
    );
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(
        metric(
            &m,
            "ferry_media_packets_total{direction=\"out\",kind=\"video\"}"
        )
        .unwrap()
            >= got.len() as f64
    );
    assert_eq!(
        metric(&m, "ferry_peer_connections{state=\"connected\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_peer_connections{state=\"new\"}"),
        Some(0.0),
        "{m}"
    );
    // Every packet in (300, less the few before the route existed) got a latency sample.
    let samples = metric(&m, "ferry_forward_latency_seconds_count").unwrap();
    assert!(samples >= got.len() as f64, "{samples} latency samples");
    let under_1ms = metric(&m, "ferry_forward_latency_seconds_bucket{le=\"0.001\"}").unwrap();
    eprintln!("forwarding latency: {under_1ms} of {samples} packets under 1 ms (debug build)");
    // Both connections negotiated AES-GCM: the relay sealed the relayed packets itself.
    assert_eq!(
        metric(&m, "ferry_srtp_sessions_total{sealer=\"relay\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_srtp_sessions_total{sealer=\"rtc\"}"),
        Some(0.0)
    );
    // ...and the profile they chose is counted (webrtc-rs offers AES-128-GCM first).
    assert_eq!(
        metric(&m, "ferry_srtp_profiles_total{profile=\"aes128-gcm\"}"),
        Some(2.0),
        "{m}"
    );
    // ...and sent sender reports for the relayed track, counting what it sent.
    let relayed_ssrc = sub.received[0].1.header.ssrc;
    let reports: Vec<_> = sub
        .sender_reports
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.0 == relayed_ssrc)
        .copied()
        .collect();
    assert!(reports.len() >= 2, "sender reports: {reports:?}");
    let last = reports.last().unwrap();
    assert!(
        last.1 > 0 && last.1 as usize <= got.len(),
        "packet count {} of {} sent",
        last.1,
        got.len()
    );
    assert!(
        reports.windows(2).all(|w| w[1].1 >= w[0].1),
        "counts grow: {reports:?}"
    );
}

/// The relay opens a publisher's packets itself once rtc's pipeline delivered the stream's first
/// one: what it forwards is the same, the publisher still gets transport-wide CC feedback and
/// receiver reports for everything it sent, and replayed or forged packets are refused, counted
/// and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_opens_published_media_itself_and_refuses_replays() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 300).await;
    let publisher_ssrc = publ.sender.unwrap().1;
    let got = check_received(&sub, publisher_ssrc);
    assert_eq!(*got.last().unwrap(), 299);
    let (_, m) = http_get(s.addr, "/metrics").await;
    let by_relay = metric(&m, "ferry_srtp_opened_total{by=\"relay\"}").unwrap();
    let by_rtc = metric(&m, "ferry_srtp_opened_total{by=\"rtc\"}").unwrap();
    let video_in = metric(
        &m,
        "ferry_media_packets_total{direction=\"in\",kind=\"video\"}",
    )
    .unwrap();
    assert!(
        by_relay >= 290.0,
        "opened by the relay: {by_relay} (rtc: {by_rtc})"
    );
    assert!((1.0..=5.0).contains(&by_rtc), "opened by rtc: {by_rtc}");
    assert_eq!(by_relay + by_rtc, video_in, "every packet in opened once");
    // Feedback for what the relay opened itself: receiver reports up to the last packets sent,
    // without losses, and transport-wide CC feedback covering them.
    let reports = publ.reception_reports.lock().unwrap().clone();
    let ours: Vec<_> = reports.iter().filter(|r| r.0 == publisher_ssrc).collect();
    let last = ours
        .last()
        .unwrap_or_else(|| panic!("no reception report: {reports:?}"));
    assert!(
        last.1 >= 280 && last.1 <= 299,
        "highest sequence reported: {last:?}"
    );
    assert_eq!(last.2, 0, "nothing lost: {last:?}");
    let statuses: u32 = publ
        .twcc_feedback
        .lock()
        .unwrap()
        .iter()
        .map(|n| u32::from(*n))
        .sum();
    assert!(
        statuses >= 250,
        "transport-cc feedback on {statuses} packets"
    );

    // Replays of packets the relay already opened: refused, none forwarded again.
    let received = sub.received.len();
    let undecryptable =
        |m: &str| metric(m, "ferry_media_dropped_total{reason=\"undecryptable\"}").unwrap();
    let before = undecryptable(&m);
    let replays: Vec<Vec<u8>> = publ.sent_rtp.iter().rev().take(20).cloned().collect();
    for d in &replays {
        publ.send_raw(d).await;
    }
    // A forged packet: the next sequence number, one payload byte changed.
    let mut forged = publ.sent_rtp.last().unwrap().clone();
    forged[2..4].copy_from_slice(&300u16.to_be_bytes());
    let n = forged.len();
    forged[n - 30] ^= 0x40;
    publ.send_raw(&forged).await;
    settle(&mut publ, &mut sub, 40).await;
    assert_eq!(
        sub.received.len(),
        received,
        "a replayed or forged packet was forwarded"
    );
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        undecryptable(&m) - before,
        21.0,
        "20 replays and a forgery refused"
    );
    // The genuine packet 300 and those after it still go through.
    stream(&mut publ, &mut sub, 300, 20).await;
    let got = check_received(&sub, publisher_ssrc);
    assert!(
        (300..320).all(|i| got.binary_search(&i).is_ok()),
        "after the replays: {got:?}"
    );
}

/// Chrome's first choice, AES_CM_128_HMAC_SHA1_80: sealed by the relay as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_cm_connections_are_sealed_by_the_relay_too() {
    let s = spawn(test_config()).await;
    let profiles = vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80];
    let (mut publ, mut sub) = relay_room_offering(&s, true, false, profiles).await;
    stream(&mut publ, &mut sub, 0, 300).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    let (lo, hi) = (got[0], *got.last().unwrap());
    assert_eq!(hi, 299);
    assert_eq!(got.len(), usize::from(hi - lo + 1), "no gaps: {got:?}");
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_srtp_sessions_total{sealer=\"relay\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "ferry_srtp_profiles_total{profile=\"aes128-cm-sha1-80\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_srtp_profiles_total{profile=\"aes128-gcm\"}"),
        Some(0.0),
        "{m}"
    );
}

/// The relay offers no profile it cannot seal itself: a client offering only
/// AES_CM_128_HMAC_SHA1_32 (no browser does) has no profile in common and never connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offering_only_hmac_sha1_32_does_not_connect() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "publisher").await;
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let profiles = vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32];
    let mut publ = MediaClient::connect_offering(a, true, 7, false, profiles).await;
    publ.pump(Duration::from_secs(3)).await;
    assert!(!publ.connected);
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_peer_connections{state=\"connected\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_srtp_sessions_total{sealer=\"relay\"}"),
        Some(0.0)
    );
    // The same client offering HMAC_SHA1_80 as well connects (see the test above for media).
    let mut b = Client::joined_hello(s.addr, "publisher2").await;
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let profiles = vec![
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32,
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
    ];
    let mut publ2 = MediaClient::connect_offering(b, true, 8, false, profiles).await;
    for _ in 0..200 {
        publ2.pump(SLICE).await;
        if publ2.connected {
            break;
        }
    }
    assert!(publ2.connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_on_the_subscriber_leg_is_repaired_by_nack() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    // Let the route come up, then drop every 7th packet on the way into the subscriber.
    stream(&mut publ, &mut sub, 0, 50).await;
    let before = sub.received.len();
    sub.drop_every = 7;
    stream(&mut publ, &mut sub, 50, 300).await;
    assert!(sub.dropped >= 30, "induced loss: {} dropped", sub.dropped);
    // A loss is detected when a later packet arrives: end with a few that are not dropped.
    sub.drop_every = 0;
    stream(&mut publ, &mut sub, 350, 5).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    let missing: Vec<u16> = (50..350)
        .filter(|i| got.binary_search(i).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} dropped, {} packets received after the loss started, still missing {missing:?}",
        sub.dropped,
        sub.received.len() - before
    );
    let (_, m) = http_get(s.addr, "/metrics").await;
    let nacks = metric(&m, "ferry_nacks_total{direction=\"received\"}").unwrap_or(0.0);
    let resent = metric(&m, "ferry_retransmits_total").unwrap_or(0.0);
    assert!(nacks >= 1.0, "subscriber NACKs counted: {nacks}");
    // Answered by the relay's own path (AES-GCM), from the publisher's history.
    assert_eq!(
        metric(&m, "ferry_srtp_sessions_total{sealer=\"relay\"}"),
        Some(2.0)
    );
    assert!(
        resent >= 30.0,
        "{} lost at the subscriber, {resent} retransmitted",
        sub.dropped
    );
}

#[tokio::test]
async fn loss_on_the_publisher_leg_is_nacked_upstream() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 50).await;
    // Every 5th datagram the publisher sends is lost on its way to the relay.
    publ.drop_sent_every = 5;
    stream(&mut publ, &mut sub, 50, 300).await;
    publ.drop_sent_every = 0;
    stream(&mut publ, &mut sub, 350, 5).await;
    assert!(
        publ.dropped_sent >= 50,
        "induced uplink loss: {}",
        publ.dropped_sent
    );
    let got = check_received(&sub, publ.sender.unwrap().1);
    let missing: Vec<u16> = (50..350)
        .filter(|i| got.binary_search(i).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost on the publisher leg, still missing at the subscriber: {missing:?}",
        publ.dropped_sent
    );
    let (_, m) = http_get(s.addr, "/metrics").await;
    let sent = metric(&m, "ferry_nacks_total{direction=\"sent\"}").unwrap_or(0.0);
    assert!(sent >= 1.0, "NACKs sent to the publisher: {sent}");
}

/// The direction the server's latest offer gives its video section ("sendonly" while it relays a
/// track to us).
fn video_direction(sub: &MediaClient) -> String {
    let sdp = sub.server_offers.last().expect("a server offer");
    let video = sdp.split("m=video").nth(1).expect("a video section");
    let video = video.split("\r\nm=").next().unwrap();
    ["sendonly", "sendrecv", "recvonly", "inactive"]
        .iter()
        .find(|d| video.contains(&format!("a={d}")))
        .map(|d| d.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_leaving_removes_its_track() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 100).await;
    assert!(!sub.received.is_empty());
    let dir = video_direction(&sub);
    assert_eq!(
        dir, "sendonly",
        "the relay only sends on the video section it offers"
    );
    // Every m-section that carries a relayed stream says so (the relay never receives on it).
    let offer = sub.server_offers.last().unwrap();
    for section in offer.split("\r\nm=").skip(1) {
        if section.contains("a=msid:") {
            assert!(section.contains("a=sendonly"), "m={section}");
        }
    }
    let offers = sub.server_offers.len();
    publ.ws.request("leaveRoom", json!({})).await.unwrap();
    for _ in 0..400 {
        sub.pump(SLICE).await;
        if sub.server_offers.len() > offers {
            break;
        }
    }
    assert!(
        sub.server_offers.len() > offers,
        "no renegotiation after the publisher left"
    );
    // The server no longer sends that track: the video section is not sending any more.
    let dir = video_direction(&sub);
    assert!(dir == "recvonly" || dir == "inactive", "video still {dir}");
    assert!(
        !sub.server_offers.last().unwrap().contains("a=msid:"),
        "a relayed stream is still announced"
    );
    assert_eq!(s.hub.metrics.relay_connections.get(), 1);
}

/// A relay room with a publisher and a member that has not subscribed yet, both connected.
async fn unsubscribed_pair(s: &TestServer, extensions: bool) -> (MediaClient, MediaClient) {
    relay_room(s, false, extensions).await
}

/// A relay room with a publisher and a second member (subscribed to the publisher before
/// connecting when `subscribed`), both connected to the relay.
async fn relay_room(
    s: &TestServer,
    subscribed: bool,
    extensions: bool,
) -> (MediaClient, MediaClient) {
    relay_room_offering(s, subscribed, extensions, Vec::new()).await
}

/// As [`relay_room`], both peers offering only these SRTP protection profiles.
async fn relay_room_offering(
    s: &TestServer,
    subscribed: bool,
    extensions: bool,
    profiles: Vec<SrtpProtectionProfile>,
) -> (MediaClient, MediaClient) {
    let (publ, sub, _) = relay_room_in(s, subscribed, extensions, profiles).await;
    (publ, sub)
}

/// As [`relay_room_offering`], with the room's id.
async fn relay_room_in(
    s: &TestServer,
    subscribed: bool,
    extensions: bool,
    profiles: Vec<SrtpProtectionProfile>,
) -> (MediaClient, MediaClient, String) {
    let sockets = RoomSockets {
        publisher: None,
        subscriber: None,
    };
    relay_room_on(s.addr, subscribed, extensions, profiles, sockets).await
}

/// The relay's data channel (the one a member who publishes nothing opens the connection with)
/// opens, and the relay's answer limits its messages to what it keeps a buffer for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_data_channel_opens_with_a_small_message_limit() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = unsubscribed_pair(&s, false).await;
    for _ in 0..400 {
        if sub.data_channels_open > 0 {
            break;
        }
        settle(&mut publ, &mut sub, 1).await;
    }
    assert_eq!(sub.data_channels_open, 1, "the data channel did not open");
    let answer = &sub.pc.remote_description().expect("the relay's answer").sdp;
    let limit = format!(
        "a=max-message-size:{}",
        ferry::media::SCTP_MAX_MESSAGE_BYTES
    );
    assert!(
        answer.contains(&limit),
        "{limit} not in the answer:\n{answer}"
    );
}

fn index_of(p: &rtc::rtp::Packet) -> u16 {
    std::str::from_utf8(&p.payload[14..20])
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_explicit_and_can_be_undone() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = unsubscribed_pair(&s, false).await;
    stream(&mut publ, &mut sub, 0, 40).await;
    assert!(sub.received.is_empty(), "relayed before any subscribe");
    assert!(sub.tracks.is_empty());

    let publisher = publ.ws.user_id.clone();
    sub.ws
        .request(
            "subscribe",
            json!({"userId": publisher, "streamType": "cam"}),
        )
        .await
        .unwrap();
    stream(&mut publ, &mut sub, 40, 100).await;
    let got = check_received(&sub, 0x0bad_cafe);
    assert!(
        (60..140).all(|i| got.binary_search(&i).is_ok()),
        "after subscribe: {got:?}"
    );
    // Only the camera was asked for: a 'screen' unsubscribe changes nothing.
    sub.ws
        .request(
            "unsubscribe",
            json!({"userId": publisher, "streamType": "screen"}),
        )
        .await
        .unwrap();
    stream(&mut publ, &mut sub, 140, 20).await;
    assert!(check_received(&sub, 0x0bad_cafe).contains(&159));

    let offers = sub.server_offers.len();
    sub.ws
        .request("unsubscribe", json!({"userId": publisher}))
        .await
        .unwrap();
    for _ in 0..400 {
        sub.pump(SLICE).await;
        if sub.server_offers.len() > offers {
            break;
        }
    }
    assert!(sub.server_offers.len() > offers, "no renegotiation");
    let dir = video_direction(&sub);
    assert!(dir == "recvonly" || dir == "inactive", "video still {dir}");
    let before = sub.received.len();
    stream(&mut publ, &mut sub, 160, 40).await;
    assert_eq!(
        sub.received.len(),
        before,
        "still relayed after unsubscribe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_track_continues_on_the_same_subscriber_track() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 100).await;
    let tracks_before = sub.tracks.len();
    // The publisher drops its relay connection and publishes again on a fresh one: new SSRC,
    // new sequence numbers.
    let mut ws = publ.into_ws();
    ws.request("bye", json!({"to": "server"})).await.unwrap();
    let mut publ = MediaClient::connect_with(ws, true, 0x5eed_f00d, false).await;
    for _ in 0..1000 {
        publ.pump(SLICE).await;
        sub.pump(SLICE).await;
        if publ.connected {
            break;
        }
    }
    assert!(publ.connected, "second relay connection");
    for i in 100..300u16 {
        publ.send(40_000 + i, payload(i));
        publ.pump(SLICE).await;
        sub.pump(SLICE).await;
    }
    settle(&mut publ, &mut sub, 100).await;
    assert_eq!(
        sub.tracks.len(),
        tracks_before,
        "the subscriber got a new track instead of the old one continuing"
    );
    let ssrc = sub.received[0].1.header.ssrc;
    let mut by_seq: Vec<(u16, u16)> = sub
        .received
        .iter()
        .map(|(_, p)| {
            assert_eq!(p.header.ssrc, ssrc, "one SSRC across the republish");
            assert_eq!(p.payload, payload(index_of(p)), "payload intact");
            (p.header.sequence_number, index_of(p))
        })
        .collect();
    by_seq.sort_unstable();
    by_seq.dedup();
    assert!(
        by_seq.iter().any(|(_, i)| *i >= 290),
        "the republished track is not relayed"
    );
    for w in by_seq.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "sequence numbers contiguous across the republish: {:?} then {:?}",
            w[0],
            w[1]
        );
        assert!(w[1].1 > w[0].1, "payload order {:?} then {:?}", w[0], w[1]);
    }
}

/// The publisher's end-to-end extensions reach the subscriber under the subscriber's own IDs;
/// transport-cc is per leg: the subscriber gets the relay's own transport-wide numbering (what
/// its feedback, and so its bandwidth estimate, is about), never the publisher's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_extensions_are_remapped_to_the_subscribers_ids() {
    use common::rtc_client::{TEST_EXTENSIONS, extmap_id};
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = unsubscribed_pair(&s, true).await;
    sub.ws
        .request("subscribe", json!({"userId": publ.ws.user_id}))
        .await
        .unwrap();
    let pub_sdp = publ.pc.local_description().unwrap().sdp;
    let pub_ids: Vec<u8> = TEST_EXTENSIONS
        .iter()
        .map(|u| extmap_id(&pub_sdp, u).expect("negotiated on the publisher leg"))
        .collect();
    let twcc = extmap_id(
        &pub_sdp,
        "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    );
    let capture = Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let orientation = Bytes::from_static(&[0x03]);
    publ.send_extensions = vec![
        (pub_ids[0], capture.clone()),
        (pub_ids[1], orientation.clone()),
    ];
    // transport-cc belongs to the publisher's leg: never forwarded.
    if let Some(id) = twcc {
        publ.send_extensions.push((id, Bytes::from_static(&[0, 7])));
    }
    stream(&mut publ, &mut sub, 0, 120).await;
    let sub_sdp = sub.server_offers.last().expect("a server offer").clone();
    let sub_ids: Vec<u8> = TEST_EXTENSIONS
        .iter()
        .map(|u| extmap_id(&sub_sdp, u).expect("offered to the subscriber"))
        .collect();
    assert_ne!(
        pub_ids, sub_ids,
        "the legs' IDs must differ for this test to mean anything"
    );
    let got = check_received(&sub, 0x0bad_cafe);
    assert!(got.len() > 60, "{got:?}");
    let sub_twcc = extmap_id(
        &sub_sdp,
        "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    )
    .expect("transport-cc offered to the subscriber");
    let mut transport_seqs = Vec::new();
    for (_, p) in &sub.received {
        let mut exts: Vec<(u8, Bytes)> = p
            .header
            .extensions
            .iter()
            .filter(|e| e.id != sub_twcc)
            .map(|e| (e.id, e.payload.clone()))
            .collect();
        exts.sort();
        let mut want = vec![
            (sub_ids[0], capture.clone()),
            (sub_ids[1], orientation.clone()),
        ];
        want.sort();
        assert_eq!(
            exts, want,
            "extensions under the subscriber's IDs, nothing else"
        );
        let seq = p
            .header
            .extensions
            .iter()
            .find(|e| e.id == sub_twcc)
            .map(|e| u16::from_be_bytes([e.payload[0], e.payload[1]]))
            .expect("every packet carries the relay's own transport-wide sequence number");
        transport_seqs.push(seq);
    }
    // The relay's numbering of this subscriber's downlink, not the publisher's value (0, 7).
    assert!(
        transport_seqs
            .windows(2)
            .all(|w| w[1] == w[0].wrapping_add(1)),
        "{transport_seqs:?}"
    );
}

/// The server's media port in a relay connection's remote description (its host candidate).
fn server_media_port(c: &MediaClient) -> u16 {
    let sdp = &c.pc.remote_description().expect("answered").sdp;
    let line = sdp
        .lines()
        .find(|l| l.starts_with("a=candidate"))
        .unwrap_or_else(|| panic!("no candidate in {sdp}"));
    line.split_whitespace().nth(5).unwrap().parse().unwrap()
}

/// With two media shards, rooms are spread over them (each shard a thread and a UDP port of its
/// own) and each room's media flows through its shard, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_spread_over_media_shards() {
    shards_carry_their_rooms(test_config()).await;
}

/// The same with the media ports bound to 0.0.0.0 and announced (docs/deploy.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_spread_over_wildcard_bound_media_shards() {
    shards_carry_their_rooms(Config {
        media_listen: "0.0.0.0:0".parse().unwrap(),
        announce: vec!["127.0.0.1".parse().unwrap()],
        ..test_config()
    })
    .await;
}

async fn shards_carry_their_rooms(mut cfg: Config) {
    cfg.media_shards = 2;
    let s = spawn(cfg).await;
    let (mut p1, mut s1) = relayed_pair(&s).await;
    let (mut p2, mut s2) = relayed_pair(&s).await;
    let (port1, port2) = (server_media_port(&p1), server_media_port(&p2));
    assert_eq!(port1, server_media_port(&s1), "a room stays on one shard");
    assert_eq!(port2, server_media_port(&s2), "a room stays on one shard");
    assert_ne!(port1, port2, "the second room went to the idle shard");
    assert!(
        [port1, port2].contains(&s.media_addr.port()),
        "shard 0 is the advertised STUN port"
    );
    // Both shards report into the same metrics.
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_peer_connections{state=\"connected\"}"),
        Some(4.0),
        "{m}"
    );
    stream(&mut p1, &mut s1, 0, 200).await;
    stream(&mut p2, &mut s2, 0, 200).await;
    for (p, sub) in [(&p1, &s1), (&p2, &s2)] {
        let got = check_received(sub, p.sender.unwrap().1);
        assert_eq!(*got.last().unwrap(), 199);
        assert!(got.len() > 120, "relayed {} of 200", got.len());
    }
}

/// Datagrams that look like SRTP and SRTCP, each of a new SSRC, with bytes where the tag should
/// be, from a member's own (connected) address.
fn forged_media(n: u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let ssrc = 0x5000_0000u32.wrapping_add(i.wrapping_mul(7919));
        let mut rtp = vec![0x80, 96];
        rtp.extend_from_slice(&(i as u16).to_be_bytes());
        rtp.extend_from_slice(&(i * 3000).to_be_bytes());
        rtp.extend_from_slice(&ssrc.to_be_bytes());
        rtp.extend((0..120u32).map(|b| (b * 31 + i) as u8));
        out.push(rtp);
        // A receiver report, the E flag and an index, and 16 bytes of "tag".
        let mut rtcp = vec![0x81, 201, 0, 7];
        rtcp.extend_from_slice(&ssrc.to_be_bytes());
        rtcp.extend((0..24u32).map(|b| (b * 17 + i) as u8));
        rtcp.extend_from_slice(&[0x80, 0, 0, 1]);
        rtcp.extend((0..16u32).map(|b| (b * 13 + i) as u8));
        out.push(rtcp);
    }
    out
}

fn dropped(m: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!("ferry_media_dropped_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// A connected member sending SRTP and SRTCP of ever new SSRCs that do not authenticate: each is
/// refused and counted before rtc sees it (rtc would keep a context per SSRC until the connection
/// closed), and the member's real media still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_media_of_new_ssrcs_is_refused_before_the_connection_keeps_it() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 20).await;
    let (_, m) = http_get(s.addr, "/metrics").await;
    let before = dropped(&m, "undecryptable");
    let forged = forged_media(300);
    for d in &forged {
        publ.send_raw(d).await;
    }
    settle(&mut publ, &mut sub, 40).await;
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        dropped(&m, "undecryptable") - before,
        forged.len() as f64,
        "every forged packet refused and counted"
    );
    stream(&mut publ, &mut sub, 20, 20).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    assert!(
        (20..40).all(|i| got.binary_search(&i).is_ok()),
        "after the forgeries: {got:?}"
    );
}

/// The value of `a=<attr>:` in an SDP.
fn sdp_attr(sdp: &str, attr: &str) -> String {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("a={attr}:")))
        .unwrap_or_else(|| panic!("no a={attr} in {sdp}"))
        .to_string()
}

/// An ICE check with the relay connection's ufrag (in the clear in every check) but a
/// MESSAGE-INTEGRITY not made with its password teaches the relay nothing: what then comes from
/// that address is from an unknown peer. The same check signed with the password does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ice_check_with_a_forged_integrity_teaches_the_relay_no_address() {
    use rtc::crypto::RTCCryptoProvider;
    use rtc::stun::attributes::ATTR_USERNAME;
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{BINDING_REQUEST, Message, Setter};
    use rtc::stun::textattrs::Username;

    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 5).await;
    let answer = publ.pc.remote_description().unwrap().sdp.clone();
    let (ufrag, pwd) = (sdp_attr(&answer, "ice-ufrag"), sdp_attr(&answer, "ice-pwd"));
    let relay = publ.relay_addr().unwrap();
    let crypto = rtc::crypto::providers::RingProvider::new();
    let check = |password: &str| {
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(rtc::stun::message::TransactionId::new()),
            Box::new(Username::new(ATTR_USERNAME, format!("{ufrag}:attacker"))),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                password.into(),
                crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
        m.raw.clone()
    };
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let junk = forged_media(10);
    let (_, m0) = http_get(s.addr, "/metrics").await;
    attacker
        .send_to(&check("guessed-password"), relay)
        .await
        .unwrap();
    for d in &junk {
        attacker.send_to(d, relay).await.unwrap();
    }
    settle(&mut publ, &mut sub, 20).await;
    let (_, m1) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        dropped(&m1, "unauthenticated") - dropped(&m0, "unauthenticated"),
        1.0
    );
    assert_eq!(
        dropped(&m1, "unknown_peer") - dropped(&m0, "unknown_peer"),
        junk.len() as f64,
        "datagrams after a forged check were taken for the member's"
    );
    // With the password, the address is the member's (and its junk refused by the connection).
    attacker.send_to(&check(&pwd), relay).await.unwrap();
    settle(&mut publ, &mut sub, 10).await;
    for d in &junk {
        attacker.send_to(d, relay).await.unwrap();
    }
    settle(&mut publ, &mut sub, 20).await;
    let (_, m2) = http_get(s.addr, "/metrics").await;
    assert_eq!(dropped(&m2, "unknown_peer"), dropped(&m1, "unknown_peer"));
    assert_eq!(
        dropped(&m2, "undecryptable") - dropped(&m1, "undecryptable"),
        junk.len() as f64
    );
}

/// A member whose token does not grant `publish` and whose offer reached the relay anyway (here
/// put into the shard's queue directly, past signaling's own check): the relay routes nothing of
/// what it sends, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_routes_nothing_from_a_member_without_the_publish_grant() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "viewer").await;
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut b = Client::joined_hello(s.addr, "subscriber").await;
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    b.request("subscribe", json!({"userId": a.user_id}))
        .await
        .unwrap();
    let (hub, user_id, room_id) = (s.hub.clone(), a.user_id.clone(), room.clone());
    let shard = hub.room_shard(&room);
    let deliver = Box::new(move |sdp: String| {
        hub.media(shard)
            .try_send(ferry::media::Command::Offer {
                user_id,
                room_id,
                sdp,
                meta: None,
                join: 1,
                publish: false,
            })
            .unwrap();
    });
    let mut publ = MediaClient::connect_delivering(a, true, deliver).await;
    let mut sub = MediaClient::connect(b, false).await;
    for _ in 0..1000 {
        settle(&mut publ, &mut sub, 1).await;
        if publ.connected && sub.connected {
            break;
        }
    }
    assert!(publ.connected && sub.connected);
    stream(&mut publ, &mut sub, 0, 30).await;
    assert!(sub.received.is_empty(), "relayed without the grant");
    assert!(sub.tracks.is_empty(), "a track opened: {:?}", sub.tracks);
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(dropped(&m, "not_publisher") >= 1.0);
}

/// A member leaves while the shard's command queue is full (here with offers of members who
/// never connect, each of which makes a relay connection): its leave still reaches the relay, so
/// it receives nothing more and its relay connection is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_leaves_while_the_command_queue_is_full_receives_nothing_more() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub, room_id) = relay_room_in(&s, true, false, Vec::new()).await;
    stream(&mut publ, &mut sub, 0, 10).await;
    let shard = s.hub.room_shard(&room_id);
    let sdp = publ.pc.local_description().unwrap().sdp;
    let mut ghosts = 0;
    while s
        .hub
        .media(shard)
        .try_send(ferry::media::Command::Offer {
            user_id: format!("ghost-{ghosts}"),
            room_id: room_id.clone(),
            sdp: sdp.clone(),
            meta: None,
            join: 1,
            publish: false,
        })
        .is_ok()
    {
        ghosts += 1;
    }
    assert!(ghosts > 0);
    sub.ws.request("leaveRoom", json!({})).await.unwrap();
    let received = sub.received.len();
    stream(&mut publ, &mut sub, 10, 30).await;
    // Every ghost's connection made, then the count stays: the publisher's and the ghosts'.
    let mut connections = 0.0;
    for _ in 0..600 {
        let (_, m) = http_get(s.addr, "/metrics").await;
        connections = metric(&m, "ferry_relay_connections").unwrap();
        if connections >= ghosts as f64 + 1.0 && s.hub.media(shard).capacity() == 1024 {
            break;
        }
        settle(&mut publ, &mut sub, 10).await;
    }
    assert_eq!(
        connections,
        ghosts as f64 + 1.0,
        "the leaver's connection was kept"
    );
    stream(&mut publ, &mut sub, 40, 10).await;
    assert_eq!(sub.received.len(), received, "media after leaving");
}

/// STUN binding requests are answered up to a rate per source address: a flood from one address
/// is mostly refused (counted), and another address is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_binding_floods_are_limited_per_source() {
    use rtc::stun::message::{BINDING_REQUEST, Message, Setter};
    let s = spawn(test_config()).await;
    let request = || {
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(rtc::stun::message::TransactionId::new()),
        ])
        .unwrap();
        m.raw.clone()
    };
    let flood = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // In bursts of 50, so that the server's receive buffer does not overflow.
    let sent = 1000;
    for i in 0..sent {
        flood.send_to(&request(), s.media_addr).await.unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut answered = 0;
    let mut buf = [0u8; 1500];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), flood.recv_from(&mut buf)).await
    {
        answered += 1;
    }
    // Counted by the server: replies can be lost in the flooder's own receive buffer.
    let (_, m) = http_get(s.addr, "/metrics").await;
    let limited = dropped(&m, "rate_limited");
    let replied = metric(&m, "ferry_stun_bindings_total").unwrap();
    assert!(
        answered > 0 && replied < (sent / 2) as f64,
        "{replied} of {sent} answered"
    );
    assert_eq!(replied + limited, sent as f64);
    // Another source (127.0.0.2 is loopback too) is answered.
    let other = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(&request(), s.media_addr).await.unwrap();
    let got = tokio::time::timeout(WAIT, other.recv_from(&mut buf)).await;
    assert!(got.is_ok(), "another source was refused");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// The inside-server forwarding latency histogram: (upper bound in seconds, cumulative count).
fn latency_buckets(m: &str) -> Vec<(f64, f64)> {
    m.lines()
        .filter_map(|l| l.strip_prefix("ferry_forward_latency_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((
                le.parse().unwrap_or(f64::INFINITY),
                count.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// The 99th percentile's bucket bound of what was counted between two scrapes.
fn p99_between(before: &str, after: &str) -> f64 {
    let (b, a) = (latency_buckets(before), latency_buckets(after));
    let total = a.last().unwrap().1 - b.last().unwrap().1;
    a.iter()
        .zip(&b)
        .find(|((_, ca), (_, cb))| ca - cb >= 0.99 * total)
        .map_or(f64::INFINITY, |((le, _), _)| *le)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Figures for docs/operations.md, not a check: a connected member of one room floods forged
/// SRTP/SRTCP of new SSRCs for `FLOOD_SECONDS` (default 20) while a member of another room
/// streams to its subscriber; prints the process's RSS growth, the flood's rate, the refusals
/// counted, the CPU per refused packet, and the other room's inside-server p99 before and during
/// the flood; then checks that the flooding member's own media still arrives.
/// `cargo test --release --test media_relay -- --ignored forged_media_flood_figures --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand"]
async fn forged_media_flood_figures() {
    let secs: u64 = std::env::var("FLOOD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    let (mut other_publ, mut other_sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 20).await;
    // The other room alone: its latency without the flood.
    let (_, m0) = http_get(s.addr, "/metrics").await;
    stream(&mut other_publ, &mut other_sub, 0, 200).await;
    let (_, m1) = http_get(s.addr, "/metrics").await;
    let quiet_p99 = p99_between(&m0, &m1);
    let rss0 = rss_kib();
    let cpu0 = cpu_seconds();
    let flood = tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        let mut i = 0u32;
        while start.elapsed() < Duration::from_secs(secs) {
            for d in forged_media(64) {
                // A new SSRC for every packet.
                let mut d = d;
                d[8..12].copy_from_slice(&i.to_be_bytes());
                d[4..8].copy_from_slice(&i.wrapping_mul(31).to_be_bytes());
                i = i.wrapping_add(1);
                publ.send_raw(&d).await;
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        (publ, sent, start.elapsed().as_secs_f64())
    });
    // The other room streams through the flood.
    let (_, m2) = http_get(s.addr, "/metrics").await;
    let mut n: u16 = 200;
    while !flood.is_finished() {
        stream(&mut other_publ, &mut other_sub, n, 50).await;
        n = n.wrapping_add(50);
    }
    let (_, m3) = http_get(s.addr, "/metrics").await;
    let flood_p99 = p99_between(&m2, &m3);
    let (mut publ, sent, elapsed) = flood.await.unwrap();
    let cpu = cpu_seconds() - cpu0;
    settle(&mut publ, &mut sub, 40).await;
    let (_, m) = http_get(s.addr, "/metrics").await;
    let refused = dropped(&m, "undecryptable");
    println!(
        "flood: {sent} packets in {elapsed:.1} s ({:.0}/s); RSS {} -> {} KiB (+{} KiB); \
         refused undecryptable {refused}, too_many_streams {}; process CPU {cpu:.1} s \
         ({:.2} µs per packet, the flooding client included); other room's inside-server p99 \
         {:.1} ms quiet, {:.1} ms during the flood",
        sent as f64 / elapsed,
        rss0,
        rss_kib(),
        rss_kib().saturating_sub(rss0),
        dropped(&m, "too_many_streams"),
        cpu / sent as f64 * 1e6,
        quiet_p99 * 1e3,
        flood_p99 * 1e3,
    );
    stream(&mut publ, &mut sub, 20, 20).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    assert!((20..40).all(|i| got.binary_search(&i).is_ok()));
}

/// The media port bound as docs/deploy.md tells operators to (`0.0.0.0`, with `announce`): the
/// relay's connections learn which local address each datagram came in at, so the ICE checks
/// match the announced candidate, and media flows both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_media_flows_through_a_wildcard_bound_media_port() {
    let s = announcing("127.0.0.1").await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 50).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    assert!(got.len() >= 45, "{} of 50 relayed", got.len());
    assert!(
        publ.relay_addr().unwrap().ip().is_loopback(),
        "media sent to the announced address"
    );
}

/// A server with its media port bound to 0.0.0.0 (as docs/deploy.md has it) announcing `ip`.
async fn announcing(ip: &str) -> TestServer {
    spawn(Config {
        media_listen: "0.0.0.0:0".parse().unwrap(),
        announce: vec![ip.parse().unwrap()],
        ..test_config()
    })
    .await
}

/// Whether this process runs the test's body: inside the network namespace `setup` made (see
/// common::netns), not the outer run, nor a skipped one.
fn inside_netns(test: &str, setup: &str, missing: Option<&str>) -> bool {
    matches!(
        common::netns::in_new_netns(test, setup, missing),
        common::netns::Place::Inside
    )
}

/// A UDP socket bound to `addr` inside the named network namespace `ns` (a thread enters it,
/// binds, and ends; the socket stays in that namespace).
fn socket_in(ns: &str, addr: &str) -> std::net::UdpSocket {
    let addr = addr.to_string();
    common::netns::inside(ns, move || {
        std::net::UdpSocket::bind(&addr).expect("bind in the namespace")
    })
}

/// A relayed room whose two members' media sockets are `publ_socket` and `sub_socket`; streams
/// 50 packets and checks what the subscriber got.
async fn relay_between(
    s: &TestServer,
    announced: Option<std::net::IpAddr>,
    publ_socket: std::net::UdpSocket,
    sub_socket: std::net::UdpSocket,
) {
    let sockets = RoomSockets {
        publisher: Some(publ_socket),
        subscriber: Some(sub_socket),
    };
    let (mut publ, mut sub, _) = relay_room_on(s.addr, true, false, Vec::new(), sockets).await;
    stream(&mut publ, &mut sub, 0, 50).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    assert!(got.len() >= 45, "{} of 50 relayed", got.len());
    // Everything came from the address the members sent to (a browser drops the rest).
    for c in [&publ, &sub] {
        let Some(announced) = announced else { break };
        let relay = std::net::SocketAddr::new(announced, server_media_port(c));
        assert_eq!(
            c.heard_from.iter().collect::<Vec<_>>(),
            vec![&relay],
            "answered from another address"
        );
    }
}

/// A host with two addresses on two networks, the media port on 0.0.0.0 announcing the second:
/// a member on the first network reaches it through its router and must get its answers from
/// the address it sent to, not from the one the kernel would pick for its route (the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_homed_server_answers_from_the_address_each_client_used() {
    const TEST: &str = "a_multi_homed_server_answers_from_the_address_each_client_used";
    let setup = "for n in ferry-mh-c1 ferry-mh-c2; do ip netns del $n 2>/dev/null; ip netns add $n || exit 1; done \
        && ip link add s1 type veth peer name e0 netns ferry-mh-c1 \
        && ip link add s2 type veth peer name e0 netns ferry-mh-c2 \
        && ip addr add 10.201.0.1/24 dev s1 && ip link set s1 up \
        && ip addr add 10.202.0.1/24 dev s2 && ip link set s2 up \
        && ip -n ferry-mh-c1 addr add 10.201.0.2/24 dev e0 && ip -n ferry-mh-c1 link set e0 up \
        && ip -n ferry-mh-c1 route add default via 10.201.0.1 \
        && ip -n ferry-mh-c2 addr add 10.202.0.2/24 dev e0 && ip -n ferry-mh-c2 link set e0 up \
        && ip -n ferry-mh-c2 route add default via 10.202.0.1";
    if !inside_netns(TEST, setup, None) {
        return;
    }
    let _ns = common::netns::Namespaces(&["ferry-mh-c1", "ferry-mh-c2"]);
    let s = announcing("10.202.0.1").await;
    // The publisher on the first network (its route to 10.202.0.1 goes through 10.201.0.1), the
    // subscriber on the second.
    relay_between(
        &s,
        "10.202.0.1".parse().ok(),
        socket_in("ferry-mh-c1", "10.201.0.2:0"),
        socket_in("ferry-mh-c2", "10.202.0.2:0"),
    )
    .await;
}

/// The server behind a 1:1 NAT: the media port on 0.0.0.0 with a private address, `announce`
/// set to the outside address a router namespace translates to it (DNAT). Members outside reach
/// the relay at the announced address and media flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_a_one_to_one_nat_relays_at_its_announced_address() {
    const TEST: &str = "a_server_behind_a_one_to_one_nat_relays_at_its_announced_address";
    let missing = std::process::Command::new("iptables")
        .arg("-V")
        .output()
        .is_err()
        .then_some("iptables is missing (apt-get install iptables)");
    let setup = common::netns::one_to_one_nat("ferry-nat-r", "ferry-nat-c");
    if !inside_netns(TEST, &setup, missing) {
        return;
    }
    let _ns = common::netns::Namespaces(&["ferry-nat-r", "ferry-nat-c"]);
    let s = announcing("10.204.0.100").await;
    relay_between(
        &s,
        "10.204.0.100".parse().ok(),
        socket_in("ferry-nat-c", "10.204.0.2:0"),
        socket_in("ferry-nat-c", "10.204.0.2:0"),
    )
    .await;
}

/// The media port bound dual-stack (`[::]`), announced on an IPv6 and an IPv4 address: a member
/// with only IPv6 and one with only IPv4 meet in one relayed room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_media_port_relays_between_ipv6_and_ipv4_members() {
    let s = spawn(Config {
        media_listen: "[::]:0".parse().unwrap(),
        announce: vec!["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        ..test_config()
    })
    .await;
    let v6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
    let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    relay_between(&s, None, v6, v4).await;
}

/// The relay's SDP lists its candidates for component 1 only (rtcp-mux is required: there is no
/// component 2), UDP and TCP, in the BUNDLE's first m-section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_sdp_has_no_rtcp_component_candidates() {
    let s = spawn(test_config()).await;
    let (mut publ, mut sub) = relayed_pair(&s).await;
    stream(&mut publ, &mut sub, 0, 5).await;
    let answer = publ.pc.remote_description().unwrap().sdp.clone();
    let offer = sub
        .server_offers
        .last()
        .expect("an offer to the subscriber")
        .clone();
    for sdp in [answer, offer] {
        let candidates: Vec<&str> = sdp
            .lines()
            .filter(|l| l.starts_with("a=candidate:"))
            .collect();
        assert!(
            candidates
                .iter()
                .all(|c| c.split_whitespace().nth(1) == Some("1")),
            "{candidates:#?}"
        );
        assert!(candidates.iter().any(|c| c.contains(" udp ")), "{sdp}");
        assert!(
            candidates
                .iter()
                .any(|c| c.contains(" tcp ") && c.contains("tcptype passive")),
            "{sdp}"
        );
        assert!(sdp.contains("a=rtcp-mux"), "{sdp}");
    }
}

/// A client that is not a browser, written from the protocol alone, joins a relayed room after a
/// member published: the `joinRoom` answer lists the tracks at the relay, it subscribes to the
/// publisher it names, and receives its media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_is_told_the_tracks_at_the_relay_and_receives_them() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "publisher").await;
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut publ = MediaClient::connect(a, true).await;
    // Published at the relay: until then nobody could be told.
    for _ in 0..400 {
        publ.pump(SLICE).await;
        publ.send(0, payload(0));
        let (_, m) = http_get(s.addr, "/metrics").await;
        if metric(
            &m,
            "ferry_media_packets_total{direction=\"in\",kind=\"video\"}",
        )
        .unwrap_or(0.0)
            > 0.0
        {
            break;
        }
    }
    let mut late = Client::joined_hello(s.addr, "late").await;
    let joined = late
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let tracks = joined["tracks"].as_array().expect("tracks in the answer");
    assert_eq!(
        tracks,
        &vec![json!({"userId": publ.ws.user_id, "streamType": "cam", "kind": "video"})],
        "{joined}"
    );
    let publisher = tracks[0]["userId"].as_str().unwrap().to_string();
    late.request("subscribe", json!({"userId": publisher}))
        .await
        .unwrap();
    let mut sub = MediaClient::connect(late, false).await;
    for _ in 0..1000 {
        settle(&mut publ, &mut sub, 1).await;
        if sub.connected && !sub.tracks.is_empty() {
            break;
        }
    }
    stream(&mut publ, &mut sub, 1, 40).await;
    let got = check_received(&sub, publ.sender.unwrap().1);
    assert!(got.len() >= 30, "received {} of 40", got.len());
    // When the publisher's connection goes, its track leaves the list.
    publ.ws
        .request("bye", json!({"to": "server"}))
        .await
        .unwrap();
    let mut c = Client::joined_hello(s.addr, "later").await;
    let mut left = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let j = c
            .request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        c.request("leaveRoom", json!({})).await.unwrap();
        if j["tracks"] == json!([]) {
            left = true;
            break;
        }
    }
    assert!(left, "the track stayed listed after its connection closed");
}

/// An offer for a relay connection (a data channel only) that will never be connected.
fn idle_offer() -> String {
    use rtc::peer_connection::RTCPeerConnectionBuilder;
    use rtc::peer_connection::configuration::RTCConfigurationBuilder;
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .build(std::time::Instant::now())
        .unwrap();
    pc.create_data_channel("x", None).unwrap();
    let offer = pc.create_offer(None).unwrap();
    pc.set_local_description(std::time::Instant::now(), offer)
        .unwrap();
    pc.local_description().unwrap().sdp
}

/// `a` offers the server a relay connection.
async fn relay_offer(a: &mut Client) -> Result<serde_json::Value, Refusal> {
    a.request("offer", json!({"to": "server", "sdp": idle_offer()}))
        .await
}

/// A session may open `max_relay_connections_per_minute` relay connections (an offer to the
/// server with none open, e.g. after each `bye` to it); the next offer is refused with a clear
/// error and counted. Offers on an open connection (renegotiation) do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_connections_per_session_are_capped() {
    let s = spawn(Config {
        max_relay_connections_per_minute: 3,
        ..test_config()
    })
    .await;
    let mut a = Client::joined_hello(s.addr, "alice").await;
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    for _ in 0..3 {
        relay_offer(&mut a).await.expect("within the limit");
        // A second offer on the same connection is a renegotiation: not counted.
        relay_offer(&mut a).await.expect("renegotiation");
        a.request("bye", json!({"to": "server"})).await.unwrap();
    }
    let e = relay_offer(&mut a).await.unwrap_err();
    assert_eq!(e.0, "rate_limited", "{e:?}");
    assert!(e.1.contains("max_relay_connections_per_minute"), "{e:?}");
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            "ferry_limit_refusals_total{limit=\"relay_connections_per_minute\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// Relay connections in their handshake from one IP address are capped
/// (`max_handshakes_per_ip`): the first check of one more from that address is dropped (no
/// answer, no address learned) and counted; the connections already in theirs are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_per_address_are_capped() {
    use rtc::crypto::RTCCryptoProvider;
    use rtc::stun::attributes::ATTR_USERNAME;
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{BINDING_REQUEST, Message, Setter};
    use rtc::stun::textattrs::Username;

    let s = spawn(Config {
        max_handshakes_per_ip: 2,
        ..test_config()
    })
    .await;
    let mut owner = Client::joined_hello(s.addr, "owner").await;
    let room = owner.create_room(json!({"mode": "relay"})).await;
    let crypto = rtc::crypto::providers::RingProvider::new();
    let refused = async || {
        let (_, m) = http_get(s.addr, "/metrics").await;
        metric(
            &m,
            "ferry_limit_refusals_total{limit=\"handshakes_per_ip\"}",
        )
        .unwrap_or(-1.0)
    };
    let mut seen = Vec::new();
    let mut members = Vec::new();
    for i in 0..3 {
        let mut c = Client::joined_hello(s.addr, &format!("m{i}")).await;
        c.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        let offer = idle_offer();
        c.request("offer", json!({"to": "server", "sdp": offer}))
            .await
            .unwrap();
        let answer = c.event_where(|e| e["type"] == "answer").await;
        let sdp = answer["sdp"].as_str().unwrap().to_string();
        let (ufrag, pwd) = (sdp_attr(&sdp, "ice-ufrag"), sdp_attr(&sdp, "ice-pwd"));
        let mine = sdp_attr(&offer, "ice-ufrag");
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(rtc::stun::message::TransactionId::new()),
            Box::new(Username::new(ATTR_USERNAME, format!("{ufrag}:{mine}"))),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                pwd,
                crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
        // Each from its own port of the same address (127.0.0.1), never finishing DTLS.
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&m.raw, s.media_addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        seen.push(refused().await);
        members.push((c, sock));
    }
    assert_eq!(seen, [0.0, 0.0, 1.0], "the third is over the cap");
}
