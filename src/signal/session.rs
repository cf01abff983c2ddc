//! One signaling session: the task that owns a client's WebSocket.
//!
//! The loop, in priority order: close when kicked or when the server's drain timeout passed;
//! forward queued events to the client; handle the client's frames; send pings and close a
//! connection that stayed silent past `ping_timeout`; close one that never said `hello`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::auth::{Grants, TokenError};
use crate::media::{Command, SERVER_ID};
use crate::signal::hub::{ConnectionSlot, Handover, Hub, OUTBOUND_QUEUE, SessionHandle};
use crate::signal::protocol::{
    self, Bye, Candidate, CreateRoom, Empty, ErrorCode, Hello, JoinRoom, MODE_REASONS, MediaMode,
    PROTOCOL_VERSION, ReportMode, RequestType, Resume, Sdp, SetVideoQuality, SignalError,
    Subscription, close, fields,
};

/// A send that does not complete within this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Invalid messages (malformed, unknown type, binary, oversized) a session may send in all; the
/// next closes it with 1008.
pub const MAX_INVALID_MESSAGES: u32 = 32;

/// Refuse a connection right after the upgrade, with a close code and reason.
pub async fn refuse(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

struct Auth {
    user_id: String,
    identity: String,
    grants: Grants,
}

/// Token bucket: `rate` per second, up to `burst`.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl RateLimit {
    /// `rate` a second, up to `burst` at once.
    fn new(rate: f64, burst: f64) -> Self {
        RateLimit {
            tokens: burst,
            rate,
            burst,
            last: Instant::now(),
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

enum Flow {
    Continue,
    Close(u16, String),
    /// This connection resumes another session (the `resume` request's id): it is handed over.
    Handover(mpsc::Sender<Handover>, Value),
    /// This connection resumes a session another node of the cluster holds: it is carried
    /// there, starting with this `resume` message.
    Proxy(Box<crate::cluster::link::Carried>, String),
}

impl Flow {
    /// Where the loop stops: everything but `Continue`.
    fn end(self) -> Option<End> {
        match self {
            Flow::Continue => None,
            Flow::Close(c, r) => Some(End::Close(c, r)),
            Flow::Handover(tx, id) => Some(End::Handover(tx, id)),
            Flow::Proxy(node, text) => Some(End::Proxy(node, text)),
        }
    }
}

/// How a connection's loop ended.
enum End {
    /// Closed with this code and reason.
    Close(u16, String),
    /// The connection resumes another session: it goes to that session's task.
    Handover(mpsc::Sender<Handover>, Value),
    /// The connection resumes a session on another node: it is carried there.
    Proxy(Box<crate::cluster::link::Carried>, String),
}

/// Whether a frame may be handled (see [`Session::admit`]).
enum Admit {
    Yes,
    No(Flow),
}

struct Session {
    hub: Arc<Hub>,
    socket: WebSocket,
    /// A token given as the `token` query parameter, already verified.
    query_claims: Option<crate::auth::Claims>,
    auth: Option<Auth>,
    room: Option<String>,
    /// The media shard of `room` (read when joining: the room keeps it while it exists).
    shard: usize,
    rx: mpsc::Receiver<Utf8Bytes>,
    /// Held until `hello` registers the session.
    pending: Option<(mpsc::Sender<Utf8Bytes>, CancellationToken)>,
    kick: CancellationToken,
    limiter: RateLimit,
    /// How many rooms this session joined: the media shard tells a join's commands from the
    /// next one's by it.
    joins: u64,
    /// Messages refused by the rate limiter since the last one it let through (only the first
    /// is answered; more than twice `rate_burst` of them close the connection).
    refused_in_a_row: u32,
    /// Invalid messages so far (see [`MAX_INVALID_MESSAGES`]).
    invalid: u32,
    /// The client sent a Close frame.
    client_closed: bool,
    /// Its place among the connections (pending until `hello`).
    slot: ConnectionSlot,
    /// The room it was last in (for the log line of its end; a session's span does not carry
    /// the room: a field recorded again is appended to every later line of the text format).
    last_room: Option<String>,
    /// Its resume token now, and where connections that resume it arrive (from `hello` on,
    /// when `resume_timeout` is set).
    resume_token: Option<String>,
    handovers: Option<(mpsc::Sender<Handover>, mpsc::Receiver<Handover>)>,
    /// It has a relay connection open (an offer to the server since its last `bye` to it, in
    /// this room), and how many more it may open (`max_relay_connections_per_minute`).
    relay_open: bool,
    relay_limiter: RateLimit,
    /// Cancelled when its room moved to another node of the cluster.
    moved: CancellationToken,
    /// Its link to the node that owns its room, when that is another node (see cluster::link).
    upstream: Option<crate::cluster::link::Upstream>,
    /// Its own outbound queue (for a member link to feed).
    events_tx: Option<mpsc::Sender<Utf8Bytes>>,
    /// The session of a member whose WebSocket is on another node (a member link).
    linked: bool,
    /// The client's address.
    remote: std::net::SocketAddr,
}

/// Run a session to its end. `query_token` is the `token` query parameter, if any.
pub async fn run(
    hub: Arc<Hub>,
    socket: WebSocket,
    slot: ConnectionSlot,
    query_token: Option<String>,
    remote: std::net::SocketAddr,
) {
    let span = info_span!("session", %remote, user = tracing::field::Empty);
    async move {
        let query_claims = match (&hub.verifier, query_token) {
            (Some(v), Some(t)) => match v.verify(&t) {
                Ok(c) => Some(c),
                Err(e) => {
                    hub.metrics
                        .signal_errors
                        .with_label_values(&[ErrorCode::Unauthorized.as_str()])
                        .inc();
                    if let Some(n) = hub.log_refusal() {
                        info!(reason = %e, refused = n, "refused token (counts refusals since the last line)");
                    }
                    refuse(socket, close::UNAUTHORIZED, &e.to_string()).await;
                    return;
                }
            },
            _ => None,
        };
        let mut s = Session::new(hub, socket, slot, query_claims, remote);
        match s.run_loop().await {
            End::Close(code, reason) => s.finish(code, &reason).await,
            End::Handover(tx, id) => {
                let Session { socket, hub, .. } = s;
                if let Err(mpsc::error::SendError(h)) =
                    tx.send(Handover { socket, id, remote }).await
                {
                    // The session ended between the claim and the handover.
                    resume_failed(&hub, h.socket, &h.id).await;
                }
            }
            End::Proxy(up, text) => {
                let Session { socket, hub, .. } = s;
                crate::cluster::link::pipe(socket, *up, text, &hub.config).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Run the session of a member whose WebSocket is on another node of the cluster: the first
/// message is that node's `attach` (who the member is); from then on the socket is the member's
/// (see cluster::link). It has no resume token (its entry node gives those); when its link drops
/// without a close (its entry node died), it is held for `resume_timeout` for the member to come
/// back through another node.
pub async fn run_attached(
    hub: Arc<Hub>,
    mut socket: WebSocket,
    slot: ConnectionSlot,
    remote: std::net::SocketAddr,
) {
    let first = tokio::time::timeout(Duration::from_secs(5), socket.recv()).await;
    let attach = match first {
        Ok(Some(Ok(Message::Text(t)))) => crate::cluster::link::read_attach(t.as_str()),
        _ => Err("no attach message".to_string()),
    };
    let attach = match attach {
        Ok(a) => a,
        Err(e) => {
            refuse(socket, close::POLICY_VIOLATION, &e).await;
            return;
        }
    };
    let span = info_span!("session", %remote, user = %attach.user_id, linked = true);
    async move {
        let mut s = Session::new(hub, socket, slot, None, remote);
        if !s.slot.promote() {
            refuse(
                s.socket,
                close::TRY_AGAIN_LATER,
                "too many sessions (max_connections)",
            )
            .await;
            return;
        }
        let (tx, kick) = s.pending.take().expect("not registered yet");
        let handle = SessionHandle {
            tx: tx.clone(),
            kick,
            moved: s.moved.clone(),
        };
        // The member's previous session here (its entry node died, and it came back through
        // another) gives way.
        let mut handle = Some(handle);
        for _ in 0..100 {
            match s
                .hub
                .register_as(&attach.user_id, handle.take().expect("a handle"))
            {
                Ok(()) => break,
                Err(h) => {
                    handle = Some(h);
                    s.hub.displace(&attach.user_id);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if handle.is_some() {
            refuse(
                s.socket,
                close::POLICY_VIOLATION,
                "this user id has a session here",
            )
            .await;
            return;
        }
        s.events_tx = Some(tx);
        s.linked = true;
        s.auth = Some(Auth {
            user_id: attach.user_id,
            identity: attach.identity,
            grants: attach.grants,
        });
        let links = s
            .hub
            .directory()
            .cluster()
            .map(|c| c.metrics.links.with_label_values(&["in"]));
        if let Some(l) = &links {
            l.inc();
        }
        info!("member linked from another node");
        let end = match s.send_text(r#"{"type":"attached"}"#.into()).await.end() {
            Some(end) => end,
            None => s.run_loop().await,
        };
        let (mut code, reason) = match end {
            End::Close(code, reason) => (code, reason),
            End::Handover(..) | End::Proxy(..) => (1000, String::new()),
        };
        // The link dropped without a Close: the member's entry node died (or the network between
        // the nodes). Held like a dropped connection, for the member to come back through
        // another node (which displaces this session: no leave, no second join for the others).
        let timeout = s.hub.config.resume_timeout;
        if code == 1000
            && !s.client_closed
            && !timeout.is_zero()
            && let (Some(room), Some(auth)) = (&s.room, &s.auth)
        {
            s.hub
                .announce_connection(room, &auth.user_id, "reconnecting");
            info!("member link lost: the member's session is held for its return");
            let (moved, shutdown) = (s.moved.clone(), s.hub.shutdown.clone());
            tokio::select! {
                _ = moved.cancelled() => code = close::ROOM_MOVED,
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(timeout) => {}
            }
        }
        s.finish(code, &reason).await;
        if let Some(l) = &links {
            l.dec();
        }
    }
    .instrument(span)
    .await
}

/// A `resume` whose session is gone: the error, then the connection closes (the client says
/// hello on a new one).
async fn resume_failed(hub: &Hub, mut socket: WebSocket, id: &Value) {
    hub.metrics
        .session_resumes
        .with_label_values(&["unknown"])
        .inc();
    let err = SignalError::new(ErrorCode::ResumeFailed, NO_SESSION_TO_RESUME);
    let _ = socket
        .send(Message::Text(protocol::response_err(id, &err).into()))
        .await;
    let _ = socket.send(Message::Close(None)).await;
}

const NO_SESSION_TO_RESUME: &str = "no session to resume with this token: it ended (its \
    resume_timeout passed, or it left), or the server restarted; say hello and join again";

impl Session {
    fn new(
        hub: Arc<Hub>,
        socket: WebSocket,
        slot: ConnectionSlot,
        query_claims: Option<crate::auth::Claims>,
        remote: std::net::SocketAddr,
    ) -> Session {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let kick = CancellationToken::new();
        let limiter = RateLimit::new(
            f64::from(hub.config.rate_limit),
            f64::from(hub.config.rate_burst),
        );
        // So many relay connections a minute, all of them at once at most.
        let per_minute = f64::from(hub.config.max_relay_connections_per_minute);
        let relay_limiter = RateLimit::new(per_minute / 60.0, per_minute);
        Session {
            hub,
            socket,
            query_claims,
            auth: None,
            room: None,
            shard: 0,
            rx,
            pending: Some((tx, kick.clone())),
            kick,
            limiter,
            joins: 0,
            refused_in_a_row: 0,
            invalid: 0,
            client_closed: false,
            slot,
            last_room: None,
            resume_token: None,
            handovers: None,
            relay_open: false,
            relay_limiter,
            moved: CancellationToken::new(),
            upstream: None,
            events_tx: None,
            linked: false,
            remote,
        }
    }

    /// The session's loop: its connection's, then, when the connection drops without a close,
    /// held for `resume_timeout` until a `resume` on another connection takes it over.
    async fn run_loop(&mut self) -> End {
        loop {
            let (code, reason) = match self.connected_loop().await {
                End::Close(code, reason) => (code, reason),
                handover => return handover,
            };
            // Dropped, not closed: the client's network went away (no Close frame, a reset, or
            // silence past ping_timeout). A session is held for a resume.
            let lost = (code == 1000 && !self.client_closed) || code == close::PING_TIMEOUT;
            if !lost || self.handovers.is_none() {
                return End::Close(code, reason);
            }
            if let Some(end) = self.held(code, reason).await {
                return end;
            }
        }
    }

    /// Held after its connection dropped: queued messages wait (bounded: a full queue ends the
    /// session), the room is told `reconnecting`. `None`: resumed on a new connection.
    async fn held(&mut self, code: u16, reason: String) -> Option<End> {
        let user_id = self
            .auth
            .as_ref()
            .map(|a| a.user_id.clone())
            .unwrap_or_default();
        if let Some(room) = &self.room {
            self.hub.announce_connection(room, &user_id, "reconnecting");
        }
        self.notice_to_owner("reconnecting").await;
        info!(code, "connection lost: session held for a resume");
        self.hub.metrics.sessions_reconnecting.inc();
        let (kick, shutdown) = (self.kick.clone(), self.hub.shutdown.clone());
        let moved = self.moved.clone();
        let deadline = Instant::now() + self.hub.config.resume_timeout;
        let rx = &mut self.handovers.as_mut().expect("resumable").1;
        let taken = tokio::select! {
            _ = kick.cancelled() => Err(End::Close(
                close::SLOW_CONSUMER,
                "outbound queue full while the connection was down".into(),
            )),
            _ = shutdown.cancelled() => Err(End::Close(close::GOING_AWAY, "server shutting down".into())),
            _ = moved.cancelled() => Err(End::Close(close::ROOM_MOVED, "the member came back through another node".into())),
            Some(h) = rx.recv() => Ok(h),
            _ = sleep_until(deadline) => {
                self.hub.metrics.session_resumes.with_label_values(&["expired"]).inc();
                info!("no resume within resume_timeout: the member leaves");
                Err(End::Close(code, reason))
            }
        };
        self.hub.metrics.sessions_reconnecting.dec();
        let h = match taken {
            Ok(h) => h,
            Err(end) => return Some(end),
        };
        let flow = self.take_over(h).await;
        if let Some(room) = &self.room {
            self.hub.announce_connection(room, &user_id, "reconnected");
        }
        self.notice_to_owner("reconnected").await;
        flow.end()
    }

    /// A `resume` on another connection takes this session over: that connection is its own
    /// from now on (the old one, if it still works, is closed with 4005). What was queued goes
    /// out first, then the answer to `resume` with a fresh token and the room as it is now.
    async fn take_over(&mut self, h: Handover) -> Flow {
        let mut old = std::mem::replace(&mut self.socket, h.socket);
        tokio::spawn(async move {
            let frame = Message::Close(Some(CloseFrame {
                code: close::RESUMED_ELSEWHERE,
                reason: "session resumed on another connection".into(),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(1), old.send(frame)).await;
        });
        self.client_closed = false;
        self.hub
            .metrics
            .session_resumes
            .with_label_values(&["resumed"])
            .inc();
        info!(remote = %h.remote, "session resumed");
        let tx = self.handovers.as_ref().expect("resumable").0.clone();
        let user_id = self
            .auth
            .as_ref()
            .map(|a| a.user_id.clone())
            .unwrap_or_default();
        let token = self
            .hub
            .resume_token(self.resume_token.as_deref(), &user_id, tx);
        self.resume_token = Some(token);
        while let Ok(text) = self.rx.try_recv() {
            if let flow @ (Flow::Close(..) | Flow::Handover(..) | Flow::Proxy(..)) =
                self.send_text(text).await
            {
                return flow;
            }
        }
        let mut result = self.welcome();
        result["resumed"] = json!(true);
        result["room"] = self
            .room
            .as_deref()
            .zip(self.auth.as_ref())
            .and_then(|(r, a)| self.hub.room_info(r, &a.user_id))
            .unwrap_or(Value::Null);
        // A member of a room on another node: that node says how its room is now.
        if let Some(up) = &self.upstream
            && up.is_alive()
            && up.in_room()
            && let Some(room) = up.room_info().await
        {
            result["room"] = room;
        }
        self.reply(&h.id, Ok(result)).await
    }

    async fn connected_loop(&mut self) -> End {
        let cfg = self.hub.config.clone();
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let hello_deadline = Instant::now() + cfg.hello_timeout;
        let mut last_heard = Instant::now();
        let mut drain = self.hub.drain_watch();
        let mut drain_announced = false;
        let shutdown = self.hub.shutdown.clone();
        let kick = self.kick.clone();
        let moved = self.moved.clone();
        loop {
            if !drain_announced && *drain.borrow_and_update() {
                drain_announced = true;
                let ms = cfg.drain_timeout.as_millis() as u64;
                let ev = json!({"type": "draining", "deadlineMs": ms}).to_string();
                if let Some(end) = self.send_text(ev.into()).await.end() {
                    return end;
                }
            }
            tokio::select! {
                biased;
                _ = kick.cancelled() => {
                    return End::Close(close::SLOW_CONSUMER, "outbound queue full: client is not reading".into());
                }
                _ = shutdown.cancelled() => {
                    return End::Close(close::GOING_AWAY, "server shutting down".into());
                }
                _ = moved.cancelled() => {
                    return End::Close(close::ROOM_MOVED, "the room moved to another node: join it again".into());
                }
                _ = async {
                    match &self.upstream {
                        Some(up) => up.ended().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let up = self.upstream.take().expect("a link");
                    if up.in_room() {
                        // The owner let the member go (drain, its death, a lost room, or its
                        // own close): the client is told as the owner told it.
                        let (code, reason) = up.end();
                        info!(node = %up.node, code, "member link to the room's node ended");
                        return End::Close(code, reason);
                    }
                }
                _ = drain.changed(), if !drain_announced => {}
                Some(text) = self.rx.recv() => {
                    if let Some(end) = self.send_text(text).await.end() {
                        return end;
                    }
                }
                msg = self.socket.recv() => {
                    last_heard = Instant::now();
                    let flow = match msg {
                        None => return End::Close(1000, String::new()),
                        Some(Err(e)) => {
                            let text = e.to_string();
                            debug!(error = %text, "websocket read error");
                            if text.contains("too long") || text.contains("Space limit") {
                                self.count_error(ErrorCode::MessageTooLarge);
                                return End::Close(close::MESSAGE_TOO_BIG, "message too large".into());
                            }
                            if text.to_ascii_lowercase().contains("utf-8") {
                                self.count_error(ErrorCode::BadRequest);
                                return End::Close(close::INVALID_PAYLOAD, "text frame is not valid UTF-8".into());
                            }
                            // The client's side went away without a closing handshake (reset,
                            // broken pipe): a disconnect like a clean close.
                            if ["reset", "without closing handshake", "broken pipe", "connection"]
                                .iter()
                                .any(|w| text.to_ascii_lowercase().contains(w))
                            {
                                return End::Close(1000, String::new());
                            }
                            return End::Close(1002, "protocol error".into());
                        }
                        Some(Ok(Message::Text(t))) => match self.admit().await {
                            Admit::Yes => self.handle_text(t.as_str()).await,
                            Admit::No(flow) => flow,
                        },
                        Some(Ok(Message::Binary(_))) => match self.admit().await {
                            Admit::Yes => {
                                self.metrics_message("invalid");
                                let err = SignalError::new(ErrorCode::BadRequest, "binary frames are not supported: send JSON text");
                                self.invalid_message(&Value::Null, err).await
                            }
                            Admit::No(flow) => flow,
                        },
                        Some(Ok(Message::Close(frame))) => {
                            // 4000: the client gives this connection up to resume on a new
                            // one (its own ping went unanswered): held like a dropped one.
                            let resuming = frame
                                .is_some_and(|f| f.code == close::CLIENT_RECONNECTING);
                            self.client_closed = !resuming;
                            return End::Close(1000, String::new());
                        }
                        Some(Ok(_)) => Flow::Continue, // ping/pong: answered by the library
                    };
                    if let Some(end) = flow.end() {
                        return end;
                    }
                }
                Some(h) = async {
                    match self.handovers.as_mut() {
                        Some((_, rx)) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Resumed on a new connection before this one was seen to drop (a client
                    // whose network changed): this one is presumed dead.
                    if let Some(end) = self.take_over(h).await.end() {
                        return end;
                    }
                    last_heard = Instant::now();
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= cfg.ping_timeout {
                        info!("no traffic within ping_timeout: closing dead connection");
                        return End::Close(close::PING_TIMEOUT, "ping timeout".into());
                    }
                    if let Some(end) = self.send(Message::Ping(Default::default())).await.end() {
                        return end;
                    }
                }
                _ = sleep_until(hello_deadline), if self.auth.is_none() => {
                    return End::Close(close::HELLO_TIMEOUT, "no hello within hello_timeout".into());
                }
            }
        }
    }

    async fn finish(&mut self, code: u16, reason: &str) {
        if let Some(token) = self.resume_token.take() {
            self.hub.forget_resume(&token);
        }
        if let (Some(auth), Some(room)) = (&self.auth, self.room.take()) {
            let why = match code {
                close::ROOM_MOVED => crate::signal::hub::LEFT_MOVED,
                close::PING_TIMEOUT => "timeout",
                1000 => "disconnected",
                _ => "closed",
            };
            self.hub.leave_room(&auth.user_id, &room, why);
            self.hub.media_leave(self.shard, &auth.user_id, self.joins);
        }
        if let Some(auth) = &self.auth {
            // Its queue is known from the moment it registered (hello, or a member link's attach).
            if let Some(tx) = &self.events_tx {
                self.hub.unregister(&auth.user_id, tx);
            }
            info!(
                code,
                reason,
                room = self.last_room.as_deref(),
                "session ended"
            );
        }
        if code != 1000 {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.send(frame)).await;
            // Read what the client still sends until its Close (at most a second): closing the
            // socket with unread data would reset the connection, and the client would lose
            // the close frame and its reason.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(m)) = self.socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        } else if self.client_closed {
            // RFC 6455 5.5.1: answer the client's Close with one (the library queued it when
            // it read theirs; this sends it).
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                futures_util::SinkExt::flush(&mut self.socket),
            )
            .await;
        }
    }

    async fn send(&mut self, msg: Message) -> Flow {
        match tokio::time::timeout(WRITE_TIMEOUT, self.socket.send(msg)).await {
            Ok(Ok(())) => Flow::Continue,
            Ok(Err(_)) => Flow::Close(1000, String::new()),
            Err(_) => Flow::Close(close::SLOW_CONSUMER, "write timeout".into()),
        }
    }

    async fn send_text(&mut self, text: Utf8Bytes) -> Flow {
        self.send(Message::Text(text)).await
    }

    fn metrics_message(&self, ty: &str) {
        self.hub
            .metrics
            .signal_messages
            .with_label_values(&[ty])
            .inc();
    }

    fn count_error(&self, code: ErrorCode) {
        self.hub
            .metrics
            .signal_errors
            .with_label_values(&[code.as_str()])
            .inc();
    }

    async fn reply(&mut self, id: &Value, result: Result<Value, SignalError>) -> Flow {
        let text = match &result {
            Ok(v) => protocol::response_ok(id, v.clone()),
            Err(e) => {
                self.count_error(e.code);
                debug!(code = e.code.as_str(), message = %e.message, "error response");
                protocol::response_err(id, e)
            }
        };
        self.send_text(text.into()).await
    }

    /// Every frame from the client takes a token from its rate limiter, whatever it holds. Past
    /// the limit a frame is dropped: the first of a run gets a `rate_limited` error, the others
    /// no answer, and more than twice `rate_burst` refused in a row close the connection (1008).
    async fn admit(&mut self) -> Admit {
        if self.limiter.allow(Instant::now()) {
            self.refused_in_a_row = 0;
            return Admit::Yes;
        }
        self.refused_in_a_row += 1;
        self.count_error(ErrorCode::RateLimited);
        let limit = self.hub.config.rate_limit;
        if self.refused_in_a_row > 2 * self.hub.config.rate_burst.max(1) {
            return Admit::No(Flow::Close(
                close::POLICY_VIOLATION,
                format!("kept sending past the rate limit ({limit} messages per second)"),
            ));
        }
        if self.refused_in_a_row > 1 {
            return Admit::No(Flow::Continue);
        }
        let err = SignalError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {limit} messages per second: this message and the next ones past \
                 the limit are dropped unanswered"
            ),
        );
        // Counted above: sent without counting again.
        let text = protocol::response_err(&Value::Null, &err);
        Admit::No(self.send_text(text.into()).await)
    }

    /// Answer an invalid message with `err`, and close the connection at the
    /// [`MAX_INVALID_MESSAGES`]th.
    async fn invalid_message(&mut self, id: &Value, err: SignalError) -> Flow {
        self.invalid += 1;
        if self.invalid > MAX_INVALID_MESSAGES {
            self.count_error(err.code);
            return Flow::Close(
                close::POLICY_VIOLATION,
                format!("more than {MAX_INVALID_MESSAGES} invalid messages"),
            );
        }
        self.reply(id, Err(err)).await
    }

    async fn handle_text(&mut self, text: &str) -> Flow {
        // The entry node of a linked member says its client's connection dropped or came back
        // (clients cannot send this: their entry node refuses the unknown type).
        if self.linked && text.starts_with(crate::cluster::link::CONNECTION_NOTICE) {
            if let (Ok(v), Some(auth), Some(room)) =
                (serde_json::from_str::<Value>(text), &self.auth, &self.room)
                && let Some(event @ ("reconnecting" | "reconnected")) = v["event"].as_str()
            {
                self.hub.announce_connection(room, &auth.user_id, event);
            }
            return Flow::Continue;
        }
        if text.len() > self.hub.config.max_message_bytes {
            self.metrics_message("invalid");
            let err = SignalError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "message of {} bytes exceeds the limit of {} bytes",
                    text.len(),
                    self.hub.config.max_message_bytes
                ),
            );
            return self.invalid_message(&Value::Null, err).await;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.metrics_message("invalid");
                let err = SignalError::new(ErrorCode::BadRequest, format!("malformed JSON: {e}"));
                return self.invalid_message(&Value::Null, err).await;
            }
        };
        let protocol::Envelope {
            id,
            ty,
            fields: obj,
        } = match protocol::envelope(value) {
            Ok(parts) => parts,
            Err((id, err)) => {
                self.metrics_message("invalid");
                return self.invalid_message(&id, err).await;
            }
        };
        let Some(ty) = RequestType::parse(&ty) else {
            self.metrics_message("unknown");
            let err = SignalError::new(
                ErrorCode::UnknownType,
                format!("unknown message type {ty:?}"),
            );
            return self.invalid_message(&id, err).await;
        };
        self.metrics_message(ty.as_str());
        if ty == RequestType::Hello && self.auth.is_none() {
            self.make_room_for_rejoin(&obj).await;
        }
        if ty == RequestType::Resume
            && self.auth.is_none()
            && let Some(node) = self.resume_elsewhere(&obj)
        {
            let secret = self
                .hub
                .directory()
                .cluster()
                .map(|c| c.config.secret.clone())
                .unwrap_or_default();
            if let Some(up) = crate::cluster::link::carry_to(&node, &secret, self.remote).await {
                info!(node = %node.id, "resume of a session on another node: carried there");
                return Flow::Proxy(Box::new(up), text.to_string());
            }
            // Its node is gone (a killed node stays in the registry for up to node_ttl):
            // nothing to resume; this connection stays open for a hello (with `rejoin`).
            self.hub
                .metrics
                .session_resumes
                .with_label_values(&["unknown"])
                .inc();
            let err = SignalError::new(
                ErrorCode::ResumeFailed,
                format!(
                    "the node that held this session ({}) cannot be reached: say hello and join again",
                    node.id
                ),
            );
            return self.reply(&id, Err(err)).await;
        }
        if self.auth.is_some()
            && !matches!(
                ty,
                RequestType::Hello | RequestType::Resume | RequestType::Ping
            )
            && let Some(flow) = self.elsewhere(ty, &id, text, &obj).await
        {
            return flow;
        }
        match self.dispatch(ty, obj) {
            Ok(v) => self.reply(&id, Ok(v)).await,
            Err(Reject::Error(e)) => self.reply(&id, Err(e)).await,
            Err(Reject::Close(e, code)) => {
                let reason = e.message.clone();
                let _ = self.reply(&id, Err(e)).await;
                Flow::Close(code, reason)
            }
            Err(Reject::Handover(tx)) => Flow::Handover(tx, id),
        }
    }

    /// In a cluster: a request that goes to (or is answered for) another node. `None`: handle
    /// it here.
    async fn elsewhere(
        &mut self,
        ty: RequestType,
        id: &Value,
        text: &str,
        obj: &serde_json::Map<String, Value>,
    ) -> Option<Flow> {
        use crate::cluster::link::Watch;
        use crate::cluster::{Located, Placed};
        let dir = self.hub.directory().clone();
        dir.cluster()?;
        if let Some(up) = &self.upstream
            && up.is_alive()
            && up.in_room()
        {
            let watch = match ty {
                RequestType::LeaveRoom => Some((id, Watch::Leave)),
                RequestType::JoinRoom => Some((id, Watch::Join)),
                _ => None,
            };
            up.forward(text, watch).await;
            return Some(Flow::Continue);
        }
        if self.room.is_some() {
            return None;
        }
        match ty {
            RequestType::JoinRoom => {
                let room = obj.get("roomId")?.as_str()?.to_string();
                if !crate::signal::hub::valid_room_id(&room) {
                    return None;
                }
                // A dead owner stays in the registry for up to node_ttl: meanwhile its rooms
                // cannot be reached, then they are taken over.
                let deadline = Instant::now()
                    + dir.cluster().expect("a cluster").config.node_ttl
                    + Duration::from_secs(1);
                loop {
                    let held = self.hub.has_room(&room);
                    match dir.locate(&room, held).await {
                        Ok(Located::Here(settings)) => {
                            if let Some(s) = settings {
                                self.hub.ensure_room(&room, s);
                            }
                            return None;
                        }
                        Ok(Located::Nowhere) => {
                            return Some(
                                self.reply(
                                    id,
                                    Err(SignalError::new(
                                        ErrorCode::RoomNotFound,
                                        format!("room {room:?} not found"),
                                    )),
                                )
                                .await,
                            );
                        }
                        Ok(Located::There(node)) => match self.link_to(&node).await {
                            Ok(up) => {
                                up.forward(text, Some((id, Watch::Join))).await;
                                return Some(Flow::Continue);
                            }
                            Err(e) if Instant::now() >= deadline => {
                                let err = SignalError::new(
                                    ErrorCode::ClusterUnavailable,
                                    format!(
                                        "the node of room {room:?} cannot be reached ({e}): try again"
                                    ),
                                );
                                return Some(self.reply(id, Err(err)).await);
                            }
                            Err(e) => {
                                debug!(error = %e, "room's node unreachable: looking again");
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                        },
                        Err(e) => return Some(self.reply(id, Err(e.into())).await),
                    }
                }
            }
            RequestType::CreateRoom => {
                let req: CreateRoom = serde_json::from_value(Value::Object(obj.clone())).ok()?;
                let auth = self.auth.as_ref().expect("a session");
                let (requested, settings) = match self.hub.check_create(&auth.grants, &req) {
                    Ok(v) => v,
                    Err(e) => return Some(self.reply(id, Err(e)).await),
                };
                let room = requested.unwrap_or_else(|| crate::signal::hub::random_id(10));
                match dir.place(&room, settings, self.linked).await {
                    Ok(Placed::Here) => {
                        let req = CreateRoom {
                            room_id: Some(room.clone()),
                            ..req
                        };
                        let made = self.hub.create_room(&auth.user_id, &auth.grants, req);
                        if made.is_err() {
                            dir.unclaim(&room).await;
                        }
                        Some(self.reply(id, made).await)
                    }
                    Ok(Placed::There(node)) => match self.link_to(&node).await {
                        Ok(up) => {
                            up.forward(text, None).await;
                            Some(Flow::Continue)
                        }
                        Err(e) => {
                            let err = SignalError::new(
                                ErrorCode::ClusterUnavailable,
                                format!(
                                    "the node chosen for the room cannot be reached ({e}): try again"
                                ),
                            );
                            Some(self.reply(id, Err(err)).await)
                        }
                    },
                    Ok(Placed::Exists) => {
                        let err = SignalError::new(
                            ErrorCode::RoomExists,
                            format!("room {room:?} already exists"),
                        );
                        Some(self.reply(id, Err(err)).await)
                    }
                    Err(e) => Some(self.reply(id, Err(e.into())).await),
                }
            }
            _ => None,
        }
    }

    /// Tell the room's node, when that is another node, that this member's connection dropped
    /// or came back.
    async fn notice_to_owner(&mut self, event: &str) {
        if let Some(up) = &self.upstream
            && up.is_alive()
            && up.in_room()
        {
            let notice = format!(
                r#"{}","event":"{event}"}}"#,
                crate::cluster::link::CONNECTION_NOTICE
            );
            up.forward(&notice, None).await;
        }
    }

    /// A `hello` with `rejoin` whose user id has a session here still (the member's link from
    /// a node that died, held for its return): that session gives way, so that the member gets
    /// its id back (see `hello`).
    async fn make_room_for_rejoin(&mut self, obj: &serde_json::Map<String, Value>) {
        let Some(cluster) = self.hub.directory().cluster() else {
            return;
        };
        let Some(token) = obj.get("rejoin").and_then(Value::as_str) else {
            return;
        };
        let Some((_, user)) = crate::cluster::token::read(&cluster.config.secret, token) else {
            return;
        };
        let user = user.to_string();
        for _ in 0..100 {
            if !self.hub.has_session(&user) {
                return;
            }
            self.hub.displace(&user);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The live node of the cluster that holds the session a `resume` names, when that is not
    /// this node.
    fn resume_elsewhere(
        &self,
        obj: &serde_json::Map<String, Value>,
    ) -> Option<crate::cluster::NodeInfo> {
        let cluster = self.hub.directory().cluster()?;
        let token = obj.get("token")?.as_str()?;
        if self.hub.has_resume(token) {
            return None;
        }
        let (node, _) = crate::cluster::token::read(&cluster.config.secret, token)?;
        if node == cluster.node_id() {
            return None;
        }
        // A draining node closed its sessions: nothing to resume there.
        cluster
            .nodes()
            .into_iter()
            .find(|n| n.id == node && !n.draining)
    }

    /// This session's link to `node` (the one it has, if it goes there and still works).
    async fn link_to(
        &mut self,
        node: &crate::cluster::NodeInfo,
    ) -> Result<&crate::cluster::link::Upstream, String> {
        let reuse = self
            .upstream
            .as_ref()
            .is_some_and(|u| u.node == node.id && u.is_alive());
        if !reuse {
            self.upstream = None;
            let cluster = self.hub.directory().cluster().expect("a cluster").clone();
            let auth = self.auth.as_ref().expect("a session");
            let attach = crate::cluster::link::Attach {
                ty: "attach".into(),
                user_id: auth.user_id.clone(),
                identity: auth.identity.clone(),
                grants: auth.grants.clone(),
            };
            let events = self.events_tx.clone().expect("a session");
            let up = crate::cluster::link::open(
                node,
                &cluster.config.secret,
                &attach,
                events,
                self.kick.clone(),
                cluster.metrics.clone(),
            )
            .await?;
            info!(node = %node.id, "member linked to the room's node");
            self.upstream = Some(up);
        }
        Ok(self.upstream.as_ref().expect("a link"))
    }

    fn dispatch(
        &mut self,
        ty: RequestType,
        obj: serde_json::Map<String, Value>,
    ) -> Result<Value, Reject> {
        if ty == RequestType::Ping {
            let _: Empty = fields(ty, obj)?;
            return Ok(json!({}));
        }
        if ty == RequestType::Hello {
            return self.hello(fields(ty, obj)?);
        }
        if ty == RequestType::Resume {
            let req: Resume = fields(ty, obj)?;
            if self.auth.is_some() {
                return Err(SignalError::new(
                    ErrorCode::AlreadyAuthenticated,
                    "this connection already has a session: resume is the first message of a new connection",
                )
                .into());
            }
            return match self.hub.claim_resume(&req.token) {
                Some(tx) => Err(Reject::Handover(tx)),
                None => {
                    self.hub
                        .metrics
                        .session_resumes
                        .with_label_values(&["unknown"])
                        .inc();
                    Err(SignalError::new(ErrorCode::ResumeFailed, NO_SESSION_TO_RESUME).into())
                }
            };
        }
        let Some(auth) = &self.auth else {
            return Err(SignalError::new(ErrorCode::NotAuthenticated, "send hello first").into());
        };
        let hub = &self.hub;
        match ty {
            RequestType::CreateRoom => {
                let req: CreateRoom = fields(ty, obj)?;
                Ok(hub.create_room(&auth.user_id, &auth.grants, req)?)
            }
            RequestType::JoinRoom => {
                let req: JoinRoom = fields(ty, obj)?;
                if let Some(r) = &self.room {
                    return Err(SignalError::new(
                        ErrorCode::AlreadyInRoom,
                        format!("already in room {r:?}: leave it first"),
                    )
                    .into());
                }
                let joined =
                    hub.join_room(&auth.user_id, &auth.identity, &auth.grants, &req.room_id)?;
                info!(room = %req.room_id, "joined room");
                self.room = Some(req.room_id.clone());
                self.relay_open = false;
                self.last_room = Some(req.room_id.clone());
                self.shard = hub.room_shard(&req.room_id);
                self.joins += 1;
                Ok(json!({
                    "roomId": req.room_id,
                    "members": joined.members,
                    "maxPeers": joined.max_peers,
                    "mode": joined.mode,
                    "tracks": hub.relay_tracks(&req.room_id),
                }))
            }
            RequestType::LeaveRoom => {
                let _: Empty = fields(ty, obj)?;
                let Some(room) = self.room.take() else {
                    return Err(SignalError::new(ErrorCode::NotInRoom, "not in a room").into());
                };
                hub.leave_room(&auth.user_id, &room, "left");
                hub.media_leave(self.shard, &auth.user_id, self.joins);
                info!(%room, "left room");
                Ok(json!({}))
            }
            RequestType::Offer | RequestType::Answer => {
                let req: Sdp = fields(ty, obj)?;
                let room = self.require_room()?.to_string();
                let room = room.as_str();
                check_sdp_grants(&req.sdp, &auth.grants)?;
                if req.to == SERVER_ID {
                    // An offer while no relay connection is open opens one: so many a minute.
                    if ty == RequestType::Offer && !self.relay_open {
                        if !self.relay_limiter.allow(Instant::now()) {
                            hub.metrics
                                .limit_refusals
                                .with_label_values(&["relay_connections_per_minute"])
                                .inc();
                            return Err(SignalError::new(
                                ErrorCode::RateLimited,
                                format!(
                                    "more than {} new relay connections a minute \
                                     (max_relay_connections_per_minute): try again later",
                                    hub.config.max_relay_connections_per_minute
                                ),
                            )
                            .into());
                        }
                        self.relay_open = true;
                    }
                    let user_id = auth.user_id.clone();
                    let cmd = if ty == RequestType::Offer {
                        Command::Offer {
                            user_id,
                            room_id: room.to_string(),
                            sdp: req.sdp,
                            meta: req.meta,
                            join: self.joins,
                            publish: auth.grants.publish,
                        }
                    } else {
                        Command::Answer {
                            user_id,
                            sdp: req.sdp,
                        }
                    };
                    self.to_media(cmd)?;
                    return Ok(json!({}));
                }
                let mut ev = serde_json::Map::new();
                ev.insert("type".into(), ty.as_str().into());
                ev.insert("sdp".into(), req.sdp.into());
                if let Some(meta) = req.meta {
                    ev.insert("meta".into(), meta);
                }
                hub.relay(&auth.user_id, room, &req.to, ev)?;
                Ok(json!({}))
            }
            RequestType::Candidate => {
                let req: Candidate = fields(ty, obj)?;
                let room = self.require_room()?;
                if !(req.candidate.is_object() || req.candidate.is_null()) {
                    return Err(SignalError::new(
                        ErrorCode::BadRequest,
                        "candidate must be an RTCIceCandidateInit object or null",
                    )
                    .into());
                }
                if req.to == SERVER_ID {
                    self.to_media(Command::Candidate {
                        user_id: auth.user_id.clone(),
                        candidate: req.candidate,
                    })?;
                    return Ok(json!({}));
                }
                let mut ev = serde_json::Map::new();
                ev.insert("type".into(), "candidate".into());
                ev.insert("candidate".into(), req.candidate);
                hub.relay(&auth.user_id, room, &req.to, ev)?;
                Ok(json!({}))
            }
            RequestType::Bye => {
                let req: Bye = fields(ty, obj)?;
                let room = self.require_room()?;
                if req.to == SERVER_ID {
                    self.to_media(Command::Close {
                        user_id: auth.user_id.clone(),
                    })?;
                    self.relay_open = false;
                    return Ok(json!({}));
                }
                let mut ev = serde_json::Map::new();
                ev.insert("type".into(), "bye".into());
                if let Some(r) = req.reason {
                    ev.insert("reason".into(), r.into());
                }
                hub.relay(&auth.user_id, room, &req.to, ev)?;
                Ok(json!({}))
            }
            RequestType::ReportMode => {
                let req: ReportMode = fields(ty, obj)?;
                let room = self.require_room()?;
                if !MODE_REASONS.contains(&req.reason.as_str()) {
                    return Err(SignalError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "unknown reason {:?}; one of {}",
                            req.reason,
                            MODE_REASONS.join(", ")
                        ),
                    )
                    .into());
                }
                let relayed = req.mode == MediaMode::Relay;
                hub.set_mode(
                    &auth.user_id,
                    room,
                    req.user_id.as_deref(),
                    relayed,
                    &req.reason,
                )?;
                debug!(relayed, reason = %req.reason, peer = ?req.user_id, "media mode reported");
                Ok(json!({}))
            }
            RequestType::Subscribe | RequestType::Unsubscribe => {
                let req: Subscription = fields(ty, obj)?;
                let room = self.require_room()?.to_string();
                let subscribe = ty == RequestType::Subscribe;
                if subscribe && !auth.grants.subscribe {
                    return Err(SignalError::new(
                        ErrorCode::Forbidden,
                        "this token does not allow subscribing",
                    )
                    .into());
                }
                if req.user_id == auth.user_id {
                    return Err(SignalError::new(
                        ErrorCode::BadRequest,
                        "you cannot subscribe to yourself",
                    )
                    .into());
                }
                // Unsubscribing from a member who already left is not an error (it is done).
                if subscribe && !hub.is_member(&room, &req.user_id) {
                    return Err(SignalError::new(
                        ErrorCode::TargetNotFound,
                        format!("{:?} is not a member of your room", req.user_id),
                    )
                    .into());
                }
                let stream_type = req.stream_type.map(|t| t.as_str().to_string());
                let cmd = if subscribe {
                    Command::Subscribe {
                        user_id: auth.user_id.clone(),
                        room_id: room,
                        publisher: req.user_id,
                        stream_type,
                        join: self.joins,
                    }
                } else {
                    Command::Unsubscribe {
                        user_id: auth.user_id.clone(),
                        publisher: req.user_id,
                        stream_type,
                    }
                };
                self.to_media(cmd)?;
                Ok(json!({}))
            }
            RequestType::GetRoom => {
                let _: Empty = fields(ty, obj)?;
                let room = self.require_room()?;
                Ok(hub.room_info(room, &auth.user_id).unwrap_or(Value::Null))
            }
            RequestType::SetVideoQuality => {
                let req: SetVideoQuality = fields(ty, obj)?;
                let room = self.require_room()?.to_string();
                if !hub.is_member(&room, &req.user_id) || req.user_id == auth.user_id {
                    return Err(SignalError::new(
                        ErrorCode::TargetNotFound,
                        format!("{:?} is not another member of your room", req.user_id),
                    )
                    .into());
                }
                self.to_media(Command::SetQuality {
                    user_id: auth.user_id.clone(),
                    publisher: req.user_id,
                    quality: req.quality.into(),
                })?;
                Ok(json!({}))
            }
            RequestType::Hello | RequestType::Resume | RequestType::Ping => {
                unreachable!("handled above")
            }
        }
    }

    /// Hand a client's signaling for its relay connection to the media task.
    fn to_media(&self, cmd: Command) -> Result<(), SignalError> {
        self.hub.media(self.shard).try_send(cmd).map_err(|_| {
            SignalError::new(
                ErrorCode::MediaUnavailable,
                "the media relay is overloaded or stopped: try again",
            )
        })
    }

    fn require_room(&self) -> Result<&str, SignalError> {
        self.room
            .as_deref()
            .ok_or_else(|| SignalError::new(ErrorCode::NotInRoom, "join a room before signaling"))
    }

    fn hello(&mut self, req: Hello) -> Result<Value, Reject> {
        if self.auth.is_some() {
            return Err(SignalError::new(
                ErrorCode::AlreadyAuthenticated,
                "hello was already accepted",
            )
            .into());
        }
        if let Some(p) = req.protocol
            && p != PROTOCOL_VERSION
        {
            return Err(SignalError::new(
                ErrorCode::UnsupportedProtocol,
                format!("protocol {p} is not supported; this server speaks {PROTOCOL_VERSION}"),
            )
            .into());
        }
        let (identity, grants) = match &self.hub.verifier {
            Some(v) => {
                let claims = match (self.query_claims.take(), req.token) {
                    (_, Some(t)) => v.verify(&t),
                    (Some(c), None) => Ok(c),
                    (None, None) => Err(TokenError::Missing),
                };
                match claims {
                    Ok(c) => (c.sub, c.grants),
                    Err(e) => {
                        return Err(Reject::Close(
                            SignalError::new(ErrorCode::Unauthorized, e.to_string()),
                            close::UNAUTHORIZED,
                        ));
                    }
                }
            }
            None => {
                let name = req
                    .identity
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.chars().take(64).collect::<String>());
                (
                    name.unwrap_or_else(|| "guest".to_string()),
                    Grants::default(),
                )
            }
        };
        if !self.slot.promote() {
            self.count_error(ErrorCode::TooManyConnections);
            return Err(Reject::Close(
                SignalError::new(
                    ErrorCode::TooManyConnections,
                    format!(
                        "too many sessions (max_connections = {}): try again later or another node",
                        self.hub.config.max_connections
                    ),
                ),
                close::TRY_AGAIN_LATER,
            ));
        }
        let (tx, kick) = self.pending.take().expect("hello registers once");
        self.events_tx = Some(tx.clone());
        let moved = self.moved.clone();
        let handle = SessionHandle { tx, kick, moved };
        // A client whose session went with its room's node asks for its user id back.
        let previous = match (self.hub.directory().cluster(), &req.rejoin) {
            (Some(c), Some(t)) => crate::cluster::token::read(&c.config.secret, t)
                .map(|(_, user)| user.to_string())
                .filter(|u| u.len() <= 64),
            _ => None,
        };
        let user_id = match previous {
            Some(u) => match self.hub.register_as(&u, handle) {
                Ok(()) => {
                    info!(user = %u, "session takes its previous user id back (rejoin)");
                    u
                }
                Err(handle) => self.hub.register(handle),
            },
            None => self.hub.register(handle),
        };
        tracing::Span::current().record("user", user_id.as_str());
        info!(%identity, "session started");
        self.auth = Some(Auth {
            user_id,
            identity,
            grants,
        });
        if !self.hub.config.resume_timeout.is_zero() {
            let (tx, rx) = mpsc::channel(1);
            let user_id = self.auth.as_ref().expect("a session").user_id.clone();
            self.resume_token = Some(self.hub.resume_token(None, &user_id, tx.clone()));
            self.handovers = Some((tx, rx));
        }
        Ok(self.welcome())
    }

    /// What `hello` answers (and `resume`, with more): the session and the server's settings.
    fn welcome(&self) -> Value {
        let cfg = &self.hub.config;
        let auth = self.auth.as_ref().expect("a session");
        let mut welcome = json!({
            "userId": auth.user_id,
            "identity": auth.identity,
            "protocol": PROTOCOL_VERSION,
            "iceServers": crate::signal::ice::for_session(cfg, &self.hub.media_addrs, &auth.user_id),
            "p2pMaxPeers": cfg.p2p_max_peers,
            "p2pTimeoutMs": cfg.p2p_timeout.as_millis() as u64,
            "pingIntervalMs": cfg.ping_interval.as_millis() as u64,
            "pingTimeoutMs": cfg.ping_timeout.as_millis() as u64,
            "maxMessageBytes": cfg.max_message_bytes,
            "grants": auth.grants,
        });
        if let Some(token) = &self.resume_token {
            welcome["resumeToken"] = json!(token);
            welcome["resumeTimeoutMs"] = json!(cfg.resume_timeout.as_millis() as u64);
        }
        welcome
    }
}

enum Reject {
    Error(SignalError),
    /// Answer with the error, then close with this code.
    Close(SignalError, u16),
    /// Not an error: the connection goes to the session it resumes.
    Handover(mpsc::Sender<Handover>),
}

impl From<SignalError> for Reject {
    fn from(e: SignalError) -> Self {
        Reject::Error(e)
    }
}

/// What one m-section of an SDP does with media, by its effective direction (RFC 8866 6.7: a
/// media-level direction attribute, else the session-level one, else `sendrecv`; RFC 8843 /
/// RFC 3264 6: a port of 0 disables the m-section).
#[derive(Debug, PartialEq, Eq)]
struct MediaSection {
    sends: bool,
    receives: bool,
}

/// The audio and video m-sections of `sdp`, each with its effective direction. An attribute is
/// read as RFC 8866 5.13 writes it, `a=<name>[:<value>]`: `a=sendrecv:x` is a `sendrecv`
/// attribute (webrtc-rs reads it so), whatever follows the colon.
fn media_sections(sdp: &str) -> Vec<MediaSection> {
    fn direction(line: &str) -> Option<Direction> {
        let attr = line.strip_prefix("a=")?;
        let name = attr.split(':').next().unwrap_or(attr).trim();
        match name {
            "sendrecv" => Some((true, true)),
            "sendonly" => Some((true, false)),
            "recvonly" => Some((false, true)),
            "inactive" => Some((false, false)),
            _ => None,
        }
    }
    /// (sends, receives)
    type Direction = (bool, bool);
    let mut session = None;
    // (carries media, port is 0, direction)
    let mut sections: Vec<(bool, bool, Option<Direction>)> = Vec::new();
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            let mut parts = m.split_whitespace();
            let media = parts.next().unwrap_or_default();
            let port = parts.next().unwrap_or_default();
            let disabled = port.split('/').next() == Some("0");
            sections.push((matches!(media, "audio" | "video"), disabled, None));
        } else if let Some(d) = direction(line) {
            match sections.last_mut() {
                Some(section) => section.2 = Some(d),
                None => session = Some(d),
            }
        }
    }
    sections
        .into_iter()
        .filter(|(media, _, _)| *media)
        .map(|(_, disabled, d)| {
            let (sends, receives) = d.or(session).unwrap_or((true, true));
            MediaSection {
                sends: sends && !disabled,
                receives: receives && !disabled,
            }
        })
        .collect()
}

/// A client may only send media if granted `publish`, and receive if granted `subscribe`: each
/// audio and video m-section of an offer or answer it sends, by its effective direction.
fn check_sdp_grants(sdp: &str, grants: &Grants) -> Result<(), SignalError> {
    if grants.publish && grants.subscribe {
        return Ok(());
    }
    for m in media_sections(sdp) {
        if m.sends && !grants.publish {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                "this token may not publish: an audio or video m-section sends media \
                 (sendrecv or sendonly, or no direction at all: sendrecv by default)",
            ));
        }
        if m.receives && !grants.subscribe {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                "this token may not subscribe: an audio or video m-section receives media \
                 (sendrecv or recvonly, or no direction at all: sendrecv by default)",
            ));
        }
    }
    Ok(())
}

/// [`check_sdp_grants`], for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub fn fuzz_check_sdp_grants(sdp: &str, grants: &Grants) -> Result<(), SignalError> {
    check_sdp_grants(sdp, grants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_refills_over_time() {
        let mut rl = RateLimit::new(10.0, 3.0);
        let t = Instant::now();
        assert!(rl.allow(t) && rl.allow(t) && rl.allow(t));
        assert!(!rl.allow(t));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(rl.allow(Instant::now()));
        assert!(!rl.allow(Instant::now()));
    }

    #[test]
    fn sdp_directions_follow_grants() {
        let viewer = Grants {
            publish: false,
            ..Grants::default()
        };
        assert!(
            check_sdp_grants("v=0\r\nm=video 9 RTP/SAVPF 96\r\na=recvonly\r\n", &viewer).is_ok()
        );
        assert_eq!(
            check_sdp_grants("v=0\r\nm=video 9 RTP/SAVPF 96\r\na=sendrecv\r\n", &viewer)
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
        let sender = Grants {
            subscribe: false,
            ..Grants::default()
        };
        assert!(
            check_sdp_grants("m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n", &sender).is_ok()
        );
        assert!(
            check_sdp_grants("m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n", &sender).is_err()
        );
    }

    /// The ways around a line-by-line check that an adversarial pass found, and the cases that
    /// must still pass: per m-section, by effective direction.
    #[test]
    fn sdp_directions_are_read_per_m_section_as_rtc_reads_them() {
        let viewer = Grants {
            publish: false,
            ..Grants::default()
        };
        let video = "v=0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n";
        let refused = [
            // A direction attribute with a value is still that direction.
            format!("{video}a=sendrecv:x\r\n"),
            format!("{video}a=sendonly:whatever\r\n"),
            // No direction at all: sendrecv.
            video.to_string(),
            // Session-level sendrecv applies to an m-section without its own.
            "v=0\r\na=sendrecv\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n".to_string(),
            // A second m-section that sends, after a recvonly one.
            format!("{video}a=recvonly\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"),
        ];
        for sdp in &refused {
            assert_eq!(
                check_sdp_grants(sdp, &viewer).map_err(|e| e.code),
                Err(ErrorCode::Forbidden),
                "{sdp:?}"
            );
        }
        let allowed = [
            format!("{video}a=recvonly\r\n"),
            format!("{video}a=inactive\r\n"),
            // A disabled m-section (port 0) carries nothing.
            "v=0\r\nm=video 0 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n".to_string(),
            // A data channel only: no media direction.
            "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n".to_string(),
            // Session-level recvonly, no media-level attribute.
            "v=0\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n".to_string(),
        ];
        for sdp in &allowed {
            assert!(check_sdp_grants(sdp, &viewer).is_ok(), "{sdp:?}");
        }
        let no_subscribe = Grants {
            subscribe: false,
            ..Grants::default()
        };
        assert!(
            check_sdp_grants(video, &no_subscribe).is_err(),
            "no direction receives too"
        );
        assert!(check_sdp_grants(&format!("{video}a=sendonly\r\n"), &no_subscribe).is_ok());
    }
}
