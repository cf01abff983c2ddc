//! Member links: how a member whose WebSocket reached one node is a member of a room on another.
//!
//! The node the member reached (its *entry* node) keeps the session: `hello`, the access token,
//! the user id, keepalive, rate limits, resume. When the member joins (or creates) a room that
//! another node owns, the entry node opens a WebSocket to the owner's `/cluster/attach`
//! (authenticated by `cluster_secret`) and sends one `attach` message with the session's user
//! id, identity and grants. The owner runs the member's session there as a local one, from
//! that point on: every request the client sends goes over the link as it is, and every frame
//! the owner sends back goes to the client as it is. Same protocol, same errors, same order
//! (one link per member: one TCP stream, in order both ways).
//!
//! When the link ends with the member in a room (the owner drains, dies or lost the room), the
//! entry node closes the client's connection with the owner's close code (1012 when it died):
//! the SDK reconnects and joins again as the same member (`hello` with `rejoin`), and the room is
//! found on its new owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::NodeInfo;
use super::redis_dir::ClusterMetrics;
use crate::auth::Grants;
use crate::signal::protocol::close;

/// The header that carries `cluster_secret` on `/cluster/attach`.
pub const SECRET_HEADER: &str = "x-ferry-cluster-secret";
/// How an entry node's notice about its client's connection starts (`{"type":"~connection",
/// "event":"reconnecting"|"reconnected"}`): the room's node tells the room, as for a local member.
pub const CONNECTION_NOTICE: &str = r#"{"type":"~connection"#;

/// A link's connect and `attach` must complete within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The entry node pings the owner this often; a link silent for three times as long is dead.
const LINK_PING: Duration = Duration::from_secs(2);
/// Frames waiting to go to the owner, per member.
const LINK_QUEUE: usize = 256;

/// The first message on a link: whose session this is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attach {
    #[serde(rename = "type")]
    pub ty: String,
    pub user_id: String,
    pub identity: String,
    pub grants: Grants,
}

/// A request forwarded to the owner whose answer the entry node watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// A `joinRoom`: the member is in a room on the owner once it succeeds.
    Join,
    /// A `leaveRoom`: it is in no room once it succeeds.
    Leave,
}

struct Outgoing {
    text: String,
    watch: Option<(String, Watch)>,
    /// A request of the entry node's own: its answer comes here, not to the client.
    call: Option<(String, tokio::sync::oneshot::Sender<Value>)>,
}

/// The id of the entry node's own requests on a link (clients' ids are numbers or strings of
/// their choice; this one is answered on the link and not passed on).
const OWN_ID: &str = "~ferry-entry-node";

/// The entry node's end of a member link.
pub struct Upstream {
    /// The owner's node id.
    pub node: String,
    to_owner: mpsc::Sender<Outgoing>,
    in_room: Arc<AtomicBool>,
    /// A join sent and not yet answered.
    joining: Arc<AtomicBool>,
    ended: CancellationToken,
    end: Arc<std::sync::Mutex<(u16, String)>>,
}

impl Upstream {
    /// The member is in a room on the owner (or its join there is under way).
    pub fn in_room(&self) -> bool {
        self.in_room.load(Ordering::Acquire) || self.joining.load(Ordering::Acquire)
    }

    pub fn is_alive(&self) -> bool {
        !self.ended.is_cancelled()
    }

    /// Send a client's frame to the owner as it is.
    pub async fn forward(&self, text: &str, watch: Option<(&Value, Watch)>) {
        if watch.is_some_and(|(_, w)| w == Watch::Join) {
            self.joining.store(true, Ordering::Release);
        }
        let watch = watch.map(|(id, w)| (id.to_string(), w));
        let _ = self
            .to_owner
            .send(Outgoing {
                text: text.to_string(),
                watch,
                call: None,
            })
            .await;
    }

    /// Ask the owner for the member's room as it is now (`getRoom`), for a `resume` answer.
    pub async fn room_info(&self) -> Option<Value> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let text = serde_json::json!({"id": OWN_ID, "type": "getRoom"}).to_string();
        self.to_owner
            .send(Outgoing {
                text,
                watch: None,
                call: Some((OWN_ID.to_string(), tx)),
            })
            .await
            .ok()?;
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, rx).await.ok()?.ok()?;
        answer.get("result").cloned()
    }

    /// Resolves when the link ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await
    }

    /// How it ended: the owner's close code and reason (1012 when the owner went away).
    pub fn end(&self) -> (u16, String) {
        self.end.lock().unwrap().clone()
    }
}

/// `http://host:port` -> `ws://host:port/cluster/attach`.
fn attach_url(http: &str) -> String {
    format!("{}/cluster/attach", ws_base(http))
}

fn ws_base(http: &str) -> String {
    http.strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| http.strip_prefix("https://").map(|r| format!("wss://{r}")))
        .unwrap_or_else(|| http.to_string())
}

/// The header with which a node carrying a client's connection to another (`/cluster/ws`)
/// says the client's address (trusted with the cluster's secret).
pub const CLIENT_IP_HEADER: &str = "x-ferry-client-ip";

/// A client's connection to another node on its way (see [`pipe`]).
pub type Carried =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open the way to `node` for a client's connection (`/cluster/ws`, with the client's address);
/// `None` when the node cannot be reached.
pub async fn carry_to(
    node: &NodeInfo,
    secret: &str,
    remote: std::net::SocketAddr,
) -> Option<Carried> {
    let url = format!("{}/cluster/ws", ws_base(&node.http));
    let connect = async {
        let mut req = url.as_str().into_client_request().ok()?;
        req.headers_mut()
            .insert(SECRET_HEADER, secret.parse().ok()?);
        req.headers_mut()
            .insert(CLIENT_IP_HEADER, remote.ip().to_string().parse().ok()?);
        let (ws, _) = tokio_tungstenite::connect_async(req).await.ok()?;
        Some(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .ok()
        .flatten()
}

/// Carry a client's connection to the node that holds the session its `resume` (`first`)
/// names: frames pass both ways as they are until either side closes. A client connection that
/// dies (no Close frame, or silent past `ping_timeout`) is given up with 4000 on the other
/// side, so that the session is held for its next resume, as if the client had reached that
/// node itself.
pub async fn pipe(
    mut client: axum::extract::ws::WebSocket,
    mut up: Carried,
    first: String,
    cfg: &crate::config::Config,
) {
    use axum::extract::ws::{CloseFrame as AxClose, Message as Ax};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    if up.send(Message::text(first)).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.reset();
    let mut last_heard = Instant::now();
    let lost = || {
        Message::Close(Some(CloseFrame {
            code: close::CLIENT_RECONNECTING.into(),
            reason: "the client's connection to another node was lost".into(),
        }))
    };
    loop {
        tokio::select! {
            m = client.recv() => {
                last_heard = Instant::now();
                match m {
                    Some(Ok(Ax::Text(t))) => {
                        if up.send(Message::text(t.as_str())).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Ax::Binary(b))) => {
                        if up.send(Message::binary(b)).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Ax::Close(f))) => {
                        let f = f.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                        let _ = up.send(Message::Close(f)).await;
                        break;
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => {
                        let _ = up.send(lost()).await;
                        break;
                    }
                }
            }
            m = up.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if client.send(Ax::Text(t.as_str().into())).await.is_err() {
                        let _ = up.send(lost()).await;
                        break;
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    let f = f.map(|f| AxClose { code: f.code.into(), reason: f.reason.as_str().into() });
                    let _ = client.send(Ax::Close(f)).await;
                    break;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    let _ = client
                        .send(Ax::Close(Some(AxClose {
                            code: close::ROOM_MOVED,
                            reason: "the node that holds this session went away".into(),
                        })))
                        .await;
                    break;
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() >= cfg.ping_timeout {
                    let _ = up.send(lost()).await;
                    break;
                }
                if client.send(Ax::Ping(Default::default())).await.is_err() {
                    let _ = up.send(lost()).await;
                    break;
                }
            }
        }
    }
}

/// Open a link to `owner` for the session `attach` describes. Frames from the owner go into
/// `events` (the session's outbound queue: they wait there while the client is away); a full
/// queue cancels `kick`, as for a local member.
pub async fn open(
    owner: &NodeInfo,
    secret: &str,
    attach: &Attach,
    events: mpsc::Sender<Utf8Bytes>,
    kick: CancellationToken,
    metrics: Arc<ClusterMetrics>,
) -> Result<Upstream, String> {
    let url = attach_url(&owner.http);
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("node {} address {url}: {e}", owner.id))?;
    req.headers_mut().insert(
        SECRET_HEADER,
        secret
            .parse()
            .map_err(|_| "cluster_secret is not a valid header value".to_string())?,
    );
    let connect = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| format!("cannot reach node {} at {url}: {e}", owner.id))?;
        let hello = serde_json::to_string(attach).expect("attach serializes");
        ws.send(Message::text(hello))
            .await
            .map_err(|e| format!("node {}: {e}", owner.id))?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == r#"{"type":"attached"}"# => Ok(ws),
            Some(Ok(Message::Close(Some(f)))) => Err(format!(
                "node {} refused the member ({}: {})",
                owner.id, f.code, f.reason
            )),
            other => Err(format!("node {} did not attach: {other:?}", owner.id)),
        }
    };
    let ws = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| format!("node {} did not answer within 2 s", owner.id))??;
    let (to_owner, rx) = mpsc::channel(LINK_QUEUE);
    let up = Upstream {
        node: owner.id.clone(),
        to_owner,
        in_room: Arc::new(AtomicBool::new(false)),
        joining: Arc::new(AtomicBool::new(false)),
        ended: CancellationToken::new(),
        end: Arc::new(std::sync::Mutex::new((
            close::ROOM_MOVED,
            "the room's node went away: join again".to_string(),
        ))),
    };
    let task = LinkTask {
        in_room: up.in_room.clone(),
        joining: up.joining.clone(),
        end: up.end.clone(),
        events,
        kick,
        metrics,
    };
    let ended = up.ended.clone();
    tokio::spawn(async move {
        task.run(ws, rx).await;
        ended.cancel();
    });
    Ok(up)
}

struct LinkTask {
    in_room: Arc<AtomicBool>,
    joining: Arc<AtomicBool>,
    end: Arc<std::sync::Mutex<(u16, String)>>,
    events: mpsc::Sender<Utf8Bytes>,
    kick: CancellationToken,
    metrics: Arc<ClusterMetrics>,
}

impl LinkTask {
    async fn run(
        &self,
        ws: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        mut rx: mpsc::Receiver<Outgoing>,
    ) {
        let (mut sink, mut stream) = ws.split();
        let mut watched: Vec<(String, Watch)> = Vec::new();
        let mut calls: Vec<(String, tokio::sync::oneshot::Sender<Value>)> = Vec::new();
        let mut ping = tokio::time::interval(LINK_PING);
        let mut last_heard = Instant::now();
        let to_owner = self.metrics.forwarded.with_label_values(&["to_owner"]);
        let from_owner = self.metrics.forwarded.with_label_values(&["from_owner"]);
        self.metrics.links.with_label_values(&["out"]).inc();
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(out) = out else {
                        // The session ended: the owner's session ends with the link.
                        let _ = sink.send(Message::Close(None)).await;
                        break;
                    };
                    if let Some(w) = out.watch {
                        watched.push(w);
                    }
                    if let Some(c) = out.call {
                        calls.push(c);
                    }
                    to_owner.inc();
                    if sink.send(Message::text(out.text)).await.is_err() {
                        break;
                    }
                }
                msg = stream.next() => {
                    last_heard = Instant::now();
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            from_owner.inc();
                            if !calls.is_empty() && t.as_str().contains(OWN_ID)
                                && let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                                && let Some(i) = calls.iter().position(|(id, _)| v["id"].as_str() == Some(id.as_str()))
                            {
                                let (_, tx) = calls.swap_remove(i);
                                let _ = tx.send(v);
                                continue;
                            }
                            if !watched.is_empty() {
                                self.note_answer(t.as_str(), &mut watched);
                            }
                            let text = Utf8Bytes::from(t.as_str());
                            if self.events.try_send(text).is_err() {
                                self.kick.cancel();
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            if let Some(f) = frame {
                                *self.end.lock().unwrap() = (f.code.into(), f.reason.to_string());
                            }
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            debug!(error = %e, "member link read error");
                            break;
                        }
                        None => break,
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > 3 * LINK_PING {
                        break;
                    }
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                }
            }
        }
        self.metrics.links.with_label_values(&["out"]).dec();
    }

    /// An answer to a watched `joinRoom`/`leaveRoom` says whether the member is in a room there.
    fn note_answer(&self, text: &str, watched: &mut Vec<(String, Watch)>) {
        if !text.starts_with(r#"{"type":"response""#) {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let id = v["id"].to_string();
        let Some(i) = watched.iter().position(|(w, _)| *w == id) else {
            return;
        };
        let (_, kind) = watched.swap_remove(i);
        let ok = v.get("result").is_some();
        match kind {
            Watch::Join => {
                self.joining.store(false, Ordering::Release);
                if ok {
                    self.in_room.store(true, Ordering::Release);
                }
            }
            Watch::Leave if ok => self.in_room.store(false, Ordering::Release),
            Watch::Leave => {}
        }
    }
}

/// Read an `attach` message (the owner's side).
pub fn read_attach(text: &str) -> Result<Attach, String> {
    let a: Attach = serde_json::from_str(text).map_err(|e| format!("bad attach: {e}"))?;
    if a.ty != "attach" || a.user_id.is_empty() || a.user_id.len() > 64 {
        return Err("bad attach".into());
    }
    Ok(a)
}

/// Compare the presented secret in constant time.
pub fn secret_matches(presented: &[u8], secret: &str) -> bool {
    let secret = secret.as_bytes();
    presented.len() == secret.len()
        && presented
            .iter()
            .zip(secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_urls_follow_the_node_address() {
        assert_eq!(
            attach_url("http://10.0.0.5:8080"),
            "ws://10.0.0.5:8080/cluster/attach"
        );
        assert_eq!(
            attach_url("https://n1.example.org"),
            "wss://n1.example.org/cluster/attach"
        );
    }

    #[test]
    fn attach_messages_are_checked() {
        let ok = r#"{"type":"attach","userId":"u-1","identity":"alice","grants":{}}"#;
        assert_eq!(read_attach(ok).unwrap().user_id, "u-1");
        assert!(
            read_attach(r#"{"type":"hello","userId":"u-1","identity":"a","grants":{}}"#).is_err()
        );
        assert!(
            read_attach(r#"{"type":"attach","userId":"","identity":"a","grants":{}}"#).is_err()
        );
        assert!(read_attach("{").is_err());
        assert!(secret_matches(b"0123456789abcdef", "0123456789abcdef"));
        assert!(!secret_matches(b"0123456789abcdeX", "0123456789abcdef"));
    }
}
