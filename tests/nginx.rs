//! Ferry behind a real load balancer: Debian's nginx in front of the real binary, on loopback,
//! proxying HTTP and the WebSocket as docs/deploy.md shows. Signaling works through it, and
//! SIGTERM drains: `/readyz` seen through nginx turns to 503 while the call in progress goes on
//! until its members leave, or until the drain timeout closes it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// The proxy configuration, as in docs/deploy.md but on loopback, single-process and with every
/// path inside `dir`.
fn nginx_conf(dir: &Path, listen: SocketAddr, ferry: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream ferry {{
        server {ferry};
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://ferry;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
        location = /ws {{
            proxy_pass http://ferry;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_buffering off;
        }}
        location = /metrics {{
            deny all;
        }}
    }}
}}
"#
    )
}

/// The real `ferry` binary (JSON logs into `dir/ferry.log`) with nginx in front of it.
struct Stack {
    ferry: std::process::Child,
    ferry_addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// Where clients connect: nginx.
    lb: SocketAddr,
    // Fields drop in order: nginx goes before its directory (ferry goes first, in `drop`).
    _nginx: ChildGuard,
    dir: TempDir,
}

impl Stack {
    async fn start(drain_timeout: &str) -> Stack {
        let dir = TempDir::new("ferry-nginx");
        let ferry_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("ferry.log")).unwrap();
        let ferry = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "serve",
                "--log-format",
                "json",
                "--drain-timeout",
                drain_timeout,
            ])
            .arg("--http-listen")
            .arg(ferry_addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics_addr.to_string())
            .args(["--media-listen", "127.0.0.1:0"])
            .env("FERRY_LOG", "info")
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_API_SECRET")
            .env_remove("FERRY_API_KEY")
            .env_remove("FERRY_LOG_FORMAT")
            // Ferry logs to standard output.
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferry");
        let lb: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir.path(), lb, ferry_addr)).unwrap();
        let nginx_log = std::fs::File::create(dir.path().join("nginx.log")).unwrap();
        let nginx = Command::new(nginx_bin())
            .arg("-e")
            .arg("stderr")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(nginx_log)
            .spawn()
            .expect("start nginx");
        let mut s = Stack {
            ferry,
            ferry_addr,
            metrics_addr,
            lb,
            _nginx: ChildGuard(nginx),
            dir,
        };
        assert!(
            wait_for_listener(s.ferry_addr).await,
            "ferry did not start: {}",
            s.log("ferry.log")
        );
        assert!(
            wait_for_listener(s.lb).await,
            "nginx did not start: {}",
            s.log("nginx.log")
        );
        assert!(s.ferry.try_wait().unwrap().is_none());
        s
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.ferry.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn running(&mut self) -> bool {
        self.ferry.try_wait().unwrap().is_none()
    }

    /// Wait (bounded) for ferry to exit; its exit status.
    async fn exited(&mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(st) = self.ferry.try_wait().unwrap() {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("ferry did not exit: {}", self.log("ferry.log"));
    }

    /// Ferry's JSON log lines.
    fn log_lines(&self) -> Vec<Value> {
        self.log("ferry.log")
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|_| panic!("a log line that is not JSON: {l}"))
            })
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.ferry.kill();
        let _ = self.ferry.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_behind_nginx_turns_readyz_503_and_the_call_goes_on() {
    let test = "sigterm_behind_nginx_turns_readyz_503_and_the_call_goes_on";
    if !program_available(nginx_bin(), "-v", test, "nginx") {
        return;
    }
    let mut s = Stack::start("60s").await;
    assert_eq!(http_get(s.lb, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(s.lb, "/readyz").await, (200, "ready\n".into()));
    // Metrics are for Prometheus on their own address, not for the public.
    assert_eq!(http_get(s.lb, "/metrics").await.0, 403);
    let (status, m) = http_get(s.metrics_addr, "/metrics").await;
    assert_eq!((status, metric(&m, "ferry_ready")), (200, Some(1.0)));

    // Two members call each other through nginx.
    let (mut a, mut b, room) = two_in_a_room(s.lb, "alice", "bob").await;
    a.request("offer", json!({"to": b.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(b.event().await["type"], "offer");
    b.request("answer", json!({"to": a.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(a.event().await["from"], json!(b.user_id));
    let (_, m) = http_get(s.metrics_addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_ws_connections"), Some(2.0));
    assert_eq!(metric(&m, "ferry_pairs{mode=\"p2p\"}"), Some(1.0));

    s.sigterm();
    assert_eq!(a.event().await["type"], "draining");
    assert_eq!(b.event().await["type"], "draining");
    // The load balancer's health check now sees "not ready"; the process is alive.
    assert_eq!(http_get(s.lb, "/readyz").await, (503, "draining\n".into()));
    assert_eq!(http_get(s.lb, "/healthz").await.0, 200);
    let (_, m) = http_get(s.metrics_addr, "/metrics").await;
    assert_eq!(metric(&m, "ferry_ready"), Some(0.0));
    // A new session through the balancer is turned away, to try another instance.
    let mut late = Client::connect(s.lb).await;
    let (code, reason) = late.expect_close().await;
    assert_eq!(code, 1013, "{reason}");

    // The call in progress goes on.
    b.request(
        "candidate",
        json!({"to": a.user_id, "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}}),
    )
    .await
    .unwrap();
    assert_eq!(a.event().await["type"], "candidate");
    a.request("offer", json!({"to": b.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(b.event().await["type"], "offer");
    assert!(s.running(), "exited while its call was in progress");

    // Until its members leave: then the process exits cleanly, and nginx has no one left to ask.
    a.request("leaveRoom", json!({})).await.unwrap();
    a.ws.close(None).await.unwrap();
    assert!(s.running(), "exited while a member was still connected");
    b.ws.close(None).await.unwrap();
    let status = s.exited().await;
    assert!(status.success(), "{status:?}: {}", s.log("ferry.log"));
    assert_eq!(http_get(s.lb, "/healthz").await.0, 502);

    // JSON logs, one span per session carrying the user; the lines about a room name it.
    let lines = s.log_lines();
    let in_session = |user: &str, message: &str| {
        lines.iter().any(|l| {
            l["fields"]["message"] == message
                && l["span"]["name"] == "session"
                && l["span"]["user"] == user
                && l["fields"]["room"] == room.as_str()
        })
    };
    assert!(
        in_session(&a.user_id, "left room"),
        "no session line for alice with her room: {}",
        s.log("ferry.log")
    );
    assert!(
        in_session(&b.user_id, "session ended"),
        "no session line for bob with his room: {}",
        s.log("ferry.log")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_a_call_behind_nginx() {
    let test = "drain_timeout_ends_a_call_behind_nginx";
    if !program_available(nginx_bin(), "-v", test, "nginx") {
        return;
    }
    let mut s = Stack::start("1s").await;
    let (mut a, mut b, _) = two_in_a_room(s.lb, "alice", "bob").await;
    s.sigterm();
    assert_eq!(a.event().await["type"], "draining");
    assert_eq!(http_get(s.lb, "/readyz").await.0, 503);
    // Nobody leaves: the drain timeout closes both sessions, through nginx, as "going away".
    let (code, reason) = a.expect_close().await;
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("shutting down"), "{reason}");
    assert_eq!(b.expect_close().await.0, 1001);
    let status = s.exited().await;
    assert!(status.success(), "{status:?}: {}", s.log("ferry.log"));
}
