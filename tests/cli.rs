//! The binary's configuration handling: bad values are named before anything starts; the file,
//! the environment and the flags layer in that order.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            c.env_remove(k);
        }
    }
    c
}

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "expected a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

#[test]
fn bad_flag_values_are_named() {
    fails_with(ferry().args(["--p2p-timeout", "soon"]), "p2p_timeout");
    fails_with(ferry().args(["--http-listen", "localhost"]), "http_listen");
    fails_with(
        ferry().args(["serve", "--ping-interval", "30s", "--ping-timeout", "10s"]),
        "ping_timeout",
    );
    fails_with(ferry().env("FERRY_API_SECRET", "short"), "at least 32");
    fails_with(ferry().env("FERRY_LOG_FORMAT", "xml"), "log_format");
    fails_with(
        ferry().args(["--srtp-profiles", "aes128-gcm,null"]),
        "unknown profile \"null\"",
    );
    fails_with(ferry().env("FERRY_SRTP_PROFILES", ""), "srtp_profiles");
}

#[test]
fn bad_config_files_are_named() {
    let dir = std::env::temp_dir().join(format!("ferry-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, "htp_listen = \"127.0.0.1:1\"\n").unwrap();
    fails_with(
        ferry().args(["--config", f.to_str().unwrap()]),
        "unknown field",
    );
    fails_with(
        ferry().args(["--config", "/nonexistent/ferry.toml"]),
        "cannot read config file",
    );
    let f2 = dir.join("bad-ice.toml");
    std::fs::write(&f2, "[[ice_servers]]\nurls = [\"http://x\"]\n").unwrap();
    fails_with(ferry().env("FERRY_CONFIG", &f2), "ice_servers");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// File < environment < flags, seen in what the running server reports.
#[tokio::test]
async fn file_env_and_flags_layer() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("ferry-layer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("ferry.toml");
    std::fs::write(
        &f,
        format!(
            "http_listen = \"127.0.0.1:{port}\"\nmedia_listen = \"127.0.0.1:0\"\np2p_max_peers = 7\np2p_timeout = \"9s\"\n\
             [[ice_servers]]\nurls = [\"stun:127.0.0.1:3478\"]\n"
        ),
    )
    .unwrap();
    let mut child = ferry()
        .args([
            "serve",
            "--config",
            f.to_str().unwrap(),
            "--p2p-max-peers",
            "4",
        ])
        .env("FERRY_P2P_TIMEOUT", "3s")
        .env("FERRY_P2P_MAX_PEERS", "5")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut a = Client::connect(addr).await;
    let w = a.request("hello", serde_json::json!({})).await;
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
    let w = w.unwrap();
    assert_eq!(w["p2pMaxPeers"], 4, "flag beats env and file");
    assert_eq!(w["p2pTimeoutMs"], 3000, "env beats file");
    let own = w["iceServers"][0]["urls"][0].as_str().unwrap();
    assert!(
        own.starts_with("stun:127.0.0.1:"),
        "Ferry's own STUN comes first: {own}"
    );
    assert_eq!(w["iceServers"][1]["urls"][0], "stun:127.0.0.1:3478");
}

#[tokio::test]
async fn metrics_can_have_their_own_address() {
    let mut cfg = test_config();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let s = spawn(cfg).await;
    assert_eq!(http_get(s.addr, "/metrics").await.0, 404);
    let (status, body) = http_get(s.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("ferry_build_info{version=\""), "{body}");
    assert!(
        body.contains("process_cpu_seconds_total"),
        "process collector present"
    );
    assert_eq!(http_get(s.addr, "/healthz").await, (200, "ok\n".into()));
    let (status, sdk) = http_get(s.addr, "/sdk/ferry.js").await;
    assert_eq!(status, 200);
    assert!(sdk.contains("export class Ferry"));
    let (status, page) = http_get(s.addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("/sdk/ferry.js"));
}
