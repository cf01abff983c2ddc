//! Every signaling request and event against the real server on 127.0.0.1.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn welcome_carries_identity_ice_servers_and_policy() {
    let mut cfg = test_config();
    cfg.ice_servers = vec![ferry::config::IceServer {
        urls: vec!["stun:127.0.0.1:3478".into()],
        username: None,
        credential: None,
    }];
    cfg.p2p_max_peers = 3;
    let s = spawn(cfg).await;
    let mut a = Client::connect(s.addr).await;
    let w = a
        .request("hello", json!({"protocol": 1, "identity": "alice"}))
        .await
        .unwrap();
    assert!(w["userId"].as_str().unwrap().starts_with("u-"));
    assert_eq!(w["identity"], "alice");
    assert_eq!(w["protocol"], 1);
    assert_eq!(w["p2pMaxPeers"], 3);
    assert_eq!(w["p2pTimeoutMs"], 5000);
    assert_eq!(
        w["iceServers"][0],
        json!({"urls": [format!("stun:{}", s.media_addr)]}),
        "Ferry's own STUN on the media port comes first"
    );
    assert_eq!(w["iceServers"][1]["urls"][0], "stun:127.0.0.1:3478");
    assert_eq!(w["grants"]["publish"], true);
    let b = Client::joined_hello(s.addr, "bob").await;
    assert_ne!(
        w["userId"].as_str().unwrap(),
        b.user_id,
        "user ids are unique"
    );
}

#[tokio::test]
async fn rooms_presence_and_leave() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "alice").await;
    let mut b = Client::joined_hello(s.addr, "bob").await;
    let room = a.create_room(json!({"maxPeers": 4})).await;

    let ja = a
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(ja["members"], json!([]));
    assert_eq!(ja["maxPeers"], 4);
    assert_eq!(ja["mode"], "auto");

    let jb = b
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(
        jb["members"],
        json!([{"userId": a.user_id, "identity": "alice"}])
    );
    let ev = a.event().await;
    assert_eq!(
        ev,
        json!({"type": "presence", "event": "join", "roomId": room, "userId": b.user_id, "identity": "bob"})
    );

    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_rooms"), Some(1.0));
    assert_eq!(metric(&m, "ferry_room_members"), Some(2.0));
    assert_eq!(metric(&m, "ferry_ws_connections"), Some(2.0));
    assert_eq!(
        metric(&m, "ferry_signal_messages_total{type=\"joinRoom\"}"),
        Some(2.0)
    );

    b.request("leaveRoom", json!({})).await.unwrap();
    let ev = a.event().await;
    assert_eq!(ev["event"], "leave");
    assert_eq!(ev["userId"], b.user_id.as_str());
    assert_eq!(ev["reason"], "left");

    // b can join again, a sees it again.
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(a.event().await["event"], "join");

    // A socket that closes is a leave too.
    b.ws.close(None).await.unwrap();
    let ev = a.event().await;
    assert_eq!(ev["event"], "leave");
    assert_eq!(ev["reason"], "disconnected");
}

#[tokio::test]
async fn offer_answer_candidate_bye_are_relayed_with_the_true_sender() {
    let s = spawn(test_config()).await;
    let (mut a, mut b, _) = two_in_a_room(s.addr, "alice", "bob").await;

    let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=sendrecv\r\n";
    a.request(
        "offer",
        json!({"to": b.user_id, "sdp": sdp, "meta": {"streams": {"s1": "cam"}}}),
    )
    .await
    .unwrap();
    let ev = b.event().await;
    assert_eq!(
        ev,
        json!({"type": "offer", "from": a.user_id, "sdp": sdp, "meta": {"streams": {"s1": "cam"}}})
    );

    b.request("answer", json!({"to": a.user_id, "sdp": sdp}))
        .await
        .unwrap();
    let ev = a.event().await;
    assert_eq!(ev["type"], "answer");
    assert_eq!(ev["from"], b.user_id.as_str());

    let cand = json!({"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0});
    a.request("candidate", json!({"to": b.user_id, "candidate": cand}))
        .await
        .unwrap();
    let ev = b.event().await;
    assert_eq!(
        ev,
        json!({"type": "candidate", "from": a.user_id, "candidate": cand})
    );
    a.request("candidate", json!({"to": b.user_id, "candidate": null}))
        .await
        .unwrap();
    assert_eq!(b.event().await["candidate"], json!(null));

    a.request("bye", json!({"to": b.user_id, "reason": "hangup"}))
        .await
        .unwrap();
    assert_eq!(
        b.event().await,
        json!({"type": "bye", "from": a.user_id, "reason": "hangup"})
    );

    // No spoofing: a client cannot name the sender.
    let e = a
        .request(
            "offer",
            json!({"to": b.user_id, "sdp": sdp, "from": "u-someoneelse"}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.0, "bad_request");
    assert!(e.1.contains("from"), "{}", e.1);
}

#[tokio::test]
async fn signaling_only_reaches_members_of_the_senders_room() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "alice").await;
    let mut c = Client::joined_hello(s.addr, "carol").await;
    let sdp = "v=0\r\n";

    // Not in a room yet.
    let e = a
        .request("offer", json!({"to": c.user_id, "sdp": sdp}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "not_in_room");

    let r1 = a.create_room(json!({})).await;
    let r2 = c.create_room(json!({})).await;
    a.request("joinRoom", json!({"roomId": r1})).await.unwrap();
    c.request("joinRoom", json!({"roomId": r2})).await.unwrap();

    for to in [c.user_id.clone(), "u-nobody".to_string(), a.user_id.clone()] {
        let e = a
            .request("offer", json!({"to": to, "sdp": sdp}))
            .await
            .unwrap_err();
        assert_eq!(e.0, "target_not_found", "target {to}");
    }
    // c got nothing: its next message is the answer to its own ping.
    c.request("ping", json!({})).await.unwrap();
    assert!(c.events_is_empty());
}

#[tokio::test]
async fn room_errors() {
    let mut cfg = test_config();
    cfg.max_room_peers = 3;
    let s = spawn(cfg).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    let mut b = Client::joined_hello(s.addr, "b").await;
    let mut c = Client::joined_hello(s.addr, "c").await;

    let e = a
        .request("joinRoom", json!({"roomId": "nope"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "room_not_found");

    let room = a
        .create_room(json!({"roomId": "team-1", "maxPeers": 2}))
        .await;
    assert_eq!(room, "team-1");
    let e = b
        .request("createRoom", json!({"roomId": "team-1"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "room_exists");
    let e = b
        .request("createRoom", json!({"roomId": "bad id!"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "bad_request");
    let e = b
        .request("createRoom", json!({"maxPeers": 10}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "bad_request");
    assert!(e.1.contains("between 2 and 3"), "{}", e.1);
    let e = b
        .request("createRoom", json!({"mode": "mesh"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "bad_request");

    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let e = a
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "already_in_room");
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let e = c
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "room_full");

    let e = c.request("leaveRoom", json!({})).await.unwrap_err();
    assert_eq!(e.0, "not_in_room");

    // The members were not disturbed by any of it.
    assert_eq!(a.event().await["userId"], b.user_id.as_str());
    a.request("ping", json!({})).await.unwrap();
    assert!(a.events_is_empty());

    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_signal_errors_total{code=\"room_full\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "ferry_signal_errors_total{code=\"room_exists\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn relay_mode_room_option_is_kept() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    let r = a
        .request("createRoom", json!({"mode": "relay"}))
        .await
        .unwrap();
    assert_eq!(r["mode"], "relay");
    let j = a
        .request("joinRoom", json!({"roomId": r["roomId"]}))
        .await
        .unwrap();
    assert_eq!(j["mode"], "relay");
}

#[tokio::test]
async fn keepalive_both_ways() {
    let mut cfg = test_config();
    cfg.ping_interval = std::time::Duration::from_millis(100);
    cfg.ping_timeout = std::time::Duration::from_secs(5);
    let s = spawn(cfg).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    // Client -> server.
    assert_eq!(a.request("ping", json!({})).await.unwrap(), json!({}));
    // Server -> client: a WebSocket ping frame arrives.
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let m = tokio::time::timeout(WAIT, a.ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(m, Message::Ping(_)) {
            break;
        }
    }
}

/// One session cannot hold more than `max_rooms_per_session` rooms it created, nor the server
/// more than `max_rooms`: a clear `too_many_rooms` error each time, and other sessions unaffected
/// by one session's cap.
#[tokio::test]
async fn room_creation_is_capped_per_session_and_in_total() {
    let s = spawn(ferry::config::Config {
        max_rooms: 5,
        max_rooms_per_session: 3,
        ..test_config()
    })
    .await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    for _ in 0..3 {
        a.create_room(json!({})).await;
    }
    let e = a.request("createRoom", json!({})).await.unwrap_err();
    assert_eq!(e.0, "too_many_rooms", "{e:?}");
    assert!(e.1.contains("max_rooms_per_session"), "{e:?}");
    let mut b = Client::joined_hello(s.addr, "b").await;
    b.create_room(json!({})).await;
    b.create_room(json!({})).await;
    let e = b.request("createRoom", json!({})).await.unwrap_err();
    assert_eq!(e.0, "too_many_rooms", "{e:?}");
    assert!(e.1.contains("max_rooms"), "{e:?}");
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_signal_errors_total{code=\"too_many_rooms\"}"),
        Some(2.0)
    );
    assert_eq!(metric(&m, "ferry_rooms"), Some(5.0));
}
