//! `ferry loadgen --target ferry`: rooms on Ferry through its own signaling (protocol v1 over
//! `/ws`), every member relayed.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::cli::{LoadgenArgs, Shape};
use super::client::{ClientResult, Ctx};
use super::peer::{Peer, Signal};
use super::ws::JsonWs;

/// One client's signaling connection to Ferry.
pub struct Signaling {
    ws: JsonWs,
    next_id: u64,
    pub user_id: String,
    /// The stream index this client publishes, if it does.
    pub(super) publishing: Option<u32>,
    /// The members whose media this client asks for when it opens.
    pub(super) subscribe_to: Vec<String>,
}

impl Signaling {
    pub async fn connect(url: &str) -> Result<Signaling, String> {
        let mut s = Signaling {
            ws: JsonWs::connect(url, None).await?,
            next_id: 1,
            user_id: String::new(),
            publishing: None,
            subscribe_to: Vec::new(),
        };
        let w = s.request("hello", json!({"protocol": 1})).await?;
        s.user_id = w["userId"].as_str().unwrap_or_default().to_string();
        Ok(s)
    }

    /// A clean close (the WebSocket closing handshake: a leave at once).
    pub async fn close(mut self) {
        self.ws.close().await;
    }

    pub async fn request(&mut self, ty: &str, fields: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let v = self
            .ws
            .exchange(ty, &message(ty, id, fields), |v| {
                v["type"] == "response" && v["id"] == json!(id)
            })
            .await?;
        if let Some(e) = v.get("error") {
            return Err(format!("{ty}: {} ({})", e["message"], e["code"]));
        }
        Ok(v["result"].clone())
    }
}

/// A protocol v1 request (its response, when one comes, is read and dropped later).
fn message(ty: &str, id: u64, fields: Value) -> Value {
    let mut m = fields.as_object().cloned().unwrap_or_default();
    m.insert("id".into(), json!(id));
    m.insert("type".into(), json!(ty));
    Value::Object(m)
}

impl Signal for Signaling {
    fn who(&self) -> String {
        self.user_id.clone()
    }

    async fn open(&mut self, peer: &mut Peer) -> Result<(), String> {
        for id in self.subscribe_to.clone() {
            self.request("subscribe", json!({"userId": id})).await?;
        }
        if self.publishing.is_none() {
            peer.add_data_channel()?;
        }
        let sdp = peer.offer()?;
        let streams = self
            .publishing
            .map_or(json!({}), |s| json!({ format!("lg-{s}"): "cam" }));
        self.request(
            "offer",
            json!({"to": "server", "sdp": sdp, "meta": {"streams": streams}}),
        )
        .await?;
        Ok(())
    }

    fn on_message(&mut self, m: Value, peer: &mut Peer) {
        // Dynacast: the layers nobody receives are not sent (as the SDK pauses their encodings).
        if m["type"] == "layers" {
            let paused: Vec<&str> = m["paused"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            peer.pause_layers(&paused);
            return;
        }
        if m["from"] != "server" {
            return;
        }
        let sdp = m["sdp"].as_str().unwrap_or_default().to_string();
        match m["type"].as_str() {
            Some("answer") => {
                let _ = peer.accept_answer(sdp);
            }
            Some("offer") => {
                if let Ok(answer) = peer.answer(sdp) {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.ws.queue(message(
                        "answer",
                        id,
                        json!({"to": "server", "sdp": answer}),
                    ));
                }
            }
            _ => {}
        }
    }

    fn ws(&mut self) -> &mut JsonWs {
        &mut self.ws
    }
}

pub(super) fn ws_url(args: &LoadgenArgs, url: &str, identity: &str) -> String {
    let base = url
        .trim_end_matches('/')
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let mut url = format!("{base}/ws");
    if let (Some(k), Some(s)) = (&args.api_key, &args.api_secret)
        && let Ok(t) = crate::auth::mint(
            k,
            s,
            identity,
            Duration::from_secs(3600),
            crate::auth::Grants::default(),
        )
    {
        url.push_str("?token=");
        url.push_str(&t);
    }
    url
}

/// Room `r`: create it, let its members join (publishers first, paced), start their clients.
pub async fn setup_room(
    args: &LoadgenArgs,
    url: &str,
    ctx: &Ctx,
    r: u32,
    stream_index: &mut u32,
) -> Result<Vec<JoinHandle<ClientResult>>, String> {
    let mut control = Signaling::connect(&ws_url(args, url, &format!("lg-control-{r}"))).await?;
    let want = args.publishers + args.subscribers;
    let room = control
        .request("createRoom", json!({"mode": "relay", "maxPeers": want.max(2)}))
        .await
        .map_err(|e| {
            format!("{e}: rooms of {want} need the server's max_room_peers (--max-room-peers) at least that high")
        })?["roomId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Publishers first, so that everyone knows whom to subscribe to.
    let mut publisher_ids = Vec::new();
    let mut members = Vec::new();
    for i in 0..args.publishers + args.subscribers {
        let identity = if i < args.publishers {
            format!("lg-pub-{r}-{i}")
        } else {
            format!("lg-sub-{r}-{}", i - args.publishers)
        };
        let mut sig = Signaling::connect(&ws_url(args, url, &identity)).await?;
        sig.request("joinRoom", json!({"roomId": room})).await?;
        if i < args.publishers {
            publisher_ids.push(sig.user_id.clone());
            sig.publishing = Some(*stream_index);
            *stream_index += 1;
        }
        members.push(sig);
        tokio::time::sleep(ctx.pace).await;
    }
    let mut tasks = Vec::new();
    for mut sig in members {
        if sig.publishing.is_none() || args.shape == Shape::Meeting {
            sig.subscribe_to = publisher_ids
                .iter()
                .filter(|id| **id != sig.user_id)
                .cloned()
                .collect();
        }
        let receives = sig.publishing.is_none() || !sig.subscribe_to.is_empty();
        let publishing = sig.publishing;
        tasks.push(ctx.spawn(sig, publishing, receives));
    }
    Ok(tasks)
}
