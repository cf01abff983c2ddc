//! Helpers shared by the integration tests: a real server on 127.0.0.1:0 and a WebSocket client
//! that speaks protocol v1.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod netns;
pub mod rtc_client;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry::config::Config;
use ferry::server::{Server, ShutdownHandle};
use ferry::signal::hub::Hub;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub const KEY: &str = "test-key";

/// Generous bound for anything a test waits for; reaching it is a failure, not a measurement.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub media_addr: SocketAddr,
    /// Shard 0's ICE-TCP port, when `media_tcp` is on.
    pub media_tcp_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub hub: Arc<Hub>,
    pub shutdown: ShutdownHandle,
    pub task: JoinHandle<std::io::Result<()>>,
}

pub fn test_config() -> Config {
    Config {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        media_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

pub fn secured_config() -> Config {
    Config {
        api: Some((KEY.into(), SECRET.into())),
        ..test_config()
    }
}

pub async fn spawn(cfg: Config) -> TestServer {
    let server = Server::bind(cfg).await.expect("bind test server");
    let addr = server.local_addr();
    let media_addr = server.media_addr();
    let media_tcp_addr = server.media_tcp_addrs().first().copied();
    let metrics_addr = server.metrics_addr();
    let hub = server.hub();
    let shutdown = server.shutdown_handle();
    let task = tokio::spawn(server.run());
    TestServer {
        addr,
        media_addr,
        media_tcp_addr,
        metrics_addr,
        hub,
        shutdown,
        task,
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    next_id: u64,
    events: VecDeque<Value>,
    pub user_id: String,
}

/// A refused request: `(code, message)`.
pub type Refusal = (String, String);

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_query(addr, "").await
    }

    pub async fn connect_query(addr: SocketAddr, query: &str) -> Client {
        let url = format!("ws://{addr}/ws{query}");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("websocket connect");
        Client {
            ws,
            next_id: 1,
            events: VecDeque::new(),
            user_id: String::new(),
        }
    }

    /// A client over an already open WebSocket.
    pub fn from_stream(ws: Ws) -> Client {
        Client {
            ws,
            next_id: 1,
            events: VecDeque::new(),
            user_id: String::new(),
        }
    }

    /// Connect and say hello (dev mode); returns the client with its user id set.
    pub async fn joined_hello(addr: SocketAddr, identity: &str) -> Client {
        let mut c = Client::connect(addr).await;
        let w = c
            .request("hello", json!({"identity": identity}))
            .await
            .expect("hello accepted");
        c.user_id = w["userId"].as_str().unwrap().to_string();
        c
    }

    /// True when no event is waiting in the buffer.
    pub fn events_is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_message(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// Next JSON message from the server; `None` when the connection closed.
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no message from the server in time");
            match m {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("server sends JSON"));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Send a request and wait for its response, keeping events that arrive meanwhile.
    pub async fn request(&mut self, ty: &str, fields: Value) -> Result<Value, Refusal> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = fields.as_object().cloned().unwrap_or_default();
        msg.insert("id".into(), json!(id));
        msg.insert("type".into(), json!(ty));
        self.send_raw(&Value::Object(msg).to_string()).await;
        self.response_for(&json!(id)).await
    }

    /// Wait for the response with this id.
    pub async fn response_for(&mut self, id: &Value) -> Result<Value, Refusal> {
        loop {
            let m = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("connection closed while waiting for response {id}"));
            if m["type"] == "response" && &m["id"] == id {
                return response_result(m);
            }
            self.events.push_back(m);
        }
    }

    /// An event kept while waiting for a response, if any (without waiting).
    pub fn queued(&mut self) -> Option<Value> {
        self.events.pop_front()
    }

    /// The next message that is not a response.
    pub async fn event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        loop {
            let m = self
                .recv()
                .await
                .expect("connection closed waiting for an event");
            if m["type"] != "response" {
                return m;
            }
        }
    }

    /// Skip events until one matches.
    pub async fn event_where(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        loop {
            let e = self.event().await;
            if f(&e) {
                return e;
            }
        }
    }

    /// Read until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server did not close in time");
            match m {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return (CloseCode::Status.into(), String::new()),
                None | Some(Err(_)) => return (1006, String::new()),
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn create_room(&mut self, fields: Value) -> String {
        let r = self
            .request("createRoom", fields)
            .await
            .expect("room created");
        r["roomId"].as_str().unwrap().to_string()
    }
}

pub fn response_result(m: Value) -> Result<Value, Refusal> {
    if let Some(e) = m.get("error") {
        Err((
            e["code"].as_str().unwrap_or_default().to_string(),
            e["message"].as_str().unwrap_or_default().to_string(),
        ))
    } else {
        Ok(m["result"].clone())
    }
}

/// A minimal HTTP/1.1 GET over a raw socket: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw_get(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn raw_get(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("http connect");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// The value of a metric sample line (exact name with labels) in Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Two dev-mode clients in a new room; `a`'s event about `b` joining is already consumed.
pub async fn two_in_a_room(addr: SocketAddr, a: &str, b: &str) -> (Client, Client, String) {
    let mut a = Client::joined_hello(addr, a).await;
    let mut b = Client::joined_hello(addr, b).await;
    let room = a.create_room(json!({})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let ev = a.event().await;
    assert_eq!(ev["event"], "join");
    (a, b, room)
}

/// Whether an external program a test needs (`prometheus`, `nginx`, …) is installed. In CI (`CI`
/// set) a missing one fails the test; elsewhere the test says it is skipped and why, on standard
/// error past the test harness's capture (so that `.ci/run` can count it), and returns.
pub fn program_available(program: &str, version_flag: &str, test: &str, package: &str) -> bool {
    if std::process::Command::new(program)
        .arg(version_flag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{program} is not installed, in CI (apt-get install {package})"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: {program} is not installed (apt-get install {package}; .ci/run does)"
    );
    false
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// A child process, killed by its PID and reaped when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh directory under the system's temporary directory, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let n: u64 = rand::random();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n:016x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Wait until something accepts TCP connections on `addr`; false when nothing did in time.
pub async fn wait_for_listener(addr: SocketAddr) -> bool {
    for _ in 0..400 {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// A GET in HTTP/1.0 (so the answer is never chunked): `(status, body)`. For servers other than
/// Ferry (Prometheus's API).
pub async fn http10_get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw_get(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .await
}

/// Percent-encode a URL query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
