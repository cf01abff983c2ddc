//! Real Chromium for tests: started headless inside a loopback-only network namespace and driven
//! over the Chrome DevTools Protocol (a handful of calls: open a page, evaluate JavaScript).
//!
//! Network rule: WebRTC gathers candidates on every interface, so a browser in the machine's own
//! namespace could send media to a non-loopback address. The test therefore re-executes itself
//! under `unshare --net` (only `lo`, brought up), and runs the server and the browser there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub fn chromium_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

pub use super::netns::Place;

/// Make sure the calling test runs in a loopback-only network namespace (see
/// [`super::netns::in_new_netns`]); it needs Chromium.
pub fn in_loopback_netns(test_name: &str) -> Place {
    let missing = chromium_path()
        .is_none()
        .then_some("Chromium is not installed (apt-get install chromium)");
    super::netns::in_new_netns(test_name, "", missing)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A headless Chromium and a CDP connection to it. Killed (by PID) on drop.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    ws: Ws,
    next_id: u64,
    /// The DevTools port on 127.0.0.1.
    pub port: u16,
    /// Console messages of every page, in arrival order: `(session, text)`.
    pub console: Vec<(String, String)>,
}

/// Where and how a browser runs (default: as the test process does).
#[derive(Default)]
pub struct Launch<'a> {
    /// Every process of it in this cgroup (v2) directory.
    pub cgroup: Option<&'a std::path::Path>,
    /// In this named network namespace (`ip netns`).
    pub netns: Option<&'a str>,
    /// An origin (`http://host:port`) Chromium treats as secure (cameras need a secure origin;
    /// only localhost is one over plain HTTP).
    pub secure_origin: Option<&'a str>,
}

/// One page (tab) of the browser, identified by its CDP session.
#[derive(Clone)]
pub struct Page {
    pub session: String,
    pub name: String,
}

impl Browser {
    pub async fn launch() -> Browser {
        Browser::launch_with(Launch::default()).await
    }

    /// Launch Chromium with every process of it in the cgroup (v2) directory `cgroup`, so that
    /// iptables' `-m cgroup --path` rules apply to this browser alone.
    pub async fn launch_in(cgroup: Option<&std::path::Path>) -> Browser {
        Browser::launch_with(Launch {
            cgroup,
            ..Launch::default()
        })
        .await
    }

    pub async fn launch_with(how: Launch<'_>) -> Browser {
        let cgroup = how.cgroup;
        let bin = chromium_path().expect("chromium");
        let profile = std::env::temp_dir().join(format!(
            "ferry-chromium-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        // In the cgroup from its first instruction: a shell joins it, then becomes Chromium.
        let mut command = match cgroup {
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(dir)
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // In another network namespace: `ip netns exec` enters it and becomes the command.
        if let Some(ns) = how.netns {
            let inner = command;
            command = Command::new("ip");
            command
                .args(["netns", "exec", ns])
                .arg(inner.get_program())
                .args(inner.get_args());
        }
        if let Some(origin) = how.secure_origin {
            command.arg(format!(
                "--unsafely-treat-insecure-origin-as-secure={origin}"
            ));
        }
        let child = command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--disable-renderer-backgrounding",
                "--disable-background-timer-throttling",
                "--disable-backgrounding-occluded-windows",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes its DevTools port and browser path into the profile.
        let port_file = profile.join("DevToolsActivePort");
        let mut contents = String::new();
        for _ in 0..400 {
            if let Ok(c) = std::fs::read_to_string(&port_file)
                && c.lines().count() >= 2
            {
                contents = c;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !contents.is_empty(),
            "Chromium did not open its DevTools port"
        );
        let mut lines = contents.lines();
        let port: u16 = lines.next().unwrap().trim().parse().expect("DevTools port");
        let path = lines.next().unwrap().trim();
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = match how.netns {
            None => tokio_tungstenite::connect_async(url).await,
            Some(ns) => {
                // Its DevTools port is on that namespace's loopback: connect from inside it.
                let stream = super::netns::connect_in(ns, SocketAddr::from(([127, 0, 0, 1], port)));
                tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await
            }
        }
        .expect("connect to DevTools");
        Browser {
            child,
            profile,
            ws,
            next_id: 1,
            port,
            console: Vec::new(),
        }
    }

    /// Send a CDP command (optionally to a page session) and wait for its result.
    pub async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("CDP send");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("CDP {method} got no answer"))
                .expect("CDP connection open")
                .expect("CDP read");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["method"] == "Runtime.consoleAPICalled" {
                let p = &v["params"];
                let text: Vec<String> = p["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                x["value"]
                                    .as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| x["description"].to_string())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let line = format!("{}: {}", p["type"].as_str().unwrap_or(""), text.join(" "));
                self.console
                    .push((v["sessionId"].as_str().unwrap_or("").to_string(), line));
                continue;
            }
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("CDP {method} failed: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Grant camera and microphone to an origin, as a user who clicked "Allow" once would.
    /// Chromium enumerates local network interfaces for ICE only for pages with media
    /// permission; the fake media UI alone leaves that check racy.
    pub async fn grant_media(&mut self, origin: &str) {
        self.call(
            None,
            "Browser.grantPermissions",
            json!({"origin": origin, "permissions": ["audioCapture", "videoCapture"]}),
        )
        .await;
    }

    /// Save a PNG screenshot of the page.
    pub async fn screenshot(&mut self, page: &Page, path: &std::path::Path) {
        let r = self
            .call(
                Some(&page.session),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or_default())
            .expect("screenshot is base64");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Open a new page at `url`.
    pub async fn open(&mut self, name: &str, url: &str) -> Page {
        let t = self
            .call(
                None,
                "Target.createTarget",
                json!({"url": url, "newWindow": true}),
            )
            .await;
        let target = t["targetId"].as_str().unwrap().to_string();
        let a = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        let page = Page {
            session: a["sessionId"].as_str().unwrap().to_string(),
            name: name.to_string(),
        };
        self.call(Some(&page.session), "Runtime.enable", json!({}))
            .await;
        page
    }

    /// The console lines of one page.
    pub fn console_of(&self, page: &Page) -> Vec<String> {
        self.console
            .iter()
            .filter(|(s, _)| *s == page.session)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Evaluate an expression (promises awaited) in the page and return its JSON value.
    pub async fn eval(&mut self, page: &Page, expr: &str) -> Value {
        let r = self
            .call(
                Some(&page.session),
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true, "userGesture": true}),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("[{}] script threw: {ex}", page.name);
        }
        r["result"]["value"].clone()
    }

    /// Evaluate `expr` until it returns something truthy; panics after `limit`.
    pub async fn wait_for(&mut self, page: &Page, expr: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let v = self.eval(page, expr).await;
            let truthy = !(v.is_null() || v == json!(false) || v == json!(0) || v == json!(""));
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("[{}] waited {limit:?} for `{expr}`", page.name);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
