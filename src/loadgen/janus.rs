//! `ferry loadgen --target janus`: the same load against a Janus VideoRoom (Janus's WebSocket
//! transport, subprotocol `janus-protocol`), for side-by-side comparisons.
//!
//! Per loadgen room, one VideoRoom room (VP8 and Opus, no bitrate cap). A publisher is a Janus
//! session with one videoroom handle that joins as a publisher and sends `configure` with the
//! peer's offer; a subscriber is another session whose handle joins as a subscriber to every
//! publisher's feed: Janus offers, the peer answers with `start`. Janus only accepts subscribers to
//! feeds whose WebRTC is up, so subscribers retry their join until then. In a meeting, each
//! publisher also gets a subscriber session for the others' feeds (a Janus handle publishes or
//! subscribes, not both). Janus sends its candidates in its SDP (half-trickle); the peer's single
//! host candidate is in its SDP too, and trickled once more for good measure.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::cli::{LoadgenArgs, Shape};
use super::client::{ClientResult, Ctx};
use super::peer::{Peer, Signal};
use super::ws::JsonWs;

/// Janus's error code for a feed that does not exist or has no WebRTC up yet.
const NO_SUCH_FEED: u64 = 428;
/// How long a subscriber waits for its publishers' WebRTC to come up.
const FEEDS_WITHIN: Duration = Duration::from_secs(30);

/// A refused request: Janus's error code (0 when the connection failed) and a readable message.
type Refused = (u64, String);

enum Role {
    /// Joined as a publisher already: `configure` with the offer when the client opens.
    Publisher,
    /// Join as a subscriber to these feeds when the client opens.
    Subscriber { room: u64, feeds: Vec<u64> },
}

/// One Janus session on its own WebSocket, with one `janus.plugin.videoroom` handle.
pub struct Session {
    ws: JsonWs,
    session: u64,
    handle: u64,
    next_transaction: u64,
    label: String,
    role: Role,
}

impl Session {
    async fn connect(url: &str, label: String) -> Result<Session, String> {
        let mut s = Session {
            ws: JsonWs::connect(url, Some("janus-protocol")).await?,
            session: 0,
            handle: 0,
            next_transaction: 1,
            label,
            role: Role::Publisher,
        };
        let created = s
            .request(json!({"janus": "create"}))
            .await
            .map_err(|e| e.1)?;
        s.session = created["data"]["id"]
            .as_u64()
            .ok_or_else(|| format!("create: no session id in {created}"))?;
        // Janus ends sessions that say nothing for 60 s (its default session_timeout).
        s.ws.keep_alive(
            Duration::from_secs(20),
            json!({"janus": "keepalive", "session_id": s.session, "transaction": "keepalive"}),
        );
        let attached = s
            .request(json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}))
            .await
            .map_err(|e| e.1)?;
        s.handle = attached["data"]["id"]
            .as_u64()
            .ok_or_else(|| format!("attach: no handle id in {attached}"))?;
        Ok(s)
    }

    /// `m` with a fresh transaction and this session's and handle's ids.
    fn stamp(&mut self, mut m: Value) -> (String, Value) {
        let transaction = format!("lg{}", self.next_transaction);
        self.next_transaction += 1;
        m["transaction"] = json!(transaction);
        if self.session != 0 {
            m["session_id"] = json!(self.session);
        }
        if self.handle != 0 {
            m["handle_id"] = json!(self.handle);
        }
        (transaction, m)
    }

    /// A Janus API request and its answer: `success`, or the plugin's `event` for asynchronous
    /// plugin requests (after Janus's `ack`). Janus's errors and the plugin's are `Err`.
    async fn request(&mut self, m: Value) -> Result<Value, Refused> {
        let what = match m["body"]["request"].as_str() {
            Some(r) => format!("janus {r}"),
            None => format!("janus {}", m["janus"].as_str().unwrap_or("request")),
        };
        let (transaction, m) = self.stamp(m);
        let v = self
            .ws
            .exchange(&what, &m, |v| {
                v["transaction"] == transaction.as_str() && v["janus"] != "ack"
            })
            .await
            .map_err(|e| (0, e))?;
        if v["janus"] == "error" {
            let e = &v["error"];
            return Err((
                e["code"].as_u64().unwrap_or(0),
                format!("{what}: {} ({})", e["reason"], e["code"]),
            ));
        }
        let data = &v["plugindata"]["data"];
        if let Some(code) = data["error_code"].as_u64() {
            return Err((code, format!("{what}: {} ({code})", data["error"])));
        }
        Ok(v)
    }

    /// A message to the videoroom plugin, with an SDP when given.
    async fn message(&mut self, body: Value, jsep: Option<Value>) -> Result<Value, Refused> {
        let mut m = json!({"janus": "message", "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        self.request(m).await
    }

    /// Our candidate, then the end of candidates.
    async fn trickle(&mut self, candidate: String) -> Result<(), String> {
        for candidate in [
            json!({"candidate": candidate, "sdpMid": "0", "sdpMLineIndex": 0}),
            json!({"completed": true}),
        ] {
            let (_, m) = self.stamp(json!({"janus": "trickle", "candidate": candidate}));
            self.ws.send(&m).await?;
        }
        Ok(())
    }

    /// Join as a subscriber to `feeds`, waiting for their WebRTC to be up; Janus's offer.
    async fn subscribe(&mut self, room: u64, feeds: &[u64]) -> Result<String, String> {
        let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
        let started = Instant::now();
        let attached = loop {
            match self
                .message(
                    json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams}),
                    None,
                )
                .await
            {
                Ok(v) => break v,
                Err((NO_SUCH_FEED, _)) if started.elapsed() < FEEDS_WITHIN => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((_, e)) => return Err(e),
            }
        };
        offered_sdp(&attached).ok_or_else(|| format!("join: no offer in {attached}"))
    }
}

fn offered_sdp(v: &Value) -> Option<String> {
    (v["jsep"]["type"] == "offer")
        .then(|| v["jsep"]["sdp"].as_str().map(str::to_string))
        .flatten()
}

impl Signal for Session {
    fn who(&self) -> String {
        self.label.clone()
    }

    async fn open(&mut self, peer: &mut Peer) -> Result<(), String> {
        match &self.role {
            Role::Publisher => {
                let offer = peer.offer()?;
                let configured = self
                    .message(
                        json!({"request": "configure", "audio": true, "video": true}),
                        Some(json!({"type": "offer", "sdp": offer})),
                    )
                    .await
                    .map_err(|e| e.1)?;
                let answer = configured["jsep"]["sdp"]
                    .as_str()
                    .ok_or_else(|| format!("configure: no answer in {configured}"))?;
                peer.accept_answer(answer.to_string())?;
            }
            Role::Subscriber { room, feeds } => {
                let (room, feeds) = (*room, feeds.clone());
                let offer = self.subscribe(room, &feeds).await?;
                let answer = peer.answer(offer)?;
                self.message(
                    json!({"request": "start"}),
                    Some(json!({"type": "answer", "sdp": answer})),
                )
                .await
                .map_err(|e| e.1)?;
            }
        }
        let candidate = peer.candidate()?.candidate;
        self.trickle(candidate).await
    }

    fn on_message(&mut self, m: Value, peer: &mut Peer) {
        match m["janus"].as_str() {
            Some("event") => {
                if let Some(offer) = offered_sdp(&m) {
                    // Janus renegotiates a subscription: answer, and start again.
                    if let Ok(answer) = peer.answer(offer) {
                        let (_, m) = self.stamp(json!({
                            "janus": "message",
                            "body": {"request": "start"},
                            "jsep": {"type": "answer", "sdp": answer},
                        }));
                        self.ws.queue(m);
                    }
                } else if m["jsep"]["type"] == "answer"
                    && let Some(sdp) = m["jsep"]["sdp"].as_str()
                {
                    let _ = peer.accept_answer(sdp.to_string());
                }
            }
            Some("hangup") => {
                eprintln!("loadgen: janus hung up on {}: {}", self.label, m["reason"]);
            }
            _ => {}
        }
    }

    fn ws(&mut self) -> &mut JsonWs {
        &mut self.ws
    }
}

/// The Janus WebSocket URL for `--url` (`ws://`, or `http://` turned into `ws://`).
fn ws_url(url: &str) -> String {
    url.replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1)
}

/// Room `r`: create a VideoRoom room, join its publishers (paced), then its subscribers.
pub async fn setup_room(
    args: &LoadgenArgs,
    url: &str,
    ctx: &Ctx,
    r: u32,
    stream_index: &mut u32,
) -> Result<Vec<JoinHandle<ClientResult>>, String> {
    let url = ws_url(url);
    let mut control = Session::connect(&url, format!("lg-control-{r}")).await?;
    let room = u64::from(rand::random::<u32>()) + 1;
    control
        .message(
            json!({
                "request": "create", "room": room, "permanent": false, "is_private": true,
                "publishers": args.publishers.max(1),
                // 0: no cap on the publishers' bitrate; no periodic keyframe requests.
                "bitrate": 0, "fir_freq": 0,
                "videocodec": "vp8", "audiocodec": "opus",
            }),
            None,
        )
        .await
        .map_err(|e| e.1)?;
    let mut tasks = Vec::new();
    let mut feeds = Vec::new();
    for i in 0..args.publishers {
        let label = format!("lg-pub-{r}-{i}");
        let mut s = Session::connect(&url, label.clone()).await?;
        let joined = s
            .message(
                json!({"request": "join", "ptype": "publisher", "room": room, "display": label}),
                None,
            )
            .await
            .map_err(|e| e.1)?;
        feeds.push(
            joined["plugindata"]["data"]["id"]
                .as_u64()
                .ok_or_else(|| format!("join: no feed id in {joined}"))?,
        );
        tasks.push(ctx.spawn(s, Some(*stream_index), false));
        *stream_index += 1;
        tokio::time::sleep(ctx.pace).await;
    }
    let mut subscribers = Vec::new();
    if args.shape == Shape::Meeting {
        for (i, own) in feeds.iter().enumerate() {
            let others: Vec<u64> = feeds.iter().filter(|f| *f != own).copied().collect();
            if !others.is_empty() {
                subscribers.push((format!("lg-pub-{r}-{i}-in"), others));
            }
        }
    }
    for i in 0..args.subscribers {
        subscribers.push((format!("lg-sub-{r}-{i}"), feeds.clone()));
    }
    for (label, feeds) in subscribers {
        let mut s = Session::connect(&url, label).await?;
        s.role = Role::Subscriber { room, feeds };
        tasks.push(ctx.spawn(s, None, true));
        tokio::time::sleep(ctx.pace).await;
    }
    Ok(tasks)
}
