//! The media port: embedded STUN for anyone, and garbage that is dropped, counted and harmless.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use rtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Getter, Message, Setter};
use rtc::stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;

/// Ask the media port for our reflexive address with a STUN Binding request.
async fn stun_binding(sock: &UdpSocket, server: SocketAddr) -> SocketAddr {
    let mut req = Message::new();
    req.build(&[Box::new(BINDING_REQUEST) as Box<dyn Setter>])
        .unwrap();
    req.new_transaction_id().unwrap();
    sock.send_to(&req.raw, server).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("STUN answer in time")
        .unwrap();
    assert_eq!(from, server);
    let mut resp = Message::new();
    resp.unmarshal_binary(&buf[..n]).unwrap();
    assert_eq!(resp.typ, BINDING_SUCCESS);
    assert_eq!(resp.transaction_id, req.transaction_id);
    let mut xor = XorMappedAddress::default();
    xor.get_from(&resp).unwrap();
    SocketAddr::new(xor.ip, xor.port)
}

#[tokio::test]
async fn stun_binding_requests_are_answered_for_anyone() {
    let s = spawn(test_config()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mapped = stun_binding(&sock, s.media_addr).await;
    assert_eq!(mapped, sock.local_addr().unwrap());
    // No session, no token needed: it is the public STUN service of the port.
    assert_eq!(s.hub.metrics.stun_bindings.get(), 1);
}

#[tokio::test]
async fn garbage_datagrams_are_dropped_counted_and_harmless() {
    let s = spawn(test_config()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut stun = Message::new();
    stun.build(&[Box::new(BINDING_REQUEST) as Box<dyn Setter>])
        .unwrap();
    let mut lying_length = stun.raw.clone();
    lying_length[3] = 0xff;
    let mut response = Message::new();
    response
        .build(&[Box::new(BINDING_SUCCESS) as Box<dyn Setter>])
        .unwrap();
    let mut ice_check = Message::new();
    ice_check
        .build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(rtc::stun::textattrs::Username::new(
                rtc::stun::attributes::ATTR_USERNAME,
                "nobody:x".into(),
            )),
        ])
        .unwrap();
    let garbage: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "malformed"),
        (vec![0x47; 200], "malformed"),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "malformed"),
        (stun.raw[..12].to_vec(), "malformed"),
        (lying_length, "malformed"),
        (response.raw.clone(), "unexpected_stun"),
        (ice_check.raw.clone(), "unknown_peer"),
        (
            vec![22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
            "unknown_peer",
        ),
        (
            vec![0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 9, 9],
            "unknown_peer",
        ),
        (vec![0xff; 1400], "malformed"),
    ];
    let mut expected = std::collections::HashMap::<&str, u64>::new();
    for (bytes, reason) in &garbage {
        sock.send_to(bytes, s.media_addr).await.unwrap();
        *expected.entry(reason).or_default() += 1;
    }
    // The loop is not stalled: a good request right after is answered.
    let mapped = stun_binding(&sock, s.media_addr).await;
    assert_eq!(mapped, sock.local_addr().unwrap());
    for (reason, n) in expected {
        assert_eq!(
            s.hub
                .metrics
                .media_dropped
                .with_label_values(&[reason])
                .get(),
            n,
            "drops with reason {reason}"
        );
    }
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(
        m.contains("ferry_media_dropped_total{reason=\"malformed\"} 6"),
        "{m}"
    );
}

/// An independent STUN client (coturn's turnutils_stunclient) gets its reflexive address.
#[tokio::test]
async fn a_real_stun_client_learns_its_address() {
    if Command::new("turnutils_stunclient")
        .arg("-h")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "turnutils_stunclient (Debian coturn) missing in CI"
        );
        // Past the test harness's capture, so that .ci/run's summary counts the skip.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED a_real_stun_client_learns_its_address: turnutils_stunclient (apt-get install coturn) is not installed"
        );
        return;
    }
    let s = spawn(test_config()).await;
    let port = s.media_addr.port().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("turnutils_stunclient")
            .args(["-p", &port, "127.0.0.1"])
            .output(),
    )
    .await
    .expect("turnutils_stunclient finished")
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("UDP reflexive addr: 127.0.0.1:"),
        "turnutils_stunclient said: {text}"
    );
    assert!(s.hub.metrics.stun_bindings.get() >= 1);
}

/// `bytes` with its RFC 4571 length prefix.
fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut f = (bytes.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

/// Read until the server closes the connection (EOF or reset); false if it stays open.
async fn closed_by_server(c: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The media port over TCP (ICE-TCP): a framed STUN binding request gets a framed answer with
/// the client's address.
#[tokio::test]
async fn stun_over_tcp_is_answered_in_frames() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = spawn(test_config()).await;
    let tcp = s.media_tcp_addr.expect("media over TCP is on by default");
    assert_eq!(tcp.ip(), s.media_addr.ip());
    let mut c = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let mut req = Message::new();
    req.build(&[Box::new(BINDING_REQUEST) as Box<dyn Setter>])
        .unwrap();
    req.new_transaction_id().unwrap();
    c.write_all(&framed(&req.raw)).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, c.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut body).await.unwrap();
    let mut resp = Message::new();
    resp.unmarshal_binary(&body).unwrap();
    assert_eq!(resp.typ, BINDING_SUCCESS);
    let mut xor = XorMappedAddress::default();
    xor.get_from(&resp).unwrap();
    assert_eq!(SocketAddr::new(xor.ip, xor.port), c.local_addr().unwrap());
}

/// Bad input over TCP: a frame longer than the relay takes closes that connection (counted), and
/// connections past `media_tcp_max_connections` are closed at once (counted); the others stay.
#[tokio::test]
async fn tcp_clients_cannot_take_more_than_their_share() {
    use tokio::io::AsyncWriteExt;
    let s = spawn(ferry::config::Config {
        media_tcp_max_connections: 3,
        ..test_config()
    })
    .await;
    let tcp = s.media_tcp_addr.unwrap();
    let mut long = tokio::net::TcpStream::connect(tcp).await.unwrap();
    long.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    assert!(
        closed_by_server(&mut long).await,
        "a 64 KiB frame was accepted"
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(tcp).await.unwrap());
    }
    // Let the server count them before the next one.
    for _ in 0..100 {
        let (_, m) = http_get(s.addr, "/metrics").await;
        if metric(&m, "ferry_media_tcp_connections") == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut extra = tokio::net::TcpStream::connect(tcp).await.unwrap();
    assert!(
        closed_by_server(&mut extra).await,
        "the fourth connection was kept"
    );
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "ferry_media_tcp_refused_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "ferry_media_tcp_connections"), Some(3.0), "{m}");
    assert!(
        metric(&m, "ferry_media_dropped_total{reason=\"malformed\"}").unwrap() >= 1.0,
        "{m}"
    );
    // The three held connections are still served.
    let mut c = held.pop().unwrap();
    let mut req = Message::new();
    req.build(&[Box::new(BINDING_REQUEST) as Box<dyn Setter>])
        .unwrap();
    req.new_transaction_id().unwrap();
    c.write_all(&framed(&req.raw)).await.unwrap();
    let mut len = [0u8; 2];
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(WAIT, c.read_exact(&mut len))
        .await
        .expect("a held connection is answered")
        .unwrap();
}
