//! The HTTP port's own limits, with raw TCP connections: a connection that never sends a whole
//! request head is closed after `http_header_timeout`, one address holds at most
//! `max_connections_per_ip` connections, and `/healthz` still answers while a flood of half-open
//! connections meets a low open-file limit (the real binary, started under `prlimit`).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(local: &str, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().unwrap())?;
    socket.connect(server).await
}

/// Whether the server closes `c` (EOF or reset) within `within`.
async fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, c.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn half_open_and_idle_connections_are_closed_after_the_header_timeout() {
    let s = spawn(ferry::config::Config {
        http_header_timeout: Duration::from_secs(1),
        ..test_config()
    })
    .await;
    // Silent from the start, and half a request head.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(s.addr).await.unwrap());
    }
    let mut partial = TcpStream::connect(s.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Idle after one request on a keep-alive connection.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    for (what, c) in silent
        .iter_mut()
        .map(|c| ("silent", c))
        .chain([("partial", &mut partial), ("idle", &mut idle)])
    {
        assert!(
            closed_within(c, WAIT).await,
            "a {what} connection stayed open past the header timeout"
        );
    }
    // The server itself is fine.
    assert_eq!(http_get(s.addr, "/healthz").await.0, 200);
}

#[tokio::test]
async fn one_address_holds_at_most_max_connections_per_ip() {
    let s = spawn(ferry::config::Config {
        max_connections_per_ip: 3,
        ..test_config()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.2", s.addr).await.unwrap());
    }
    let mut extra = connect_from("127.0.0.2", s.addr).await.unwrap();
    assert!(closed_within(&mut extra, WAIT).await, "a fourth was kept");
    // Another address is served.
    assert_eq!(http_get(s.addr, "/healthz").await.0, 200);
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_http_refused_total{reason=\"per_ip\"}"),
        Some(1.0),
        "{m}"
    );
    // Held ones still work.
    held[0]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = held[0].read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// The real binary with 256 open files allowed: 300 half-open connections from one address
/// cannot take them all (the per-address cap) and those it holds go at the header timeout, so
/// `/healthz` keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_under_a_half_open_flood_with_few_descriptors() {
    if !program_available(
        "prlimit",
        "--version",
        "healthz_answers_under_a_half_open_flood_with_few_descriptors",
        "util-linux",
    ) {
        return;
    }
    let port = free_port();
    let mut child = Command::new("prlimit")
        .args(["--nofile=256:256", "--"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--http-listen",
            &format!("127.0.0.1:{port}"),
            "--media-listen",
            "127.0.0.1:0",
            "--max-connections-per-ip",
            "150",
            "--http-header-timeout",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferry under prlimit");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_for_listener(addr).await, "ferry did not start");
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(c) = connect_from("127.0.0.2", addr).await {
            flood.push(c);
        }
    }
    let mut answered = 0;
    for _ in 0..10 {
        let got = tokio::time::timeout(WAIT, http_get(addr, "/healthz")).await;
        if matches!(got, Ok((200, _))) {
            answered += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(flood);
    assert_eq!(
        answered, 10,
        "/healthz answered {answered} of 10 times under the flood"
    );
}

/// A WebSocket handshake to `/ws` carrying `origin` (none: a client that is not a browser): the
/// HTTP status the server answers with.
async fn ws_status(addr: SocketAddr, origin: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

/// `allowed_origins`: pages of other origins cannot open a session (403 before the upgrade,
/// counted); the listed origin and clients without an Origin header can. Without the setting,
/// any origin is let in.
#[tokio::test]
async fn only_allowed_origins_open_websockets() {
    let s = spawn(ferry::config::Config {
        allowed_origins: vec!["https://app.example".into()],
        ..test_config()
    })
    .await;
    assert_eq!(ws_status(s.addr, Some("https://evil.example")).await, 403);
    assert_eq!(ws_status(s.addr, Some("https://app.example")).await, 101);
    assert_eq!(ws_status(s.addr, Some("HTTPS://APP.EXAMPLE")).await, 101);
    assert_eq!(ws_status(s.addr, None).await, 101);
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_http_refused_total{reason=\"origin\"}"),
        Some(1.0)
    );
    let open = spawn(test_config()).await;
    assert_eq!(
        ws_status(open.addr, Some("https://evil.example")).await,
        101
    );
}
