//! TLS on Ferry's own port (`tls_cert` / `tls_key`), with the real binary: HTTPS and WSS with a
//! certificate the client trusts, plain HTTP refused, and the certificate replaced on SIGHUP (a
//! broken file then keeps the one in use).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// A self-signed certificate for localhost: (certificate PEM, key PEM, certificate DER).
fn certificate() -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

fn trusting(der: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` as "localhost", trusting only `der`; the certificate it showed.
async fn tls_connect(
    addr: SocketAddr,
    der: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    trusting(der).connect(name, tcp).await
}

async fn https_healthz(addr: SocketAddr, der: &[u8]) -> Option<String> {
    let mut s = tls_connect(addr, der).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

#[tokio::test]
async fn https_and_wss_on_ferrys_port_with_a_certificate_reloaded_on_sighup() {
    let dir = TempDir::new("ferry-tls");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert_a, key_a, der_a) = certificate();
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--http-listen", &addr.to_string()])
        .args(["--media-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_API_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let result = async {
        assert!(wait_for_listener(addr).await, "ferry did not start");
        let page = https_healthz(addr, &der_a).await.expect("HTTPS answered");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        // Plain HTTP on the TLS port gets no answer.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        let _ = tokio::time::timeout(WAIT, plain.read_to_string(&mut buf)).await;
        assert!(!buf.contains("200 OK"), "{buf}");
        // WSS: a session over the TLS connection.
        let tls = tls_connect(addr, &der_a).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}/ws"), tls)
            .await
            .expect("WSS handshake");
        use futures_util::{SinkExt, StreamExt};
        let mut ws = ws;
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            json!({"id": 1, "type": "hello"}).to_string(),
        ))
        .await
        .unwrap();
        let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
        assert!(reply.contains("userId"), "{reply}");

        // A new certificate in the same files, then SIGHUP: new connections get it.
        let (cert_b, key_b, der_b) = certificate();
        std::fs::write(&cert_path, &cert_b).unwrap();
        std::fs::write(&key_path, &key_b).unwrap();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let mut reloaded = false;
        for _ in 0..100 {
            if https_healthz(addr, &der_b).await.is_some() {
                reloaded = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(reloaded, "the new certificate is not served after SIGHUP");
        assert!(
            https_healthz(addr, &der_a).await.is_none(),
            "the old one is"
        );
        // The session opened before the reload goes on.
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            json!({"id": 2, "type": "ping"}).to_string(),
        ))
        .await
        .unwrap();
        assert!(ws.next().await.unwrap().is_ok());
        // A broken file and SIGHUP: the certificate in use stays.
        std::fs::write(&cert_path, "not a certificate").unwrap();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            https_healthz(addr, &der_b).await.is_some(),
            "lost its certificate"
        );
    };
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), result).await;
    let _ = child.kill();
    let _ = child.wait();
    outcome.expect("the test took too long");
}

/// A certificate without its key (or a file that is not one) is refused at start, by name.
#[test]
fn bad_tls_settings_are_named_at_start() {
    let dir = TempDir::new("ferry-tls-bad");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "junk").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--media-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls_key"));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--media-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&cert)
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls_cert"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGHUP (a `systemctl reload`) on a server without TLS changes nothing: it keeps serving.
#[tokio::test]
async fn sighup_without_tls_keeps_the_server_running() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--http-listen", &addr.to_string()])
        .args(["--media-listen", "127.0.0.1:0"])
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_API_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_listener(addr).await, "ferry did not start");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let alive = child.try_wait().unwrap().is_none();
    let health = http_get(addr, "/healthz").await.0;
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "SIGHUP ended the process");
    assert_eq!(health, 200);
}
