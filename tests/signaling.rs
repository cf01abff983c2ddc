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

/// alice (with her resume token) and bob in a new room, alice's event of bob's join consumed;
/// the server's `resume_timeout` is `resume_ms`.
async fn resumable_pair(s: &TestServer, resume_ms: u64) -> (Client, String, Client, String) {
    let mut a = Client::connect(s.addr).await;
    let w = a
        .request("hello", json!({"identity": "alice"}))
        .await
        .expect("hello accepted");
    a.user_id = w["userId"].as_str().unwrap().to_string();
    let token = w["resumeToken"]
        .as_str()
        .expect("a resume token")
        .to_string();
    assert_eq!(w["resumeTimeoutMs"], resume_ms, "{w}");
    let mut b = Client::joined_hello(s.addr, "bob").await;
    let room = a.create_room(json!({})).await;
    for c in [&mut a, &mut b] {
        c.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
    }
    a.event_where(|e| e["event"] == "join").await;
    (a, token, b, room)
}

/// alice's connection drops without a close (as when a phone leaves Wi-Fi): bob sees her
/// `reconnecting`, not a leave; what is sent to her meanwhile waits; a new connection resumes her
/// session with the token (same user id, same room), receives what she missed, then the answer
/// with a fresh token and the room; bob sees `reconnected` and they signal as before.
#[tokio::test]
async fn a_dropped_connection_is_resumed_with_its_room_and_what_it_missed() {
    let s = spawn(test_config()).await;
    let (a, token, mut b, room) = resumable_pair(&s, 15_000).await;
    let alice = a.user_id.clone();
    // The TCP connection goes away without a WebSocket close.
    drop(a);
    let e = b.event().await;
    assert_eq!(e["event"], "reconnecting", "{e}");
    assert_eq!(e["userId"], alice.as_str());
    // bob signals alice while she is away: it is kept for her.
    b.request("offer", json!({"to": alice, "sdp": "v=0\r\n"}))
        .await
        .expect("alice is still a member");
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_sessions_reconnecting"), Some(1.0), "{m}");
    let mut a2 = Client::connect(s.addr).await;
    let r = a2
        .request("resume", json!({"token": token}))
        .await
        .expect("resumed");
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(r["userId"], alice.as_str(), "{r}");
    assert_eq!(r["room"]["roomId"], room.as_str(), "{r}");
    assert_eq!(r["room"]["members"][0]["userId"], b.user_id.as_str(), "{r}");
    let fresh = r["resumeToken"].as_str().unwrap();
    assert_ne!(fresh, token, "a resume token works once");
    // What was queued came before the answer.
    let missed = a2.queued().expect("bob's offer");
    assert_eq!(missed["type"], "offer", "{missed}");
    assert_eq!(missed["from"], b.user_id.as_str());
    let e = b.event().await;
    assert_eq!(e["event"], "reconnected", "{e}");
    // Signaling goes on as the same member.
    a2.request("candidate", json!({"to": b.user_id, "candidate": null}))
        .await
        .unwrap();
    let c = b.event().await;
    assert_eq!(c["type"], "candidate");
    assert_eq!(c["from"], alice.as_str());
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_session_resumes_total{result=\"resumed\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "ferry_sessions_reconnecting"), Some(0.0), "{m}");
    // The old token is spent; the fresh one is for the next drop.
    let mut a3 = Client::connect(s.addr).await;
    let e = a3
        .request("resume", json!({"token": token}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "resume_failed", "{e:?}");
}

/// A session nobody resumes within `resume_timeout` leaves as any dropped one: bob sees
/// `reconnecting`, then `leave` (disconnected); its token then resumes nothing (a clear error,
/// and the connection may still say hello).
#[tokio::test]
async fn a_session_not_resumed_in_time_leaves() {
    let s = spawn(ferry::config::Config {
        resume_timeout: std::time::Duration::from_millis(500),
        ..test_config()
    })
    .await;
    let (a, token, mut b, _) = resumable_pair(&s, 500).await;
    let alice = a.user_id.clone();
    drop(a);
    assert_eq!(b.event().await["event"], "reconnecting");
    let e = b.event().await;
    assert_eq!(e["event"], "leave", "{e}");
    assert_eq!(e["userId"], alice.as_str());
    assert_eq!(e["reason"], "disconnected", "{e}");
    let mut a2 = Client::connect(s.addr).await;
    let e = a2
        .request("resume", json!({"token": token}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "resume_failed", "{e:?}");
    assert!(e.1.contains("hello"), "{e:?}");
    a2.request("hello", json!({})).await.expect("a new session");
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_session_resumes_total{result=\"expired\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_session_resumes_total{result=\"unknown\"}"),
        Some(1.0),
        "{m}"
    );
}

/// A client whose network changed may come back before the server saw its old connection die:
/// the resume takes the session over at once, and the old connection is closed with 4005.
/// A clean close (the client's Close frame) is a leave at once, not held.
#[tokio::test]
async fn a_resume_takes_over_a_connection_that_still_looks_alive() {
    let s = spawn(test_config()).await;
    let (mut a, token, mut b, _) = resumable_pair(&s, 15_000).await;
    let mut a2 = Client::connect(s.addr).await;
    let r = a2.request("resume", json!({"token": token})).await.unwrap();
    assert_eq!(r["userId"], a.user_id.as_str());
    let (code, reason) = a.expect_close().await;
    assert_eq!(code, 4005, "{reason}");
    // bob saw no leave; alice is still there for him.
    b.request("candidate", json!({"to": a.user_id, "candidate": null}))
        .await
        .expect("alice is a member");
    assert_eq!(a2.event().await["type"], "candidate");
    // A close with 4000 (the client gives the connection up to resume) holds the session.
    a2.ws
        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 4000.into(),
            reason: "reconnecting".into(),
        }))
        .await
        .unwrap();
    let e = b.event_where(|e| e["type"] == "presence").await;
    assert_eq!(e["event"], "reconnecting", "{e}");
    let mut a3 = Client::connect(s.addr).await;
    a3.request("resume", json!({"token": r["resumeToken"]}))
        .await
        .expect("resumed after a 4000 close");
    assert_eq!(b.event().await["event"], "reconnected");
    // A clean close leaves at once.
    a3.ws.close(None).await.unwrap();
    let e = b.event_where(|e| e["type"] == "presence").await;
    assert_eq!(e["event"], "leave", "{e}");
    assert_eq!(e["reason"], "disconnected");
}

/// `resume` with bad input: missing or wrong fields, an unknown token, after `hello`.
#[tokio::test]
async fn resume_refuses_bad_input() {
    let s = spawn(test_config()).await;
    let mut c = Client::connect(s.addr).await;
    for (fields, code) in [
        (json!({}), "bad_request"),
        (json!({"token": 5}), "bad_request"),
        (json!({"token": "x", "extra": 1}), "bad_request"),
        (json!({"token": "not-a-token"}), "resume_failed"),
    ] {
        let e = c.request("resume", fields.clone()).await.unwrap_err();
        assert_eq!(e.0, code, "{fields}: {e:?}");
    }
    let w = c.request("hello", json!({})).await.unwrap();
    let token = w["resumeToken"].as_str().unwrap().to_string();
    let e = c
        .request("resume", json!({"token": token}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "already_authenticated", "{e:?}");
    // With resume_timeout 0 there is no token and a drop is a leave at once.
    let s = spawn(ferry::config::Config {
        resume_timeout: std::time::Duration::ZERO,
        ..test_config()
    })
    .await;
    let mut a = Client::connect(s.addr).await;
    let w = a.request("hello", json!({})).await.unwrap();
    assert!(w.get("resumeToken").is_none(), "{w}");
}
