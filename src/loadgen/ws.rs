//! The signaling transport every load-generator client shares, whatever the server: a WebSocket
//! that carries JSON messages (Ferry's protocol or Janus's). What is said over it is a
//! [`Signal`](super::peer::Signal).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a request waits for its answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// A WebSocket of JSON messages.
pub struct JsonWs {
    ws: Ws,
    /// Messages that arrived while a request waited for its answer; [`JsonWs::recv`] gives them first.
    queued: VecDeque<Value>,
    /// Messages to send at the next [`JsonWs::flush`].
    outgoing: Vec<Value>,
    /// A message sent at least this often, when the server wants one (Janus's keepalive).
    keepalive: Option<(Duration, Value, Instant)>,
}

impl JsonWs {
    /// Connect, asking for `subprotocol` (`Sec-WebSocket-Protocol`) when given.
    pub async fn connect(url: &str, subprotocol: Option<&str>) -> Result<JsonWs, String> {
        let mut req = url
            .into_client_request()
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        if let Some(p) = subprotocol {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                p.parse().map_err(|e| format!("{p}: {e}"))?,
            );
        }
        // tungstenite zero-fills its read buffer up to this size on every read attempt, and a
        // client's signaling is polled whenever its media socket wakes it: 4 KiB instead of the
        // default 128 KiB (a third of the load generator's CPU at 1 -> 1000 went into that memset).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        Ok(JsonWs {
            ws,
            queued: VecDeque::new(),
            outgoing: Vec::new(),
            keepalive: None,
        })
    }

    /// Close with the WebSocket closing handshake (at most a second).
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    pub async fn send(&mut self, m: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(m.to_string()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Queue `m` for the next [`JsonWs::flush`] (from code that cannot wait).
    pub fn queue(&mut self, m: Value) {
        self.outgoing.push(m);
    }

    /// Send `message` every `every` from now on (at a flush).
    pub fn keep_alive(&mut self, every: Duration, message: Value) {
        self.keepalive = Some((every, message, Instant::now()));
    }

    /// Send the queued messages, and the keepalive when it is due.
    pub async fn flush(&mut self) {
        for m in std::mem::take(&mut self.outgoing) {
            let _ = self.send(&m).await;
        }
        let due = match &mut self.keepalive {
            Some((every, m, last)) if last.elapsed() >= *every => {
                *last = Instant::now();
                Some(m.clone())
            }
            _ => None,
        };
        if let Some(m) = due {
            let _ = self.send(&m).await;
        }
    }

    /// The next message, queued ones first; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Value> {
        if let Some(m) = self.queued.pop_front() {
            return Some(m);
        }
        self.read().await
    }

    async fn read(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => {
                    if let Ok(v) = serde_json::from_str(t.as_str()) {
                        return Some(v);
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Send `m`, then wait for the message `is_answer` recognises, keeping the others for
    /// [`JsonWs::recv`]. `what` names the request in errors.
    pub async fn exchange(
        &mut self,
        what: &str,
        m: &Value,
        is_answer: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        self.send(m).await.map_err(|e| format!("{what}: {e}"))?;
        loop {
            let v = tokio::time::timeout(ANSWER_WITHIN, self.read())
                .await
                .map_err(|_| format!("{what}: no answer within {} s", ANSWER_WITHIN.as_secs()))?
                .ok_or_else(|| format!("{what}: connection closed"))?;
            if is_answer(&v) {
                return Ok(v);
            }
            self.queued.push_back(v);
        }
    }
}
