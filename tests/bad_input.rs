//! Bad input and limits: each gets a clear error or close code, the connection survives where it
//! reasonably can, and the other members are unaffected.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Send raw text and return the error response it gets.
async fn refused(c: &mut Client, text: &str) -> (Value, String, String) {
    c.send_raw(text).await;
    loop {
        let m = c.recv().await.expect("connection survives bad input");
        if m["type"] == "response" {
            let e = &m["error"];
            assert!(e.is_object(), "expected an error for {text:?}, got {m}");
            return (
                m["id"].clone(),
                e["code"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            );
        }
    }
}

#[tokio::test]
async fn malformed_messages_get_errors_and_the_connection_survives() {
    let s = spawn(test_config()).await;
    let (mut a, mut b, _) = two_in_a_room(s.addr, "a", "b").await;

    let cases: &[(&str, &str, &str)] = &[
        ("{not json", "bad_request", "malformed JSON"),
        ("[1,2]", "bad_request", "JSON object"),
        ("\"text\"", "bad_request", "JSON object"),
        (r#"{"type":"ping"}"#, "bad_request", "missing request id"),
        (
            r#"{"id":{"x":1},"type":"ping"}"#,
            "bad_request",
            "request id",
        ),
        (r#"{"id":7}"#, "bad_request", "missing field `type`"),
        (
            r#"{"id":8,"type":5}"#,
            "bad_request",
            "`type` must be a string",
        ),
        (r#"{"id":9,"type":"teleport"}"#, "unknown_type", "teleport"),
        (r#"{"id":10,"type":"joinRoom"}"#, "bad_request", "roomId"),
        (
            r#"{"id":11,"type":"joinRoom","roomId":42}"#,
            "bad_request",
            "invalid type",
        ),
        (r#"{"id":12,"type":"offer","to":"x"}"#, "bad_request", "sdp"),
        (
            r#"{"id":13,"type":"candidate","to":"x","candidate":"str"}"#,
            "bad_request",
            "candidate",
        ),
        (
            r#"{"id":14,"type":"createRoom","maxPeers":-1}"#,
            "bad_request",
            "maxPeers",
        ),
        (
            r#"{"id":15,"type":"ping","extra":true}"#,
            "bad_request",
            "unknown field",
        ),
        (
            r#"{"id":"s","type":"hello"}"#,
            "already_authenticated",
            "hello",
        ),
    ];
    for (text, code, needle) in cases {
        let (_, c, msg) = refused(&mut a, text).await;
        assert_eq!(&c, code, "for {text}: {msg}");
        assert!(
            msg.contains(needle),
            "for {text}: message {msg:?} lacks {needle:?}"
        );
    }
    // The id is echoed whenever it could be read.
    let (id, _, _) = refused(&mut a, r#"{"id":"abc","type":"nope"}"#).await;
    assert_eq!(id, json!("abc"));

    // Binary frames are refused, not fatal.
    a.send_message(Message::Binary(vec![1, 2, 3].into())).await;
    let m = a.recv().await.unwrap();
    assert_eq!(m["error"]["code"], "bad_request");

    // Still in the room and working; b saw none of it.
    a.request("offer", json!({"to": b.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(b.event().await["type"], "offer");

    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(metric(&m, "ferry_signal_errors_total{code=\"bad_request\"}").unwrap() >= 12.0);
    assert_eq!(
        metric(&m, "ferry_signal_messages_total{type=\"unknown\"}"),
        Some(2.0)
    );
}

#[tokio::test]
async fn requests_before_hello_and_wrong_protocol() {
    let s = spawn(test_config()).await;
    let mut a = Client::connect(s.addr).await;
    let e = a.request("createRoom", json!({})).await.unwrap_err();
    assert_eq!(e.0, "not_authenticated");
    // ping works before hello
    a.request("ping", json!({})).await.unwrap();
    let e = a
        .request("hello", json!({"protocol": 2}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "unsupported_protocol");
    a.request("hello", json!({"protocol": 1})).await.unwrap();
}

#[tokio::test]
async fn oversized_messages() {
    let mut cfg = test_config();
    cfg.max_message_bytes = 4096;
    let s = spawn(cfg).await;
    let mut a = Client::joined_hello(s.addr, "a").await;

    // Above the protocol limit: an error, and the connection survives.
    let big = format!(r#"{{"id":1,"type":"ping","pad":"{}"}}"#, "x".repeat(5000));
    let (_, code, msg) = refused(&mut a, &big).await;
    assert_eq!(code, "message_too_large");
    assert!(msg.contains("4096"), "{msg}");
    a.request("ping", json!({})).await.unwrap();

    // Far above it (the transport limit): the connection is closed with 1009.
    let huge = "x".repeat(4096 * ferry::config::HARD_MESSAGE_LIMIT_FACTOR + 1);
    a.send_raw(&huge).await;
    let (code, _) = a.expect_close().await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn messages_many_read_chunks_long_arrive_whole() {
    // The server reads signaling in 4 KiB chunks (src/http.rs): an offer with a 60 KiB SDP, under
    // the default 64 KiB limit, takes fifteen reads and must reach the other member byte for byte.
    let s = spawn(test_config()).await;
    let (mut a, mut b, _) = two_in_a_room(s.addr, "alice", "bob").await;
    let mut sdp = String::from("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
    let mut line = 0;
    while sdp.len() < 60 * 1024 {
        sdp.push_str(&format!(
            "a=x-filler:{line:06} {}\r\n",
            "abcdefgh".repeat(8)
        ));
        line += 1;
    }
    a.request("offer", json!({"to": b.user_id, "sdp": sdp}))
        .await
        .expect("a 60 KiB offer under the 64 KiB limit is relayed");
    let ev = b.event().await;
    assert_eq!(ev["type"], "offer");
    assert_eq!(ev["sdp"].as_str().map(str::len), Some(sdp.len()));
    assert_eq!(ev["sdp"], sdp.as_str());
    a.request("ping", json!({})).await.unwrap();
}

/// Every frame counts against the rate limit. Past it a client gets one `rate_limited` error for
/// a run of refused messages and no answer to the rest; one that keeps sending (more than twice
/// `rate_burst` refused in a row) is closed with 1008. Another connection is unaffected, and a
/// client that paused is served again.
#[tokio::test]
async fn message_flood_is_rate_limited_and_recovers() {
    let mut cfg = test_config();
    cfg.rate_limit = 5;
    cfg.rate_burst = 5;
    let s = spawn(cfg).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    let mut b = Client::joined_hello(s.addr, "b").await;
    let mut c = Client::joined_hello(s.addr, "c").await;

    for i in 0..200 {
        a.send_raw(&json!({"id": 100 + i, "type": "ping"}).to_string())
            .await;
    }
    let (mut ok, mut limited) = (0, 0);
    let closed = loop {
        match tokio::time::timeout(WAIT, a.ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["error"]["code"].as_str() {
                    None => ok += 1,
                    Some("rate_limited") => limited += 1,
                    Some(other) => panic!("{other}"),
                }
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(closed, Some(1008), "a client that keeps flooding is closed");
    // The burst (one token went to hello), and what refilled meanwhile.
    assert!((4..50).contains(&ok), "{ok} answered");
    assert!(
        (1..10).contains(&limited),
        "{limited} rate_limited errors for 200 messages"
    );

    // Another connection is unaffected.
    b.request("ping", json!({})).await.unwrap();
    // A short burst over the limit: refused, not closed; served again after a pause.
    for i in 0..8 {
        c.send_raw(&json!({"id": 300 + i, "type": "ping"}).to_string())
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.request("ping", json!({})).await.unwrap();
}

/// Invalid messages (malformed JSON, unknown types, binary frames) count against the rate limit
/// like any other, and a session that sends more than 32 is closed with 1008: one connection
/// cannot make the server answer junk at full speed.
#[tokio::test]
async fn junk_is_answered_a_bounded_number_of_times_then_closed() {
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    for i in 0..300 {
        match i % 3 {
            0 => a.send_raw("{not json").await,
            1 => {
                a.send_raw(&json!({"id": i, "type": "nope"}).to_string())
                    .await
            }
            _ => a.send_message(Message::Binary(vec![1, 2, 3].into())).await,
        }
    }
    let mut answered = 0;
    let closed = loop {
        match tokio::time::timeout(WAIT, a.ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Text(_))) => answered += 1,
            Some(Ok(Message::Close(f))) => {
                break f.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    let (code, reason) = closed.expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("invalid"), "{reason}");
    assert_eq!(
        answered, 32,
        "each invalid message up to the limit is answered"
    );
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(metric(&m, "ferry_signal_messages_total{type=\"invalid\"}").unwrap() >= 22.0);
    // The server still serves others.
    let mut b = Client::joined_hello(s.addr, "b").await;
    b.request("ping", json!({})).await.unwrap();
}

#[tokio::test]
async fn too_many_connections_are_refused_with_a_reason() {
    let mut cfg = test_config();
    cfg.max_connections = 2;
    let s = spawn(cfg).await;
    let a = Client::joined_hello(s.addr, "a").await;
    let _b = Client::joined_hello(s.addr, "b").await;
    // A third connection may say hello (connections before hello have their own cap), and is
    // refused then.
    let mut c = Client::connect(s.addr).await;
    let e = c.request("hello", json!({})).await.unwrap_err();
    assert_eq!(e.0, "too_many_connections", "{e:?}");
    let (code, reason) = c.expect_close().await;
    assert_eq!(code, 1013);
    assert!(reason.contains("too many sessions"), "{reason}");
    // Closed, not dropped (a dropped session is held for a resume, in its slot).
    let mut a = a;
    a.ws.close(None).await.unwrap();
    // The slot comes back once a's session has ended.
    let mut tries = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if s.hub.connection_count() < 2 {
            break;
        }
        tries += 1;
        assert!(tries < 200, "slot never freed");
    }
    let mut d = Client::connect(s.addr).await;
    d.request("hello", json!({})).await.unwrap();
}

#[tokio::test]
async fn hello_timeout_closes_silent_connections() {
    let mut cfg = test_config();
    cfg.hello_timeout = Duration::from_millis(200);
    let s = spawn(cfg).await;
    let mut a = Client::connect(s.addr).await;
    let (code, reason) = a.expect_close().await;
    assert_eq!(code, 4002);
    assert!(reason.contains("hello"), "{reason}");
}

#[tokio::test]
async fn dead_sockets_are_detected_and_leave_their_room() {
    let mut cfg = test_config();
    cfg.ping_interval = Duration::from_millis(100);
    cfg.ping_timeout = Duration::from_millis(400);
    let s = spawn(cfg).await;
    let (mut a, b, _) = two_in_a_room(s.addr, "a", "b").await;
    // b goes silent: it never reads again, so it never answers the server's pings. a keeps
    // reading (and so answering pings) while it waits for the leave.
    let ev = a.event_where(|e| e["event"] == "leave").await;
    assert_eq!(ev["userId"], b.user_id.as_str());
    assert_eq!(ev["reason"], "timeout");
    a.request("ping", json!({})).await.unwrap();
    assert_eq!(s.hub.metrics.room_members.get(), 1);
    drop(b);
}

/// `subscribe`, `unsubscribe` and per-pair `reportMode` with wrong targets or fields: a clear
/// error each, nothing changes, and the pair counts stay right.
#[tokio::test]
async fn bad_subscriptions_and_pair_reports() {
    let s = spawn(test_config()).await;
    let (mut a, b, _) = two_in_a_room(s.addr, "a", "b").await;
    let me = a.user_id.clone();
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"type": "subscribe"}), "bad_request", "userId"),
        (
            json!({"type": "subscribe", "userId": me}),
            "bad_request",
            "yourself",
        ),
        (
            json!({"type": "subscribe", "userId": "u-nobody"}),
            "target_not_found",
            "u-nobody",
        ),
        (
            json!({"type": "subscribe", "userId": b.user_id, "streamType": "mic"}),
            "bad_request",
            "streamType",
        ),
        (
            json!({"type": "subscribe", "userId": b.user_id, "kind": "video"}),
            "bad_request",
            "unknown field",
        ),
        (
            json!({"type": "reportMode", "mode": "relay", "reason": "room_size", "userId": "u-nobody"}),
            "target_not_found",
            "u-nobody",
        ),
        (
            json!({"type": "reportMode", "mode": "relay", "reason": "room_size", "userId": me}),
            "bad_request",
            "another member",
        ),
        (
            json!({"type": "reportMode", "mode": "sideways", "reason": "room_size"}),
            "bad_request",
            "mode",
        ),
        // Reasons that do not apply: this room is `auto`, nobody has relayOnly, p2pMaxPeers is
        // 2, and a reason for one direction given with the other.
        (
            json!({"type": "reportMode", "mode": "relay", "reason": "room_mode", "userId": b.user_id}),
            "bad_request",
            "room_mode applies",
        ),
        (
            json!({"type": "reportMode", "mode": "relay", "reason": "policy", "userId": b.user_id}),
            "bad_request",
            "policy applies",
        ),
        (
            json!({"type": "reportMode", "mode": "relay", "reason": "room_shrunk", "userId": b.user_id}),
            "bad_request",
            "back to p2p",
        ),
        (
            json!({"type": "reportMode", "mode": "p2p", "reason": "ice_failed", "userId": b.user_id}),
            "bad_request",
            "move to the relay",
        ),
    ];
    for (i, (mut req, code, needle)) in cases.into_iter().enumerate() {
        req["id"] = json!(100 + i);
        let text = req.to_string();
        let (_, c, msg) = refused(&mut a, &text).await;
        assert_eq!(c, code, "for {text}: {msg}");
        assert!(
            msg.contains(needle),
            "for {text}: message {msg:?} lacks {needle:?}"
        );
    }
    // Unsubscribing from someone who is not (or no longer) there is done already: not an error.
    a.request("unsubscribe", json!({"userId": "u-gone"}))
        .await
        .unwrap();
    // None of that moved a pair or counted a fallback; a valid report does, once per pair.
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_pairs{mode=\"relay\"}"), Some(0.0), "{m}");
    for r in ["room_mode", "policy"] {
        assert_eq!(
            metric(&m, &format!("ferry_fallbacks_total{{reason=\"{r}\"}}")),
            Some(0.0),
            "{m}"
        );
    }
    a.request(
        "reportMode",
        json!({"mode": "relay", "reason": "ice_failed", "userId": b.user_id}),
    )
    .await
    .unwrap();
    let mut b = b;
    b.request(
        "reportMode",
        json!({"mode": "relay", "reason": "p2p_failed", "userId": a.user_id}),
    )
    .await
    .unwrap();
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_pairs{mode=\"relay\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "ferry_pairs{mode=\"p2p\"}"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "ferry_fallbacks_total{reason=\"ice_failed\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ferry_fallbacks_total{reason=\"p2p_failed\"}").unwrap_or(0.0),
        0.0,
        "the pair was relayed already: {m}"
    );
    // Both sides back to P2P: the pair is direct again.
    for (c, other) in [(&mut a, b.user_id.clone())] {
        c.request(
            "reportMode",
            json!({"mode": "p2p", "reason": "room_shrunk", "userId": other}),
        )
        .await
        .unwrap();
    }
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_pairs{mode=\"relay\"}"),
        Some(1.0),
        "b still relays: {m}"
    );
    b.request(
        "reportMode",
        json!({"mode": "p2p", "reason": "room_shrunk"}),
    )
    .await
    .unwrap();
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_pairs{mode=\"relay\"}"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "ferry_pairs{mode=\"p2p\"}"), Some(1.0), "{m}");
}

/// A text frame that is not UTF-8 closes the connection with 1007 (invalid frame payload data,
/// RFC 6455 7.4.1), not with a generic protocol error.
#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    let bad = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    a.send_message(Message::Frame(bad)).await;
    let (code, reason) = a.expect_close().await;
    assert_eq!(code, 1007, "{reason}");
}

/// A client's Close frame is answered with a Close (RFC 6455 5.5.1) before the connection ends.
#[tokio::test]
async fn a_clients_close_is_answered_with_a_close() {
    use futures_util::SinkExt;
    let s = spawn(test_config()).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    a.ws.send(Message::Close(None)).await.unwrap();
    let mut answered = false;
    while let Ok(Some(m)) = tokio::time::timeout(WAIT, a.ws.next()).await {
        match m {
            Ok(Message::Close(_)) => {
                answered = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(answered, "no Close came back");
}

/// A member whose connection ends, cleanly (Close) or not (the TCP connection just goes), leaves
/// its room with reason `disconnected`, as docs/protocol.md says.
#[tokio::test]
async fn a_member_whose_socket_goes_leaves_as_disconnected() {
    use futures_util::SinkExt;
    let s = spawn(test_config()).await;
    let (mut a, b, room) = two_in_a_room(s.addr, "a", "b").await;
    let mut c = Client::joined_hello(s.addr, "c").await;
    c.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let _ = a.event_where(|e| e["event"] == "join").await;
    // b: the TCP connection goes without a closing handshake.
    let b_id = b.user_id.clone();
    drop(b);
    let ev = a
        .event_where(|e| e["event"] == "leave" && e["userId"] == b_id.as_str())
        .await;
    assert_eq!(ev["reason"], "disconnected", "{ev}");
    // c: a clean Close.
    let c_id = c.user_id.clone();
    c.ws.send(Message::Close(None)).await.unwrap();
    let ev = a
        .event_where(|e| e["event"] == "leave" && e["userId"] == c_id.as_str())
        .await;
    assert_eq!(ev["reason"], "disconnected", "{ev}");
}

/// A WebSocket connected from `local` (a loopback address of this machine), without hello.
async fn raw_ws_from(local: &str, server: std::net::SocketAddr) -> Option<Client> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(server).await.ok()?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/ws"), stream)
        .await
        .ok()?;
    Some(Client::from_stream(ws))
}

/// Connections that never say hello (they need no token) cannot crowd out real sessions: they
/// have their own cap, and one address may hold only `max_pending_per_ip` of them; the rest are
/// closed with 1013 and counted, while a client from another address connects and works.
#[tokio::test]
async fn connections_without_hello_cannot_crowd_out_sessions() {
    let s = spawn(ferry::config::Config {
        max_connections: 10,
        max_pending_per_ip: 8,
        ..test_config()
    })
    .await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let mut c = raw_ws_from("127.0.0.2", s.addr).await.expect("connect");
        if held.len() < 8 {
            held.push(c);
            continue;
        }
        let (code, reason) = c.expect_close().await;
        assert_eq!(code, 1013, "{reason}");
        assert!(reason.contains("max_pending_per_ip"), "{reason}");
        refused += 1;
    }
    assert_eq!(refused, 12);
    // A client from another address gets in, 20 times over.
    for i in 0..20 {
        let mut c = Client::joined_hello(s.addr, &format!("real-{i}")).await;
        c.request("ping", json!({})).await.unwrap();
        // Closed, not dropped: a dropped session is held for a resume (and keeps its slot).
        c.ws.close(None).await.unwrap();
    }
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_http_refused_total{reason=\"pending_per_ip\"}"),
        Some(12.0)
    );
}
