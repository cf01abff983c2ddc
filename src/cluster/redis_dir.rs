//! The directory in Redis: the registry of nodes and the fenced room -> owner map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use redis::aio::ConnectionManager;
use redis::{Client, Script};
use tracing::{info, warn};

use super::{Located, NodeInfo, Placed, RoomSettings, Unavailable, scripts};
use crate::config::ClusterConfig;
use crate::signal::protocol::RoomMode;

/// Longest wait for one Redis operation: past it the directory counts as unreachable.
const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// A room's key lives this long without its owner's renewal (a dead owner's rooms can be taken
/// over meanwhile; then they are gone).
const ROOM_KEY_TTL: Duration = Duration::from_secs(300);

/// Cluster health and the directory's cost, in the server's registry.
pub struct ClusterMetrics {
    pub nodes: IntGauge,
    pub redis_up: IntGauge,
    pub rooms_owned: IntGauge,
    pub ops: HistogramVec,
    pub op_errors: IntCounterVec,
    /// Member sessions here whose room is on another node / sessions here of members whose
    /// WebSocket is on another node.
    pub links: prometheus::IntGaugeVec,
    pub forwarded: IntCounterVec,
    pub takeovers: IntCounter,
    pub rooms_lost: IntCounter,
}

/// The directory's operations, as `ferry_cluster_directory_seconds{op}` names them.
pub const OPS: [&str; 7] = [
    "locate",
    "claim",
    "release",
    "handoff",
    "heartbeat",
    "check",
    "leave",
];

impl ClusterMetrics {
    /// Registered in `registry`, every label value present from the start.
    pub fn new(registry: &prometheus::Registry) -> ClusterMetrics {
        let m = ClusterMetrics {
            nodes: IntGauge::new(
                "ferry_cluster_nodes",
                "Live nodes in the cluster's registry (this one included), as last read",
            )
            .unwrap(),
            redis_up: IntGauge::new(
                "ferry_cluster_redis_up",
                "1 when the last directory operation reached Redis, else 0",
            )
            .unwrap(),
            rooms_owned: IntGauge::new(
                "ferry_cluster_rooms_owned",
                "Rooms this node owns in the cluster directory",
            )
            .unwrap(),
            ops: HistogramVec::new(
                HistogramOpts::new(
                    "ferry_cluster_directory_seconds",
                    "Time of directory operations in Redis, by operation",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
                &["op"],
            )
            .unwrap(),
            op_errors: IntCounterVec::new(
                Opts::new(
                    "ferry_cluster_directory_errors_total",
                    "Directory operations that failed (Redis unreachable or too slow), by operation",
                ),
                &["op"],
            )
            .unwrap(),
            links: prometheus::IntGaugeVec::new(
                Opts::new(
                    "ferry_cluster_links",
                    "Member links between nodes: out = members here whose room is on another \
                     node, in = members of rooms here whose WebSocket is on another node",
                ),
                &["direction"],
            )
            .unwrap(),
            forwarded: IntCounterVec::new(
                Opts::new(
                    "ferry_cluster_forwarded_messages_total",
                    "Signaling messages carried over member links: to_owner, from_owner",
                ),
                &["direction"],
            )
            .unwrap(),
            takeovers: IntCounter::new(
                "ferry_cluster_room_takeovers_total",
                "Rooms this node took over from a dead (or draining) owner",
            )
            .unwrap(),
            rooms_lost: IntCounter::new(
                "ferry_cluster_rooms_lost_total",
                "Rooms this node found owned by another (after a partition): their members moved",
            )
            .unwrap(),
        };
        for c in [
            Box::new(m.nodes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.redis_up.clone()),
            Box::new(m.rooms_owned.clone()),
            Box::new(m.ops.clone()),
            Box::new(m.op_errors.clone()),
            Box::new(m.links.clone()),
            Box::new(m.forwarded.clone()),
            Box::new(m.takeovers.clone()),
            Box::new(m.rooms_lost.clone()),
        ] {
            registry.register(c).expect("cluster metrics register once");
        }
        for op in OPS {
            m.ops.with_label_values(&[op]);
            m.op_errors.with_label_values(&[op]);
        }
        for d in ["in", "out"] {
            m.links.with_label_values(&[d]);
        }
        for d in ["to_owner", "from_owner"] {
            m.forwarded.with_label_values(&[d]);
        }
        m
    }
}

pub struct RedisDirectory {
    pub config: ClusterConfig,
    prefix: String,
    conn: ConnectionManager,
    /// Rooms this node owns, at their epoch.
    owned: Mutex<HashMap<String, (u64, RoomSettings)>>,
    /// The live nodes as the last heartbeat read them (this one included).
    nodes: RwLock<Vec<NodeInfo>>,
    /// This node's entry (its load is refreshed before every heartbeat).
    me: Mutex<NodeInfo>,
    up: AtomicBool,
    locate: Script,
    claim: Script,
    release: Script,
    handoff: Script,
    check: Script,
    heartbeat: Script,
    leave: Script,
    pub metrics: std::sync::Arc<ClusterMetrics>,
}

impl RedisDirectory {
    /// Connects lazily: a node starts (and serves its own rooms) while Redis is away.
    pub fn new(
        config: ClusterConfig,
        media: Vec<String>,
        registry: &prometheus::Registry,
    ) -> Result<RedisDirectory, String> {
        let client = Client::open(config.redis_url.as_str())
            .map_err(|e| format!("redis_url {:?}: {e}", config.redis_url))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| format!("redis_url {:?}: {e}", config.redis_url))?;
        let me = NodeInfo {
            id: config.node_id.clone(),
            http: config.node_address.clone(),
            media,
            members: 0,
            relayed: 0,
            cpu: 0.0,
            draining: false,
        };
        Ok(RedisDirectory {
            prefix: format!("ferry:{}:", config.name),
            config,
            conn,
            owned: Mutex::new(HashMap::new()),
            nodes: RwLock::new(vec![me.clone()]),
            me: Mutex::new(me),
            up: AtomicBool::new(false),
            locate: Script::new(scripts::LOCATE),
            claim: Script::new(scripts::CLAIM),
            release: Script::new(scripts::RELEASE),
            handoff: Script::new(scripts::HANDOFF),
            check: Script::new(scripts::CHECK),
            heartbeat: Script::new(scripts::HEARTBEAT),
            leave: Script::new(scripts::LEAVE),
            metrics: std::sync::Arc::new(ClusterMetrics::new(registry)),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The live nodes as last read.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.read().unwrap().clone()
    }

    pub fn owns(&self, room: &str) -> bool {
        self.owned.lock().unwrap().contains_key(room)
    }

    fn room_key(&self, room: &str) -> String {
        format!("{}room:{room}", self.prefix)
    }

    fn node_prefix(&self) -> String {
        format!("{}node:", self.prefix)
    }

    /// Run one operation with a deadline, timing it and noting whether Redis answered.
    async fn op<T>(
        &self,
        name: &str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        let timer = self.metrics.ops.with_label_values(&[name]).start_timer();
        let result = match tokio::time::timeout(OP_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unavailable(format!("redis: {e}"))),
            Err(_) => Err(Unavailable(format!(
                "redis did not answer within {} ms",
                OP_TIMEOUT.as_millis()
            ))),
        };
        match &result {
            Ok(_) => {
                timer.observe_duration();
                if !self.up.swap(true, Ordering::AcqRel) {
                    info!("cluster directory reachable");
                }
                self.metrics.redis_up.set(1);
            }
            Err(e) => {
                timer.stop_and_discard();
                self.metrics.op_errors.with_label_values(&[name]).inc();
                if self.up.swap(false, Ordering::AcqRel) {
                    warn!(error = %e, "cluster directory unreachable");
                }
                self.metrics.redis_up.set(0);
            }
        }
        result
    }

    pub async fn locate(&self, room: &str) -> Result<Located, Unavailable> {
        if self.owns(room) {
            return Ok(Located::Here(None));
        }
        let mut conn = self.conn.clone();
        let found: Option<Vec<String>> = self
            .op(
                "locate",
                self.locate
                    .key(self.room_key(room))
                    .arg(self.node_id())
                    .arg(self.node_prefix())
                    .arg(ROOM_KEY_TTL.as_millis() as u64)
                    .invoke_async(&mut conn),
            )
            .await?;
        let Some(f) = found else {
            return Ok(Located::Nowhere);
        };
        let [owner, epoch, max_peers, mode, info, taken] = &f[..] else {
            return Err(Unavailable(format!("unexpected answer from locate: {f:?}")));
        };
        let settings = RoomSettings {
            max_peers: max_peers.parse().unwrap_or(2),
            mode: if mode == "relay" {
                RoomMode::Relay
            } else {
                RoomMode::Auto
            },
        };
        if owner == self.node_id() {
            let epoch = epoch.parse().unwrap_or(0);
            if taken == "1" {
                self.metrics.takeovers.inc();
                info!(
                    room,
                    epoch, "took the room over (its owner is gone or let it go)"
                );
            }
            self.owned
                .lock()
                .unwrap()
                .insert(room.to_string(), (epoch, settings));
            self.metrics.rooms_owned.inc();
            return Ok(Located::Here(Some(settings)));
        }
        match serde_json::from_str::<NodeInfo>(info) {
            Ok(node) => Ok(Located::There(node)),
            Err(e) => Err(Unavailable(format!(
                "bad registry entry of node {owner}: {e}"
            ))),
        }
    }

    pub async fn place(
        &self,
        room: &str,
        settings: RoomSettings,
        here: bool,
    ) -> Result<Placed, Unavailable> {
        let me = self.me.lock().unwrap().clone();
        let nodes = self.nodes();
        let target = super::place(&me, &nodes).clone();
        if target.id != me.id && !here {
            // The other node claims it when the request reaches it.
            return Ok(Placed::There(target));
        }
        let mut conn = self.conn.clone();
        let mode = mode_name(settings.mode);
        let claimed: i64 = self
            .op(
                "claim",
                self.claim
                    .key(self.room_key(room))
                    .arg(self.node_id())
                    .arg(settings.max_peers)
                    .arg(mode)
                    .arg(ROOM_KEY_TTL.as_millis() as u64)
                    .invoke_async(&mut conn),
            )
            .await?;
        if claimed == 0 {
            return Ok(Placed::Exists);
        }
        self.owned
            .lock()
            .unwrap()
            .insert(room.to_string(), (1, settings));
        self.metrics.rooms_owned.inc();
        Ok(Placed::Here)
    }

    /// The room is gone here: its entry goes too (if this node still owns it).
    pub async fn release(&self, room: &str) {
        let Some((epoch, _)) = self.owned.lock().unwrap().remove(room) else {
            return;
        };
        self.metrics.rooms_owned.dec();
        let mut conn = self.conn.clone();
        let r: Result<i64, _> = self
            .op(
                "release",
                self.release
                    .key(self.room_key(room))
                    .arg(self.node_id())
                    .arg(epoch)
                    .invoke_async(&mut conn),
            )
            .await;
        if let Err(e) = r {
            // Its key expires by itself (ROOM_KEY_TTL) or is taken over.
            warn!(room, error = %e, "could not delete a room's directory entry");
        }
    }

    /// Give every room this node owns to `heir` ("" when there is none: the first node a member
    /// reaches takes it). Returns the rooms given away.
    pub async fn hand_off_all(&self, heir: &str) -> Vec<String> {
        let owned: Vec<(String, (u64, RoomSettings))> =
            self.owned.lock().unwrap().drain().collect();
        self.metrics.rooms_owned.set(0);
        let mut given = Vec::new();
        for (room, (epoch, _)) in owned {
            let mut conn = self.conn.clone();
            let r: Result<i64, _> = self
                .op(
                    "handoff",
                    self.handoff
                        .key(self.room_key(&room))
                        .arg(self.node_id())
                        .arg(epoch)
                        .arg(heir)
                        .invoke_async(&mut conn),
                )
                .await;
            if let Err(e) = r {
                warn!(room, error = %e, "could not hand a room off: it is taken over when this node's entry expires");
            }
            given.push(room);
        }
        given
    }

    /// Publish this node's entry with its load, read the others', and check the rooms it owns.
    /// Returns the rooms it lost (another node owns them now).
    pub async fn beat(&self, members: u64, relayed: u64, cpu: f64, draining: bool) -> Vec<String> {
        let me = {
            let mut me = self.me.lock().unwrap();
            me.members = members;
            me.relayed = relayed;
            me.cpu = cpu;
            me.draining = draining;
            me.clone()
        };
        let entry = serde_json::to_string(&me).expect("a node entry serializes");
        let mut conn = self.conn.clone();
        let ttl = self.config.node_ttl.as_millis() as u64;
        let nodes: Result<Vec<String>, _> = self
            .op(
                "heartbeat",
                self.heartbeat
                    .key(format!("{}{}", self.node_prefix(), me.id))
                    .key(format!("{}nodes", self.prefix))
                    .arg(entry)
                    .arg(&me.id)
                    .arg(ttl)
                    .arg(self.node_prefix())
                    .invoke_async(&mut conn),
            )
            .await;
        let Ok(nodes) = nodes else {
            return Vec::new();
        };
        let nodes: Vec<NodeInfo> = nodes
            .iter()
            .filter_map(|n| serde_json::from_str(n).ok())
            .collect();
        self.metrics.nodes.set(nodes.len() as i64);
        *self.nodes.write().unwrap() = nodes;
        self.check_rooms().await
    }

    /// Renew the entries of the rooms this node owns; those another node took are dropped here.
    async fn check_rooms(&self) -> Vec<String> {
        let owned: Vec<(String, (u64, RoomSettings))> = self
            .owned
            .lock()
            .unwrap()
            .iter()
            .map(|(r, e)| (r.clone(), *e))
            .collect();
        let mut lost = Vec::new();
        for chunk in owned.chunks(500) {
            let mut inv = self.check.prepare_invoke();
            inv.arg(self.node_id()).arg(ROOM_KEY_TTL.as_millis() as u64);
            for (room, (epoch, settings)) in chunk {
                inv.key(self.room_key(room))
                    .arg(*epoch)
                    .arg(settings.max_peers)
                    .arg(mode_name(settings.mode));
            }
            let mut conn = self.conn.clone();
            let Ok(gone): Result<Vec<usize>, _> =
                self.op("check", inv.invoke_async(&mut conn)).await
            else {
                return lost;
            };
            for i in gone {
                if let Some((room, _)) = chunk.get(i - 1) {
                    lost.push(room.clone());
                }
            }
        }
        if !lost.is_empty() {
            let mut owned = self.owned.lock().unwrap();
            for room in &lost {
                owned.remove(room);
            }
            self.metrics.rooms_owned.set(owned.len() as i64);
            self.metrics.rooms_lost.inc_by(lost.len() as u64);
        }
        lost
    }

    /// This node stops: its entry goes at once (not after `node_ttl`).
    pub async fn leave(&self) {
        let mut conn = self.conn.clone();
        let _: Result<i64, _> = self
            .op(
                "leave",
                self.leave
                    .key(format!("{}{}", self.node_prefix(), self.node_id()))
                    .key(format!("{}nodes", self.prefix))
                    .arg(self.node_id())
                    .invoke_async(&mut conn),
            )
            .await;
    }
}

fn mode_name(mode: RoomMode) -> &'static str {
    match mode {
        RoomMode::Relay => "relay",
        RoomMode::Auto => "auto",
    }
}
