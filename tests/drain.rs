//! Graceful shutdown: readiness, refusal of new sessions, the `draining` event, and the exit.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn drain_waits_for_clients_to_leave() {
    let mut cfg = test_config();
    cfg.drain_timeout = Duration::from_secs(60);
    let s = spawn(cfg).await;
    assert_eq!(http_get(s.addr, "/readyz").await.0, 200);
    let (mut a, mut b, _) = two_in_a_room(s.addr, "a", "b").await;

    s.shutdown.shutdown();
    let ev = a.event().await;
    assert_eq!(ev, json!({"type": "draining", "deadlineMs": 60000}));
    assert_eq!(b.event().await["type"], "draining");

    // Not ready, still alive.
    let (status, body) = http_get(s.addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert_eq!(http_get(s.addr, "/healthz").await.0, 200);

    // New sessions are refused; new rooms and joins too.
    let mut late = Client::connect(s.addr).await;
    let (code, reason) = late.expect_close().await;
    assert_eq!(code, 1013);
    assert!(reason.contains("draining"), "{reason}");
    let e = a.request("createRoom", json!({})).await.unwrap_err();
    assert_eq!(e.0, "draining");

    // The call in progress continues.
    a.request("offer", json!({"to": b.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(b.event().await["type"], "offer");

    // The server exits once both have left, long before the drain timeout.
    a.ws.close(None).await.unwrap();
    b.ws.close(None).await.unwrap();
    let res = tokio::time::timeout(WAIT, s.task)
        .await
        .expect("server exits after the last client left");
    res.unwrap().unwrap();
}

#[tokio::test]
async fn drain_timeout_closes_the_remaining_sessions() {
    let mut cfg = test_config();
    cfg.drain_timeout = Duration::from_millis(300);
    let s = spawn(cfg).await;
    let mut a = Client::joined_hello(s.addr, "a").await;
    s.shutdown.shutdown();
    assert_eq!(a.event().await["type"], "draining");
    let (code, reason) = a.expect_close().await;
    assert_eq!(code, 1001);
    assert!(reason.contains("shutting down"), "{reason}");
    tokio::time::timeout(WAIT, s.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The real binary, SIGTERM and all.
#[tokio::test]
async fn sigterm_drains_the_real_binary() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--http-listen",
            &addr.to_string(),
            "--drain-timeout",
            "30s",
        ])
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_API_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "server did not start");
    let mut a = Client::joined_hello(addr, "a").await;

    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(a.event().await["type"], "draining");
    assert_eq!(http_get(addr, "/readyz").await.0, 503);
    // Still served while draining.
    a.request("ping", json!({})).await.unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before its client left"
    );

    a.ws.close(None).await.unwrap();
    let status = exited_within(&mut child, Duration::from_secs(10))
        .await
        .expect("ferry did not exit after its last client left");
    assert!(status.success(), "{status:?}");
}

/// The child's exit status once it exits, within `within`; `None` (and the child killed) if it
/// does not.
async fn exited_within(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill();
    None
}

/// A second SIGTERM during a drain cuts it short: with a client still connected and a drain
/// timeout of five minutes, the binary closes the session (1001) and exits at once.
#[tokio::test]
async fn a_second_sigterm_cuts_the_drain_short() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--http-listen",
            &addr.to_string(),
            "--media-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "300s",
        ])
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_API_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    assert!(wait_for_listener(addr).await, "server did not start");
    let mut a = Client::joined_hello(addr, "a").await;
    let term = || {
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    term();
    assert_eq!(a.event().await["type"], "draining");
    a.request("ping", json!({})).await.unwrap();
    term();
    let (code, _) = a.expect_close().await;
    assert_eq!(code, 1001);
    let status = exited_within(&mut child, Duration::from_secs(20))
        .await
        .expect("ferry kept draining after a second SIGTERM");
    assert!(status.success(), "{status:?}");
}
