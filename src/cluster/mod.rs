//! Several nodes as one service: where a room lives, and how a member on another node reaches it.
//!
//! The [`Directory`] answers "which node owns this room". With one node ([`Directory::Local`],
//! the default) every room is here, as it always was. With `redis_url` ([`Directory::Redis`])
//! the nodes share a Redis:
//! - a **node registry**: each node writes its entry (id, HTTP address for the other nodes, media
//!   addresses, load) with an expiry of `node_ttl` and refreshes it three times per `node_ttl`; a
//!   node that dies drops out by itself;
//! - a **room directory**: `room -> {owner, epoch, maxPeers, mode}`. Every change of owner is a
//!   Lua script that checks the owner and the epoch atomically and bumps the epoch, so two nodes
//!   never both hold a room: a node that was cut off and comes back finds a newer epoch at its
//!   next check and lets the room go (its members reconnect to the new owner).
//!
//! Nothing per media packet or per signaling message touches Redis: only joins, room creation,
//! and the heartbeat. A member whose WebSocket lands on a node that does not own its room is
//! carried there by a [`link`]: a WebSocket from that node to the owner, on which the owner runs
//! the member's session as if it were local.

pub mod link;
mod redis_dir;
mod scripts;
pub mod token;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::signal::protocol::{ErrorCode, RoomMode, SignalError};

pub use redis_dir::{ClusterMetrics, RedisDirectory};

/// What one node tells the others about itself (its registry entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub id: String,
    /// Base URL of its HTTP port, as the other nodes reach it.
    pub http: String,
    /// The media addresses it announces to clients.
    #[serde(default)]
    pub media: Vec<String>,
    /// Signaling sessions on it.
    #[serde(default)]
    pub members: u64,
    /// Members with a relay connection to it.
    #[serde(default)]
    pub relayed: u64,
    /// Its process's CPU use over the last heartbeat, in percent of one core.
    #[serde(default)]
    pub cpu: f64,
    #[serde(default)]
    pub draining: bool,
}

impl NodeInfo {
    /// One number to compare nodes by: a relayed member costs the relay's media work on top of
    /// its session, and CPU counts where it is high.
    pub fn load(&self) -> f64 {
        self.members as f64 + 4.0 * self.relayed as f64 + self.cpu
    }
}

/// Where a new room goes: the node the creator reached, unless another live node that is not
/// draining is much less busy (less than half the load, and by more than 20 units).
pub fn place<'a>(me: &'a NodeInfo, nodes: &'a [NodeInfo]) -> &'a NodeInfo {
    let quietest = nodes
        .iter()
        .filter(|n| !n.draining && n.id != me.id)
        .min_by(|a, b| a.load().total_cmp(&b.load()));
    match quietest {
        Some(q) if me.draining => q,
        Some(q) if q.load() * 2.0 < me.load() && me.load() - q.load() > 20.0 => q,
        _ => me,
    }
}

/// Where a room's ownership goes when its node drains: the least busy other live node, if any.
pub fn heir<'a>(me: &str, nodes: &'a [NodeInfo]) -> Option<&'a NodeInfo> {
    nodes
        .iter()
        .filter(|n| !n.draining && n.id != me)
        .min_by(|a, b| a.load().total_cmp(&b.load()))
}

/// A room's settings, kept in the directory so that a node taking it over makes it again alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSettings {
    pub max_peers: u32,
    pub mode: RoomMode,
}

/// The answer to "where is this room".
#[derive(Debug, Clone, PartialEq)]
pub enum Located {
    /// This node owns it (`settings` when it just took it over, or owns it in the directory but
    /// does not hold it: the room must be made here with them).
    Here(Option<RoomSettings>),
    /// Another live node owns it.
    There(NodeInfo),
    /// No such room in the cluster.
    Nowhere,
}

/// Where `createRoom` makes a room.
#[derive(Debug, Clone, PartialEq)]
pub enum Placed {
    /// Here: the room id is claimed for this node.
    Here,
    /// On another, less busy node: the request goes there.
    There(NodeInfo),
    /// The id is taken in the cluster.
    Exists,
}

/// The directory could not answer (Redis unreachable or too slow).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

impl From<Unavailable> for SignalError {
    fn from(e: Unavailable) -> SignalError {
        SignalError::new(
            ErrorCode::ClusterUnavailable,
            format!(
                "the cluster directory cannot be reached ({}): calls in progress go on; try again",
                e.0
            ),
        )
    }
}

/// Which node owns which room.
#[derive(Clone, Default)]
pub enum Directory {
    /// One node: every room is here.
    #[default]
    Local,
    /// Nodes sharing a Redis.
    Redis(Arc<RedisDirectory>),
}

impl Directory {
    pub fn cluster(&self) -> Option<&Arc<RedisDirectory>> {
        match self {
            Directory::Local => None,
            Directory::Redis(r) => Some(r),
        }
    }

    /// Where `room` lives (taking it over when its owner is gone). `held`: this node holds a
    /// room of that id right now.
    pub async fn locate(&self, room: &str, held: bool) -> Result<Located, Unavailable> {
        match self {
            Directory::Local => Ok(if held {
                Located::Here(None)
            } else {
                Located::Nowhere
            }),
            Directory::Redis(r) => r.locate(room).await,
        }
    }

    /// Where a new room `room` with `settings` is made (`here`: on this node, placed already
    /// by the node the request came through).
    pub async fn place(
        &self,
        room: &str,
        settings: RoomSettings,
        here: bool,
    ) -> Result<Placed, Unavailable> {
        match self {
            Directory::Local => Ok(Placed::Here),
            Directory::Redis(r) => r.place(room, settings, here).await,
        }
    }

    /// A room this node claimed was not made after all (refused by the hub).
    pub async fn unclaim(&self, room: &str) {
        if let Directory::Redis(r) = self {
            r.release(room).await;
        }
    }

    /// Rooms deleted here (empty past `empty_room_ttl`): their directory entries go.
    pub fn rooms_deleted(&self, rooms: Vec<String>) {
        if let Directory::Redis(r) = self
            && !rooms.is_empty()
        {
            let r = r.clone();
            tokio::spawn(async move {
                for room in rooms {
                    r.release(&room).await;
                }
            });
        }
    }
}

/// The node's heartbeat, until the server stops: every third of `node_ttl` its entry (with its
/// load) is written, the others' read, and the rooms it owns checked; a room found owned by
/// another node (after a partition healed) has its members here closed with 1012 so that they
/// join it on its owner.
pub async fn heartbeat(hub: Arc<crate::signal::hub::Hub>, dir: Arc<RedisDirectory>) {
    let period = dir.config.node_ttl / 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cpu = CpuMeter::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.shutdown.cancelled() => return,
        }
        let lost = beat(&hub, &dir, cpu.percent()).await;
        for room in lost {
            tracing::warn!(
                room,
                "another node owns this room now: its members here move there"
            );
            hub.evict_room(&room);
        }
    }
}

async fn beat(hub: &crate::signal::hub::Hub, dir: &RedisDirectory, cpu: f64) -> Vec<String> {
    let members = hub.session_count() as u64;
    let relayed = hub.metrics.relay_connections.get().max(0) as u64;
    dir.beat(members, relayed, cpu, hub.is_draining()).await
}

/// A draining node of a cluster: it tells the others it drains, gives its rooms to the least
/// busy other node, and closes every session here with 1012 so that the members reconnect
/// elsewhere (this node refuses new connections meanwhile).
pub async fn drain(hub: &crate::signal::hub::Hub, dir: &RedisDirectory) {
    beat(hub, dir, 0.0).await;
    let heir = heir(dir.node_id(), &dir.nodes())
        .map(|n| n.id.clone())
        .unwrap_or_default();
    let given = dir.hand_off_all(&heir).await;
    tracing::info!(
        rooms = given.len(),
        heir = %if heir.is_empty() { "(the first node a member reaches)" } else { heir.as_str() },
        "drain: rooms handed off"
    );
    hub.evict_all();
}

/// This process's CPU time between two readings, in percent of one core (Linux; 0 elsewhere).
struct CpuMeter {
    last: Option<(std::time::Instant, f64)>,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        CpuMeter { last: None }
    }

    fn seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (hz > 0.0).then(|| ticks / hz)
    }

    fn percent(&mut self) -> f64 {
        let Some(now) = Self::seconds() else {
            return 0.0;
        };
        let at = std::time::Instant::now();
        let p = match self.last {
            Some((t, s)) => {
                let wall = at.duration_since(t).as_secs_f64();
                if wall > 0.0 {
                    100.0 * (now - s) / wall
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((at, now));
        (p * 10.0).round() / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, members: u64, relayed: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            http: format!("http://{id}:8080"),
            media: vec![],
            members,
            relayed,
            cpu: 0.0,
            draining: false,
        }
    }

    #[test]
    fn a_room_stays_on_the_node_the_creator_reached_unless_it_is_much_busier() {
        let me = node("a", 30, 0);
        let nodes = vec![me.clone(), node("b", 20, 0), node("c", 25, 0)];
        assert_eq!(place(&me, &nodes).id, "a", "a little busier is not enough");
        let me = node("a", 100, 0);
        let nodes = vec![me.clone(), node("b", 20, 0), node("c", 10, 0)];
        assert_eq!(place(&me, &nodes).id, "c", "the quietest of the others");
        // Half the load but within 20 units: not worth a hop.
        let me = node("a", 12, 0);
        let nodes = vec![me.clone(), node("b", 2, 0)];
        assert_eq!(place(&me, &nodes).id, "a");
        // Relayed members weigh more than P2P ones.
        let me = node("a", 20, 20);
        let nodes = vec![me.clone(), node("b", 40, 0)];
        assert_eq!(place(&me, &nodes).id, "b");
    }

    #[test]
    fn draining_nodes_get_no_rooms_and_a_draining_node_gives_its_away() {
        let me = node("a", 100, 0);
        let mut b = node("b", 0, 0);
        b.draining = true;
        let nodes = vec![me.clone(), b.clone()];
        assert_eq!(place(&me, &nodes).id, "a");
        assert!(heir("a", &nodes).is_none());
        let mut me = node("a", 0, 0);
        me.draining = true;
        let nodes = vec![me.clone(), node("b", 50, 0), node("c", 40, 0)];
        assert_eq!(place(&me, &nodes).id, "c");
        assert_eq!(heir("a", &nodes).map(|n| n.id.as_str()), Some("c"));
        // Alone and draining: nowhere else to go.
        assert_eq!(place(&me, std::slice::from_ref(&me)).id, "a");
    }

    #[test]
    fn node_entries_read_back_with_defaults_for_missing_fields() {
        let n: NodeInfo =
            serde_json::from_str(r#"{"id":"n1","http":"http://10.0.0.1:8080"}"#).expect("parses");
        assert_eq!(n.members, 0);
        assert!(!n.draining);
        let back: NodeInfo =
            serde_json::from_str(&serde_json::to_string(&node("x", 3, 1)).unwrap()).unwrap();
        assert_eq!(back, node("x", 3, 1));
    }
}
