//! The control plane shared by every WebSocket task: sessions, rooms, presence fan-out and
//! the P2P relay of offer/answer/candidate/bye.
//!
//! Registries are `DashMap`s; a shard guard is never held across an `.await` (every method here is
//! synchronous). Messages to other sessions go through their bounded outbound queues with
//! `try_send`: a session whose queue is full is kicked as a slow consumer instead of stalling the
//! sender.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::{Grants, Verifier};
use crate::config::Config;
use crate::metrics::Metrics;
use tracing::info;

use crate::signal::protocol::{CreateRoom, ErrorCode, MemberInfo, RoomMode, SignalError};

/// The `leave_room` reason of a member whose room moved to another node: no presence event.
pub const LEFT_MOVED: &str = "moved";

/// Capacity of each session's outbound queue.
pub const OUTBOUND_QUEUE: usize = 256;

/// What other tasks hold to reach a session.
pub struct SessionHandle {
    pub tx: mpsc::Sender<Utf8Bytes>,
    /// Cancelled when the session must be closed as a slow consumer.
    pub kick: CancellationToken,
    /// Cancelled when the session's room moved to another node of the cluster (close 1012).
    pub moved: CancellationToken,
}

struct Member {
    user_id: String,
    identity: String,
    relay_only: bool,
    /// The members this member's client reported it exchanges media with through the relay.
    relay_with: std::collections::HashSet<String>,
}

/// Whether media between two members goes through the relay: either side reported so.
fn relayed(a: &Member, b: &Member) -> bool {
    a.relay_with.contains(&b.user_id) || b.relay_with.contains(&a.user_id)
}

struct Room {
    /// The media shard whose core carries this room's relayed media.
    shard: usize,
    /// The session that created it (its rooms count against `max_rooms_per_session`).
    creator: String,
    max_peers: u32,
    mode: RoomMode,
    members: Vec<Member>,
    empty_since: Option<Instant>,
}

impl Room {
    /// Whether the pair (a, b) is relayed: either side reported so.
    fn pair_relayed(&self, a: &str, b: &str) -> bool {
        let find = |id: &str| self.members.iter().find(|m| m.user_id == id);
        match (find(a), find(b)) {
            (Some(a), Some(b)) => relayed(a, b),
            _ => false,
        }
    }

    /// Pairs of members by how their media travels: `(p2p, relay)`. A pair is relayed when either
    /// side says so. O(members²), on the control path only (rooms are small).
    fn pairs(&self) -> (i64, i64) {
        let n = self.members.len() as i64;
        let mut through_relay = 0;
        for (i, a) in self.members.iter().enumerate() {
            for b in &self.members[i + 1..] {
                if relayed(a, b) {
                    through_relay += 1;
                }
            }
        }
        (n * (n - 1) / 2 - through_relay, through_relay)
    }
}

/// Result of a successful join.
pub struct Joined {
    pub members: Vec<MemberInfo>,
    pub max_peers: u32,
    pub mode: RoomMode,
}

pub struct Hub {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub verifier: Option<Verifier>,
    /// Where clients reach the media port (STUN now, media with the relay).
    pub media_addrs: Vec<std::net::SocketAddr>,
    /// Commands to the media shards (the relay), by shard index; a room is pinned to one.
    media: Vec<crate::media::MediaControl>,
    /// Rooms and members pinned to each shard: where a new room goes (O(shards), not O(rooms)).
    shard_load: Vec<AtomicUsize>,
    /// Rooms that exist (checked against `max_rooms` before one is made).
    room_count: AtomicUsize,
    /// Rooms that exist, by the session that created them.
    created_by: DashMap<String, usize>,
    /// WebSocket connections before `hello`, in all and by address; sessions after it.
    pending: AtomicUsize,
    pending_by_ip: DashMap<std::net::IpAddr, usize>,
    sessions_open: AtomicUsize,
    /// Log lines about refused tokens: the second they are counted in, and how many then.
    refusal_log: std::sync::Mutex<(u64, u64)>,
    /// The tracks published at the relay, by room (as the `track` events the relay sends say):
    /// what a member who joins later is told in its `joinRoom` answer.
    relay_tracks: DashMap<String, Vec<Value>>,
    sessions: DashMap<String, SessionHandle>,
    /// Live sessions by their resume token: where a `resume` hands its connection over.
    resumable: DashMap<String, mpsc::Sender<Handover>>,
    rooms: DashMap<String, Room>,
    connections: AtomicUsize,
    draining: AtomicBool,
    /// `true` once draining started; sessions watch it to send the `draining` event.
    drain_tx: watch::Sender<bool>,
    /// Cancelled when the drain timeout passed: remaining sessions close.
    pub shutdown: CancellationToken,
    /// Which node owns which room (set once, before serving; local when unset).
    directory: std::sync::OnceLock<crate::cluster::Directory>,
}

static LOCAL_DIRECTORY: crate::cluster::Directory = crate::cluster::Directory::Local;

/// Keeps the connection counts right however a session ends: a connection counts as pending
/// (`max_pending_connections`, and per address) until its `hello` makes it a session
/// (`max_connections`).
pub struct ConnectionSlot {
    hub: Arc<Hub>,
    ip: std::net::IpAddr,
    session: bool,
}

impl ConnectionSlot {
    /// The connection said hello: count it as a session. False when `max_connections` are open.
    pub fn promote(&mut self) -> bool {
        if self.session {
            return true;
        }
        let max = self.hub.config.max_connections as usize;
        if self.hub.sessions_open.fetch_add(1, Ordering::AcqRel) >= max {
            self.hub.sessions_open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.hub.release_pending(self.ip);
        self.session = true;
        true
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if self.session {
            self.hub.sessions_open.fetch_sub(1, Ordering::AcqRel);
        } else {
            self.hub.release_pending(self.ip);
        }
        self.hub.connections.fetch_sub(1, Ordering::AcqRel);
        self.hub.metrics.ws_connections.dec();
    }
}

/// A new connection taking over a session (`resume`): its socket, and the id of the `resume`
/// request to answer on it. Its connection slot is let go: the session keeps its own.
pub struct Handover {
    pub socket: axum::extract::ws::WebSocket,
    pub id: Value,
    pub remote: std::net::SocketAddr,
}

/// Log lines about refused tokens per second (a client without a token can make thousands).
pub const REFUSAL_LINES_PER_SECOND: u64 = 5;

/// Why [`Hub::try_connect`] refused a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_pending_connections` connections have not said hello.
    Pending,
    /// As many from this address (`max_pending_per_ip`).
    PendingPerIp,
}

const ID_ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyz23456789";

pub fn random_id(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char)
        .collect()
}

pub fn valid_room_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Hub {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        media_addrs: Vec<std::net::SocketAddr>,
        media: Vec<crate::media::MediaControl>,
    ) -> Arc<Hub> {
        assert!(!media.is_empty(), "at least one media shard");
        let verifier = config
            .api
            .as_ref()
            .map(|(key, secret)| Verifier::new(key, secret));
        let (drain_tx, _) = watch::channel(false);
        Arc::new(Hub {
            config,
            metrics,
            verifier,
            media_addrs,
            shard_load: media.iter().map(|_| AtomicUsize::new(0)).collect(),
            media,
            room_count: AtomicUsize::new(0),
            created_by: DashMap::new(),
            pending: AtomicUsize::new(0),
            pending_by_ip: DashMap::new(),
            sessions_open: AtomicUsize::new(0),
            refusal_log: std::sync::Mutex::new((0, 0)),
            relay_tracks: DashMap::new(),
            sessions: DashMap::new(),
            resumable: DashMap::new(),
            rooms: DashMap::new(),
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            drain_tx,
            shutdown: CancellationToken::new(),
            directory: std::sync::OnceLock::new(),
        })
    }

    /// Take a connection slot, or `None` when `max_connections` are open.
    /// Count a new WebSocket connection from `ip` as pending (before `hello`).
    pub fn try_connect(self: &Arc<Self>, ip: std::net::IpAddr) -> Result<ConnectionSlot, Refused> {
        let ip = ip.to_canonical();
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.config.max_pending_connections {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Pending);
        }
        {
            let mut n = self.pending_by_ip.entry(ip).or_insert(0);
            if *n >= self.config.max_pending_per_ip {
                drop(n);
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::PendingPerIp);
            }
            *n += 1;
        }
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.metrics.ws_connections.inc();
        Ok(ConnectionSlot {
            hub: self.clone(),
            ip,
            session: false,
        })
    }

    /// Keep [`Hub::relay_tracks`] current from a `track` event.
    fn note_track(&self, room_id: &str, ev: &Value) {
        let track = json!({
            "userId": ev["userId"], "streamType": ev["streamType"], "kind": ev["kind"],
        });
        let mut tracks = self.relay_tracks.entry(room_id.to_string()).or_default();
        tracks.retain(|t| *t != track);
        if ev["event"] == "published" {
            tracks.push(track);
        }
        if tracks.is_empty() {
            drop(tracks);
            self.relay_tracks.remove_if(room_id, |_, t| t.is_empty());
        }
    }

    /// The tracks published at the relay in a room: `[{userId, streamType, kind}]`.
    pub fn relay_tracks(&self, room_id: &str) -> Value {
        Value::Array(
            self.relay_tracks
                .get(room_id)
                .map(|t| t.clone())
                .unwrap_or_default(),
        )
    }

    /// A token was refused: `Some(n)` when a log line is due (at most [`REFUSAL_LINES_PER_SECOND`]
    /// a second, the next one counting those not logged meanwhile: `n` refusals in all).
    pub fn log_refusal(&self) -> Option<u64> {
        let now = crate::auth::unix_now();
        // No `.await` under this lock.
        let mut log = self.refusal_log.lock().unwrap_or_else(|e| e.into_inner());
        let (second, count) = &mut *log;
        if *second != now {
            let missed = count.saturating_sub(REFUSAL_LINES_PER_SECOND);
            *second = now;
            *count = 1;
            return Some(1 + missed);
        }
        *count += 1;
        (*count <= REFUSAL_LINES_PER_SECOND).then_some(1)
    }

    fn release_pending(&self, ip: std::net::IpAddr) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        if let Entry::Occupied(mut e) = self.pending_by_ip.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain_tx.send_replace(true);
    }

    pub fn drain_watch(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// Register a new session under a fresh unique user id.
    pub fn register(&self, handle: SessionHandle) -> String {
        let mut handle = Some(handle);
        loop {
            let id = format!("u-{}", random_id(10));
            if let Entry::Vacant(v) = self.sessions.entry(id.clone()) {
                v.insert(handle.take().expect("inserted once"));
                return id;
            }
        }
    }

    /// Register a session under the id its entry node gave it (a member link); `false` if a
    /// session of that id is here already.
    pub fn register_as(&self, user_id: &str, handle: SessionHandle) -> Result<(), SessionHandle> {
        match self.sessions.entry(user_id.to_string()) {
            Entry::Vacant(v) => {
                v.insert(handle);
                Ok(())
            }
            Entry::Occupied(_) => Err(handle),
        }
    }

    /// Close the session registered as `user_id` as moved (1012, no presence event): a member
    /// coming back through another node takes its place.
    pub fn displace(&self, user_id: &str) {
        if let Some(s) = self.sessions.get(user_id) {
            s.moved.cancel();
        }
    }

    /// The cluster's directory (local when the server is on its own).
    pub fn directory(&self) -> &crate::cluster::Directory {
        self.directory.get().unwrap_or(&LOCAL_DIRECTORY)
    }

    pub fn set_directory(&self, d: crate::cluster::Directory) {
        let _ = self.directory.set(d);
    }

    pub fn has_room(&self, room_id: &str) -> bool {
        self.rooms.contains_key(room_id)
    }

    /// Make a room this node took over in the cluster, as the directory describes it (nothing
    /// if it is here already).
    pub fn ensure_room(&self, room_id: &str, settings: crate::cluster::RoomSettings) {
        if self.rooms.contains_key(room_id) {
            return;
        }
        self.room_count.fetch_add(1, Ordering::SeqCst);
        if self
            .make_room(
                "",
                settings.max_peers,
                settings.mode,
                Some(room_id.to_string()),
            )
            .is_err()
        {
            self.room_count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The room moved to another node: its members here are closed with 1012 (they reconnect
    /// and join it there).
    pub fn evict_room(&self, room_id: &str) {
        for m in self.room_members(room_id) {
            if let Some(s) = self.sessions.get(&m) {
                s.moved.cancel();
            }
        }
    }

    /// Every session here is closed with 1012 (a draining node of a cluster).
    pub fn evict_all(&self) {
        for s in self.sessions.iter() {
            s.moved.cancel();
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Unregister `user_id` if it is still the session whose queue is `tx` (another may have
    /// taken its id since: a member coming back through another node).
    pub fn unregister(&self, user_id: &str, tx: &mpsc::Sender<Utf8Bytes>) {
        self.sessions
            .remove_if(user_id, |_, h| h.tx.same_channel(tx));
    }

    pub fn has_session(&self, user_id: &str) -> bool {
        self.sessions.contains_key(user_id)
    }

    /// A fresh resume token for a session that takes handovers on `tx` (its previous token,
    /// if any, no longer works).
    pub fn resume_token(
        &self,
        previous: Option<&str>,
        user_id: &str,
        tx: mpsc::Sender<Handover>,
    ) -> String {
        if let Some(p) = previous {
            self.resumable.remove(p);
        }
        loop {
            // A cluster node's tokens say which node holds the session, and whose it is.
            let token = match self.directory().cluster() {
                Some(c) => crate::cluster::token::sign(
                    &c.config.secret,
                    c.node_id(),
                    user_id,
                    &random_id(24),
                ),
                None => random_id(32),
            };
            if let Entry::Vacant(v) = self.resumable.entry(token.clone()) {
                v.insert(tx);
                return token;
            }
        }
    }

    /// Whether `token` resumes a session here.
    pub fn has_resume(&self, token: &str) -> bool {
        self.resumable.contains_key(token)
    }

    /// The session `token` resumes, taken out of the table (one resume per token).
    pub fn claim_resume(&self, token: &str) -> Option<mpsc::Sender<Handover>> {
        self.resumable.remove(token).map(|(_, tx)| tx)
    }

    /// A session ended: its token no longer resumes anything.
    pub fn forget_resume(&self, token: &str) {
        self.resumable.remove(token);
    }

    /// Room `room_id` as `user_id` would be told it on joining now: its other members, size,
    /// mode and the tracks at the relay (`None`: it is gone).
    pub fn room_info(&self, room_id: &str, user_id: &str) -> Option<Value> {
        let room = self.rooms.get(room_id)?;
        let members: Vec<MemberInfo> = room
            .members
            .iter()
            .filter(|m| m.user_id != user_id)
            .map(|m| MemberInfo {
                user_id: m.user_id.clone(),
                identity: m.identity.clone(),
                relay_only: m.relay_only,
            })
            .collect();
        let (max_peers, mode) = (room.max_peers, room.mode);
        drop(room);
        Some(json!({
            "roomId": room_id,
            "members": members,
            "maxPeers": max_peers,
            "mode": mode,
            "tracks": self.relay_tracks(room_id),
        }))
    }

    /// The hub's table sizes and the live tasks, into their gauges (at each scrape).
    pub fn observe_tables(&self) {
        let sizes = [
            self.sessions.len(),
            self.resumable.len(),
            self.rooms.len(),
            self.created_by.len(),
            self.relay_tracks.len(),
            self.pending_by_ip.len(),
        ];
        for (table, n) in crate::metrics::HUB_TABLES.iter().zip(sizes) {
            self.metrics
                .tables
                .with_label_values(&[table])
                .set(n as i64);
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.metrics.tasks.set(h.metrics().num_alive_tasks() as i64);
        }
    }

    /// Tell the other members of `room_id` that `user_id`'s connection dropped (`reconnecting`)
    /// or came back (`reconnected`).
    pub fn announce_connection(&self, room_id: &str, user_id: &str, event: &str) {
        crate::media::ClientSink::send_to_room(
            self,
            room_id,
            user_id,
            json!({"type": "presence", "event": event, "roomId": room_id, "userId": user_id}),
        );
    }

    /// Queue a message for a session without waiting. A full queue kicks that session.
    fn deliver(&self, user_id: &str, text: &Utf8Bytes) {
        if let Some(s) = self.sessions.get(user_id) {
            match s.tx.try_send(text.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => s.kick.cancel(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Queue an event for one session (from the media task).
    pub fn send_event(&self, user_id: &str, text: Utf8Bytes) {
        self.deliver(user_id, &text);
    }

    /// Send an event to every session (used for `draining`).
    pub fn broadcast(&self, text: &Utf8Bytes) {
        let ids: Vec<String> = self.sessions.iter().map(|e| e.key().clone()).collect();
        for id in ids {
            self.deliver(&id, text);
        }
    }

    /// What `createRoom` asks for, checked: the requested id (if any) and the room's settings.
    pub fn check_create(
        &self,
        grants: &Grants,
        req: &CreateRoom,
    ) -> Result<(Option<String>, crate::cluster::RoomSettings), SignalError> {
        if self.is_draining() {
            return Err(SignalError::new(
                ErrorCode::Draining,
                "the server is draining: no new rooms",
            ));
        }
        if !grants.create {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                "this token may not create rooms",
            ));
        }
        let max_cap = self.config.max_room_peers;
        let max_peers = req.max_peers.unwrap_or(max_cap);
        if !(2..=max_cap).contains(&max_peers) {
            return Err(SignalError::new(
                ErrorCode::BadRequest,
                format!("maxPeers must be between 2 and {max_cap}"),
            ));
        }
        let requested = match (&req.room_id, &grants.room) {
            (Some(id), Some(allowed)) if id != allowed => {
                return Err(SignalError::new(
                    ErrorCode::Forbidden,
                    format!("this token is restricted to room {allowed:?}"),
                ));
            }
            (Some(id), _) => Some(id.clone()),
            (None, Some(allowed)) => Some(allowed.clone()),
            (None, None) => None,
        };
        if let Some(id) = &requested
            && !valid_room_id(id)
        {
            return Err(SignalError::new(
                ErrorCode::BadRequest,
                "roomId must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'",
            ));
        }
        let mode = req.mode.unwrap_or_default();
        Ok((requested, crate::cluster::RoomSettings { max_peers, mode }))
    }

    pub fn create_room(
        &self,
        creator: &str,
        grants: &Grants,
        req: CreateRoom,
    ) -> Result<Value, SignalError> {
        let (requested, settings) = self.check_create(grants, &req)?;
        let (max_peers, mode) = (settings.max_peers, settings.mode);
        let per_session = self.config.max_rooms_per_session;
        if self
            .created_by
            .get(creator)
            .is_some_and(|n| *n >= per_session)
        {
            return Err(SignalError::new(
                ErrorCode::TooManyRooms,
                format!(
                    "this session created {per_session} rooms that still exist \
                     (max_rooms_per_session): use one of them, or wait until an empty one expires"
                ),
            ));
        }
        // Counted first, given back below if no room is made: the cap holds under concurrency.
        let max = self.config.max_rooms;
        if self.room_count.fetch_add(1, Ordering::SeqCst) >= max {
            self.room_count.fetch_sub(1, Ordering::SeqCst);
            return Err(SignalError::new(
                ErrorCode::TooManyRooms,
                format!("the server holds {max} rooms (max_rooms): try again later"),
            ));
        }
        let made = self.make_room(creator, max_peers, mode, requested);
        if made.is_err() {
            self.room_count.fetch_sub(1, Ordering::SeqCst);
        }
        let room_id = made?;
        Ok(json!({ "roomId": room_id, "maxPeers": max_peers, "mode": mode }))
    }

    /// Insert a room (with `requested` as its id, or a fresh one) on the quietest shard.
    fn make_room(
        &self,
        creator: &str,
        max_peers: u32,
        mode: RoomMode,
        requested: Option<String>,
    ) -> Result<String, SignalError> {
        let shard = self.quietest_shard();
        let room = || Room {
            creator: creator.to_string(),
            shard,
            max_peers,
            mode,
            members: Vec::new(),
            empty_since: Some(Instant::now()),
        };
        let room_id = match requested {
            Some(id) => {
                if !valid_room_id(&id) {
                    return Err(SignalError::new(
                        ErrorCode::BadRequest,
                        "roomId must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'",
                    ));
                }
                match self.rooms.entry(id.clone()) {
                    Entry::Occupied(_) => {
                        return Err(SignalError::new(
                            ErrorCode::RoomExists,
                            format!("room {id:?} already exists"),
                        ));
                    }
                    Entry::Vacant(v) => {
                        v.insert(room());
                    }
                }
                id
            }
            None => loop {
                let id = random_id(10);
                if let Entry::Vacant(v) = self.rooms.entry(id.clone()) {
                    v.insert(room());
                    break id;
                }
            },
        };
        self.metrics.rooms.inc();
        self.shard_load[shard].fetch_add(1, Ordering::Relaxed);
        *self.created_by.entry(creator.to_string()).or_insert(0) += 1;
        Ok(room_id)
    }

    /// The shard with the least rooms and members pinned to it (control path only; O(shards)).
    fn quietest_shard(&self) -> usize {
        (0..self.shard_load.len())
            .min_by_key(|&i| self.shard_load[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// A room is gone: its counts go with it.
    fn forget_room(&self, room: &Room) {
        self.room_count.fetch_sub(1, Ordering::SeqCst);
        self.shard_load[room.shard].fetch_sub(1, Ordering::Relaxed);
        if let dashmap::mapref::entry::Entry::Occupied(mut e) =
            self.created_by.entry(room.creator.clone())
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// The media shard a room is pinned to (0 for an unknown room).
    pub fn room_shard(&self, room_id: &str) -> usize {
        self.rooms.get(room_id).map_or(0, |r| r.shard)
    }

    /// The command queue of a media shard.
    pub fn media(&self, shard: usize) -> &mpsc::Sender<crate::media::Command> {
        &self.media[shard].commands
    }

    /// Tell a media shard that a member left its room or disconnected: never refused (see
    /// [`crate::media::MediaControl`]).
    pub fn media_leave(&self, shard: usize, user_id: &str, join: u64) {
        let _ = self.media[shard]
            .control
            .send(crate::media::Command::Leave {
                user_id: user_id.to_string(),
                join,
            });
    }

    /// Add a member; tells the others. The caller checked it is in no room.
    pub fn join_room(
        &self,
        user_id: &str,
        identity: &str,
        grants: &Grants,
        room_id: &str,
    ) -> Result<Joined, SignalError> {
        if self.is_draining() {
            return Err(SignalError::new(
                ErrorCode::Draining,
                "the server is draining: no new joins",
            ));
        }
        if let Some(allowed) = &grants.room
            && allowed != room_id
        {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                format!("this token is restricted to room {allowed:?}"),
            ));
        }
        let (joined, others) = {
            let Some(mut room) = self.rooms.get_mut(room_id) else {
                return Err(SignalError::new(
                    ErrorCode::RoomNotFound,
                    format!("no room {room_id:?}"),
                ));
            };
            if room.members.len() >= room.max_peers as usize {
                return Err(SignalError::new(
                    ErrorCode::RoomFull,
                    format!("room {room_id:?} is full ({} members)", room.max_peers),
                ));
            }
            let members: Vec<MemberInfo> = room
                .members
                .iter()
                .map(|m| MemberInfo {
                    user_id: m.user_id.clone(),
                    identity: m.identity.clone(),
                    relay_only: m.relay_only,
                })
                .collect();
            let before = room.pairs();
            room.members.push(Member {
                user_id: user_id.to_string(),
                identity: identity.to_string(),
                relay_only: grants.relay_only,
                relay_with: Default::default(),
            });
            self.adjust_pairs(before, room.pairs());
            room.empty_since = None;
            self.shard_load[room.shard].fetch_add(1, Ordering::Relaxed);
            let others: Vec<String> = members.iter().map(|m| m.user_id.clone()).collect();
            (
                Joined {
                    members,
                    max_peers: room.max_peers,
                    mode: room.mode,
                },
                others,
            )
        };
        self.metrics.room_members.inc();
        let mut event = json!({
            "type": "presence", "event": "join", "roomId": room_id,
            "userId": user_id, "identity": identity,
        });
        if grants.relay_only {
            event["relayOnly"] = Value::Bool(true);
        }
        let event: Utf8Bytes = event.to_string().into();
        for other in others {
            self.deliver(&other, &event);
        }
        Ok(joined)
    }

    /// Remove a member and tell the others. `reason` is "left" or "disconnected".
    pub fn leave_room(&self, user_id: &str, room_id: &str, reason: &str) {
        let others: Vec<String> = {
            let Some(mut room) = self.rooms.get_mut(room_id) else {
                return;
            };
            let count = room.members.len();
            let before = room.pairs();
            room.members.retain(|m| m.user_id != user_id);
            if room.members.len() == count {
                return;
            }
            for m in room.members.iter_mut() {
                m.relay_with.remove(user_id);
            }
            self.adjust_pairs(before, room.pairs());
            self.shard_load[room.shard].fetch_sub(1, Ordering::Relaxed);
            if room.members.is_empty() {
                room.empty_since = Some(Instant::now());
            }
            room.members.iter().map(|m| m.user_id.clone()).collect()
        };
        self.metrics.room_members.dec();
        if reason == LEFT_MOVED {
            // Its room moved to another node (a cluster's drain or a lost room): the member
            // joins it there under the same id, so the others are not told it left.
            return;
        }
        let event: Utf8Bytes = json!({
            "type": "presence", "event": "leave", "roomId": room_id,
            "userId": user_id, "reason": reason,
        })
        .to_string()
        .into();
        for other in others {
            self.deliver(&other, &event);
        }
    }

    fn adjust_pairs(&self, before: (i64, i64), after: (i64, i64)) {
        self.metrics.pairs_p2p.add(after.0 - before.0);
        self.metrics.pairs_relay.add(after.1 - before.1);
    }

    /// A client reports how its media with `peer` (every other member when `None`) travels now
    /// (`relayed`) and why. Counts pairs by mode, and pairs that moved to the relay by reason.
    pub fn set_mode(
        &self,
        user_id: &str,
        room_id: &str,
        peer: Option<&str>,
        relayed: bool,
        reason: &str,
    ) -> Result<(), SignalError> {
        let Some(mut room) = self.rooms.get_mut(room_id) else {
            return Err(SignalError::new(ErrorCode::NotInRoom, "not in a room"));
        };
        // A reason must fit the move and what the server knows of the room: a client cannot have
        // fallbacks counted for reasons that do not apply.
        let relay_only = |id: &str| room.members.iter().any(|m| m.user_id == id && m.relay_only);
        let policy = self.config.p2p_max_peers == 0
            || relay_only(user_id)
            || peer.is_some_and(relay_only)
            || (peer.is_none() && room.members.iter().any(|m| m.relay_only));
        let why_not = match (reason, relayed) {
            ("room_shrunk", true) => Some("room_shrunk is a move back to p2p"),
            (
                "room_mode" | "policy" | "room_size" | "p2p_timeout" | "ice_failed" | "p2p_failed",
                false,
            ) => Some("that reason is for a move to the relay"),
            ("room_mode", true) if room.mode != RoomMode::Relay => {
                Some("room_mode applies to rooms created with mode \"relay\" only")
            }
            ("policy", true) if !policy => {
                Some("policy applies when p2pMaxPeers is 0 or a member of the pair has relayOnly")
            }
            _ => None,
        };
        if let Some(why) = why_not {
            return Err(SignalError::new(
                ErrorCode::BadRequest,
                format!("reason {reason:?} does not apply: {why}"),
            ));
        }
        let targets: Vec<String> = match peer {
            Some(p) if p == user_id => {
                return Err(SignalError::new(
                    ErrorCode::BadRequest,
                    "a pair needs another member",
                ));
            }
            Some(p) if !room.members.iter().any(|m| m.user_id == p) => {
                return Err(SignalError::new(
                    ErrorCode::TargetNotFound,
                    format!("{p:?} is not a member of your room"),
                ));
            }
            Some(p) => vec![p.to_string()],
            None => room
                .members
                .iter()
                .filter(|m| m.user_id != user_id)
                .map(|m| m.user_id.clone())
                .collect(),
        };
        let before = room.pairs();
        for t in targets {
            let was = room.pair_relayed(user_id, &t);
            let Some(m) = room.members.iter_mut().find(|m| m.user_id == user_id) else {
                return Ok(());
            };
            if relayed {
                m.relay_with.insert(t.clone());
            } else {
                m.relay_with.remove(&t);
            }
            if relayed && !was {
                self.metrics.fallbacks.with_label_values(&[reason]).inc();
                info!(room = %room_id, a = %user_id, b = %t, %reason, "pair moved to the relay");
            } else if !relayed && was && !room.pair_relayed(user_id, &t) {
                info!(room = %room_id, a = %user_id, b = %t, %reason, "pair back to P2P");
            }
        }
        self.adjust_pairs(before, room.pairs());
        Ok(())
    }

    /// Whether `user_id` is a member of `room_id`.
    pub fn is_member(&self, room_id: &str, user_id: &str) -> bool {
        self.rooms
            .get(room_id)
            .is_some_and(|r| r.members.iter().any(|m| m.user_id == user_id))
    }

    /// The members of a room (user ids).
    pub fn room_members(&self, room_id: &str) -> Vec<String> {
        self.rooms
            .get(room_id)
            .map(|r| r.members.iter().map(|m| m.user_id.clone()).collect())
            .unwrap_or_default()
    }

    /// Relay a P2P signaling message from `from` to `to`, both in `room_id`. `event` is the
    /// complete event object; `from` is set here so that it cannot be spoofed.
    pub fn relay(
        &self,
        from: &str,
        room_id: &str,
        to: &str,
        mut event: serde_json::Map<String, Value>,
    ) -> Result<(), SignalError> {
        if to == from {
            return Err(SignalError::new(
                ErrorCode::TargetNotFound,
                "cannot signal yourself",
            ));
        }
        if !self.is_member(room_id, to) {
            return Err(SignalError::new(
                ErrorCode::TargetNotFound,
                format!("{to:?} is not a member of your room"),
            ));
        }
        event.insert("from".into(), Value::String(from.to_string()));
        let text: Utf8Bytes = Value::Object(event).to_string().into();
        self.deliver(to, &text);
        Ok(())
    }

    /// Delete rooms empty for longer than `empty_room_ttl`. Returns how many went.
    pub fn reap_rooms(&self, now: Instant) -> usize {
        let ttl = self.config.empty_room_ttl;
        let mut deleted = Vec::new();
        self.rooms.retain(|id, r| {
            let expired = r.members.is_empty()
                && r.empty_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= ttl);
            if expired {
                self.forget_room(r);
                deleted.push(id.clone());
            }
            !expired
        });
        let gone = deleted.len();
        self.metrics.rooms.sub(gone as i64);
        self.directory().rooms_deleted(deleted);
        gone
    }

    /// Run [`Hub::reap_rooms`] periodically until shutdown.
    pub async fn reaper(self: Arc<Self>) {
        let period = (self.config.empty_room_ttl / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.reap_rooms(Instant::now()); }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

impl crate::media::ClientSink for Hub {
    fn send_to(&self, user_id: &str, message: Value) {
        self.send_event(user_id, message.to_string().into());
    }

    fn send_to_room(&self, room_id: &str, except: &str, message: Value) {
        if message["type"] == "track" {
            self.note_track(room_id, &message);
        }
        let text: Utf8Bytes = message.to_string().into();
        for m in self.room_members(room_id) {
            if m != except {
                self.send_event(&m, text.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<Hub> {
        hub_with(Config::default(), 1)
    }

    fn hub_with(cfg: Config, shards: usize) -> Arc<Hub> {
        Hub::new(
            Arc::new(cfg),
            Arc::new(Metrics::new()),
            Vec::new(),
            (0..shards)
                .map(|_| crate::media::MediaControl {
                    commands: mpsc::channel(1).0,
                    control: mpsc::unbounded_channel().0,
                })
                .collect(),
        )
    }

    fn create(h: &Hub, creator: &str) -> Result<String, ErrorCode> {
        h.create_room(creator, &Grants::default(), CreateRoom::default())
            .map(|v| v["roomId"].as_str().unwrap().to_string())
            .map_err(|e| e.code)
    }

    #[test]
    fn rooms_are_capped_in_total_and_per_session_until_they_expire() {
        let h = hub_with(
            Config {
                max_rooms: 4,
                max_rooms_per_session: 2,
                ..Config::default()
            },
            1,
        );
        create(&h, "a").unwrap();
        create(&h, "a").unwrap();
        assert_eq!(create(&h, "a"), Err(ErrorCode::TooManyRooms), "per session");
        create(&h, "b").unwrap();
        create(&h, "c").unwrap();
        assert_eq!(create(&h, "d"), Err(ErrorCode::TooManyRooms), "in total");
        // Expired, they count no more.
        assert_eq!(h.reap_rooms(Instant::now() + Duration::from_secs(301)), 4);
        let named = |id: &str| {
            h.create_room(
                "e",
                &Grants::default(),
                CreateRoom {
                    room_id: Some(id.into()),
                    ..CreateRoom::default()
                },
            )
            .map_err(|e| e.code)
        };
        named("x").unwrap();
        // A create refused for a taken id gives its place back.
        assert_eq!(named("x").map(|_| ()), Err(ErrorCode::RoomExists));
        create(&h, "a").unwrap();
        create(&h, "a").unwrap();
        create(&h, "d").unwrap();
        assert_eq!(create(&h, "f"), Err(ErrorCode::TooManyRooms));
    }

    #[test]
    fn new_rooms_go_to_the_shard_with_the_least_rooms_and_members() {
        let h = hub_with(Config::default(), 2);
        let r1 = create(&h, "a").unwrap();
        let r2 = create(&h, "a").unwrap();
        assert_ne!(h.room_shard(&r1), h.room_shard(&r2));
        // Two members in r1's shard: the next two rooms go to the other one... then balance.
        h.join_room("u1", "u1", &Grants::default(), &r1).unwrap();
        h.join_room("u2", "u2", &Grants::default(), &r1).unwrap();
        let r3 = create(&h, "b").unwrap();
        assert_eq!(h.room_shard(&r3), h.room_shard(&r2));
        h.leave_room("u1", &r1, "left");
        h.leave_room("u2", &r1, "left");
        let r4 = create(&h, "b").unwrap();
        assert_eq!(h.room_shard(&r4), h.room_shard(&r1));
    }

    #[test]
    fn empty_rooms_are_reaped_after_ttl_only() {
        let h = hub();
        let r = h
            .create_room("u-test", &Grants::default(), CreateRoom::default())
            .unwrap();
        let id = r["roomId"].as_str().unwrap().to_string();
        let now = Instant::now();
        assert_eq!(h.reap_rooms(now), 0);
        assert_eq!(h.reap_rooms(now + Duration::from_secs(301)), 1);
        assert_eq!(h.metrics.rooms.get(), 0);
        assert!(h.join_room("u", "a", &Grants::default(), &id).is_err());
    }

    #[test]
    fn rooms_with_members_are_kept() {
        let h = hub();
        let r = h
            .create_room("u-test", &Grants::default(), CreateRoom::default())
            .unwrap();
        let id = r["roomId"].as_str().unwrap();
        h.join_room("u", "a", &Grants::default(), id).unwrap();
        assert_eq!(h.reap_rooms(Instant::now() + Duration::from_secs(3600)), 0);
        h.leave_room("u", id, "left");
        assert_eq!(h.metrics.room_members.get(), 0);
        assert_eq!(h.reap_rooms(Instant::now() + Duration::from_secs(301)), 1);
    }

    #[test]
    fn connection_slots_are_capped_and_returned() {
        let cfg = Config {
            max_connections: 1,
            max_pending_connections: 3,
            max_pending_per_ip: 2,
            ..Config::default()
        };
        let h = hub_with(cfg, 1);
        let (ip1, ip2): (std::net::IpAddr, std::net::IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let mut a = h.try_connect(ip1).unwrap();
        let b = h.try_connect(ip1).unwrap();
        assert_eq!(h.try_connect(ip1).err(), Some(Refused::PendingPerIp));
        let mut c = h.try_connect(ip2).unwrap();
        assert_eq!(h.try_connect(ip2).err(), Some(Refused::Pending));
        // A session leaves the pending count; sessions have their own cap.
        assert!(a.promote());
        assert!(!c.promote(), "max_connections sessions are open");
        assert!(h.try_connect(ip1).is_ok(), "a's pending place is free");
        drop(a);
        assert!(c.promote());
        drop((b, c));
        assert_eq!(h.connection_count(), 0);
        assert!(h.pending_by_ip.is_empty());
    }
}
