//! Access tokens against a server with an API secret, and the `ferry token` command.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use ferry::auth::{Grants, Verifier, mint};
use serde_json::json;

fn token(identity: &str, grants: Grants) -> String {
    mint(KEY, SECRET, identity, Duration::from_secs(600), grants).unwrap()
}

#[tokio::test]
async fn missing_malformed_expired_and_forged_tokens_are_refused() {
    let s = spawn(secured_config()).await;

    // No token at all: hello is refused and the connection closed with 4001.
    let mut a = Client::connect(s.addr).await;
    let e = a.request("hello", json!({})).await.unwrap_err();
    assert_eq!(e, ("unauthorized".into(), "access token required".into()));
    assert_eq!(
        a.expect_close().await,
        (4001, "access token required".into())
    );

    // Malformed in the query: refused right after the upgrade.
    let mut b = Client::connect_query(s.addr, "?token=not-a-jwt").await;
    assert_eq!(
        b.expect_close().await,
        (4001, "access token malformed".into())
    );

    // Expired.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(KEY.into());
    let expired = jsonwebtoken::encode(
        &header,
        &json!({"sub": "old", "iat": now - 7200, "exp": now - 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut c = Client::connect_query(s.addr, &format!("?token={expired}")).await;
    assert_eq!(
        c.expect_close().await,
        (4001, "access token expired".into())
    );

    // Signed with another secret, given in hello.
    let forged = mint(
        KEY,
        "another-secret-that-is-long-enough-000",
        "mallory",
        Duration::from_secs(600),
        Grants::default(),
    )
    .unwrap();
    let mut d = Client::connect(s.addr).await;
    let e = d
        .request("hello", json!({"token": forged}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "unauthorized");
    assert_eq!(
        d.expect_close().await,
        (4001, "access token signature invalid".into())
    );

    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_signal_errors_total{code=\"unauthorized\"}"),
        Some(4.0)
    );
}

#[tokio::test]
async fn valid_tokens_in_query_or_hello_set_identity_and_grants() {
    let s = spawn(secured_config()).await;
    let t = token("alice", Grants::default());
    let mut a = Client::connect_query(s.addr, &format!("?token={t}")).await;
    let w = a
        .request("hello", json!({"identity": "ignored"}))
        .await
        .unwrap();
    assert_eq!(w["identity"], "alice");
    assert_eq!(w["grants"]["create"], true);
    let uid = w["userId"].as_str().unwrap().to_string();

    let viewer = Grants {
        publish: false,
        create: false,
        ..Grants::default()
    };
    let mut b = Client::connect(s.addr).await;
    let w = b
        .request("hello", json!({"token": token("bob", viewer)}))
        .await
        .unwrap();
    assert_eq!(w["identity"], "bob");
    assert_eq!(w["grants"]["publish"], false);
    b.user_id = w["userId"].as_str().unwrap().into();

    // No create grant.
    let e = b.request("createRoom", json!({})).await.unwrap_err();
    assert_eq!(e.0, "forbidden");

    // No publish grant: b may receive (recvonly) but not send.
    let room = a.create_room(json!({})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(a.event().await["userId"], b.user_id.as_str());
    let e = b
        .request(
            "offer",
            json!({"to": uid, "sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n"}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.0, "forbidden");
    // What a line-by-line check let through: a direction attribute with a value (webrtc-rs reads
    // `a=sendrecv:x` as sendrecv), and an m-section with no direction (sendrecv by default); to a
    // peer and to the relay, in offers and in answers.
    for sdp in [
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv:x\r\n",
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n",
    ] {
        for (ty, to) in [
            ("offer", uid.as_str()),
            ("answer", uid.as_str()),
            ("offer", "server"),
        ] {
            let e = b
                .request(ty, json!({"to": to, "sdp": sdp}))
                .await
                .unwrap_err();
            assert_eq!(e.0, "forbidden", "{ty} to {to}: {sdp:?}");
        }
    }
    b.request(
        "answer",
        json!({"to": uid, "sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n"}),
    )
    .await
    .unwrap();
    assert_eq!(a.event().await["type"], "answer");
}

#[tokio::test]
async fn a_room_restricted_token_cannot_join_another_room() {
    let s = spawn(secured_config()).await;
    let admin = token("admin", Grants::default());
    let mut adm = Client::connect_query(s.addr, &format!("?token={admin}")).await;
    adm.request("hello", json!({})).await.unwrap();
    adm.create_room(json!({"roomId": "r1"})).await;
    adm.create_room(json!({"roomId": "r2"})).await;

    let only_r1 = Grants {
        room: Some("r1".into()),
        ..Grants::default()
    };
    let mut c = Client::connect_query(s.addr, &format!("?token={}", token("carol", only_r1))).await;
    c.request("hello", json!({})).await.unwrap();
    let e = c
        .request("joinRoom", json!({"roomId": "r2"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "forbidden");
    assert!(e.1.contains("r1"), "{}", e.1);
    let e = c
        .request("createRoom", json!({"roomId": "r3"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "forbidden");
    c.request("joinRoom", json!({"roomId": "r1"}))
        .await
        .unwrap();
}

#[test]
fn token_command_prints_a_verifiable_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "token",
            "--identity",
            "alice",
            "--room",
            "r1",
            "--ttl",
            "1h",
            "--no-publish",
        ])
        .env("FERRY_API_KEY", KEY)
        .env("FERRY_API_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = String::from_utf8(out.stdout).unwrap();
    let claims = Verifier::new(KEY, SECRET).verify(tok.trim()).unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.grants.room.as_deref(), Some("r1"));
    assert!(!claims.grants.publish);
    assert!(claims.grants.subscribe);
    assert!((3590..=3600).contains(&(claims.exp - claims.iat)));
}

#[test]
fn token_command_without_a_secret_says_what_to_set() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["token", "--identity", "alice"])
        .env_remove("FERRY_API_SECRET")
        .env_remove("FERRY_API_KEY")
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FERRY_API_SECRET"), "{err}");
}

/// A member whose token says relayOnly is announced as such, so the others relay too.
#[tokio::test]
async fn relay_only_members_are_announced() {
    let s = spawn(secured_config()).await;
    let mut a = Client::connect_query(
        s.addr,
        &format!("?token={}", token("alice", Grants::default())),
    )
    .await;
    a.request("hello", json!({})).await.unwrap();
    let room = a.create_room(json!({})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let relay = Grants {
        relay_only: true,
        ..Grants::default()
    };
    let mut b = Client::connect_query(s.addr, &format!("?token={}", token("bob", relay))).await;
    let w = b.request("hello", json!({})).await.unwrap();
    assert_eq!(w["grants"]["relayOnly"], true);
    let j = b
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert!(
        j["members"][0].get("relayOnly").is_none(),
        "alice is not relay-only"
    );
    let ev = a.event().await;
    assert_eq!(ev["event"], "join");
    assert_eq!(ev["relayOnly"], true);
    let mut c = Client::connect_query(
        s.addr,
        &format!("?token={}", token("carol", Grants::default())),
    )
    .await;
    c.request("hello", json!({})).await.unwrap();
    let j = c
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(j["members"][1]["relayOnly"], true, "{j}");
}
