//! Configuration: command-line flags, `FERRY_*` environment variables and an optional TOML file,
//! merged in that order of precedence and validated once into [`Config`].
//!
//! The raw layers ([`ServeArgs`], [`FileConfig`]) stay close to what the user typed; [`Config`] is
//! what the rest of the program uses and holds only valid values.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use serde::{Deserialize, Serialize};

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

/// The names `srtp_profiles` takes, and the profiles they stand for.
pub const SRTP_PROFILE_NAMES: [(&str, SrtpProtectionProfile); 3] = [
    ("aes128-gcm", SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm),
    ("aes256-gcm", SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm),
    (
        "aes128-cm-sha1-80",
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
    ),
];

/// `srtp_profiles` names, in order, duplicates dropped; an unknown name or none is an error.
pub fn parse_srtp_profiles(names: &[String]) -> Result<Vec<SrtpProtectionProfile>, ConfigError> {
    let mut out = Vec::new();
    for name in names {
        let name = name.trim().to_ascii_lowercase();
        let Some((_, p)) = SRTP_PROFILE_NAMES.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = SRTP_PROFILE_NAMES.iter().map(|(n, _)| *n).collect();
            return Err(invalid(
                "srtp_profiles",
                format!("unknown profile {name:?} (known: {})", known.join(", ")),
            ));
        };
        if !out.contains(p) {
            out.push(*p);
        }
    }
    if out.is_empty() {
        return Err(invalid("srtp_profiles", "name at least one profile"));
    }
    Ok(out)
}

fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

/// Flags and environment variables shared by `ferry serve` and `ferry token`.
/// Every field is optional so that a value from the config file can fill it.
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP/WebSocket listen address.
    #[arg(long, env = "FERRY_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Serve /metrics on this address instead of the HTTP port.
    #[arg(long, env = "FERRY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// UDP media port address (STUN, and the relay's media).
    #[arg(long, env = "FERRY_MEDIA_LISTEN")]
    pub media_listen: Option<String>,
    /// Media shards: one thread, core and UDP port each (ports media_listen's port, +1, ...);
    /// 0 = one per CPU.
    #[arg(long, env = "FERRY_MEDIA_SHARDS")]
    pub media_shards: Option<usize>,
    /// Public IP addresses to advertise for the media port, comma-separated (NAT, load balancer).
    #[arg(long, env = "FERRY_ANNOUNCE", value_delimiter = ',')]
    pub announce: Option<Vec<String>>,
    /// API key: the `kid` of access tokens.
    #[arg(long, env = "FERRY_API_KEY")]
    pub api_key: Option<String>,
    /// API secret that signs access tokens (HS256). Without it the server runs in dev mode.
    #[arg(long, env = "FERRY_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
    /// Rooms larger than this go through the relay (0 = always relay).
    #[arg(long, env = "FERRY_P2P_MAX_PEERS")]
    pub p2p_max_peers: Option<u32>,
    /// Time a P2P connection has to connect before the pair falls back to relay (e.g. "5s").
    #[arg(long, env = "FERRY_P2P_TIMEOUT")]
    pub p2p_timeout: Option<String>,
    /// Most members a room may hold (the cap for a room's own maxPeers).
    #[arg(long, env = "FERRY_MAX_ROOM_PEERS")]
    pub max_room_peers: Option<u32>,
    /// Most simultaneous WebSocket connections.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Largest signaling message accepted, in bytes.
    #[arg(long, env = "FERRY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Sustained messages per second allowed per connection.
    #[arg(long, env = "FERRY_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Burst of messages allowed per connection above the sustained rate.
    #[arg(long, env = "FERRY_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Interval of the server's WebSocket pings (e.g. "10s").
    #[arg(long, env = "FERRY_PING_INTERVAL")]
    pub ping_interval: Option<String>,
    /// A connection silent for this long is closed as dead (e.g. "30s").
    #[arg(long, env = "FERRY_PING_TIMEOUT")]
    pub ping_timeout: Option<String>,
    /// Time a new connection has to send `hello` (e.g. "10s").
    #[arg(long, env = "FERRY_HELLO_TIMEOUT")]
    pub hello_timeout: Option<String>,
    /// Relay connections one session may open per minute (a new one after each `bye` to the
    /// server); past it, offers to the server are refused.
    #[arg(long, env = "FERRY_MAX_RELAY_CONNECTIONS_PER_MINUTE")]
    pub max_relay_connections_per_minute: Option<u32>,
    /// Relay connections from one IP address that may be in their ICE/DTLS handshake at once;
    /// past it, the checks of a new one from that address are dropped.
    #[arg(long, env = "FERRY_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<usize>,
    /// How long a session whose connection dropped is held for the client to resume it
    /// (e.g. "15s"; "0s": no resume, the member leaves at once).
    #[arg(long, env = "FERRY_RESUME_TIMEOUT")]
    pub resume_timeout: Option<String>,
    /// How long a shutdown waits for clients to leave (e.g. "30s").
    #[arg(long, env = "FERRY_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// How long a room with no members is kept (e.g. "5m").
    #[arg(long, env = "FERRY_EMPTY_ROOM_TTL")]
    pub empty_room_ttl: Option<String>,
    /// Log format: "text" or "json".
    #[arg(long, env = "FERRY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// DTLS-SRTP profiles the relay accepts, comma-separated, from aes128-gcm, aes256-gcm,
    /// aes128-cm-sha1-80 (default: all three).
    #[arg(long, env = "FERRY_SRTP_PROFILES", value_delimiter = ',')]
    pub srtp_profiles: Option<Vec<String>>,
    /// Also take the relay's media over TCP (ICE-TCP) on the media port's number: true or false.
    #[arg(long, env = "FERRY_MEDIA_TCP")]
    pub media_tcp: Option<bool>,
    /// Most TCP connections to the media port at once, per shard.
    #[arg(long, env = "FERRY_MEDIA_TCP_MAX_CONNECTIONS")]
    pub media_tcp_max_connections: Option<usize>,
    /// Most rooms the server holds at once.
    #[arg(long, env = "FERRY_MAX_ROOMS")]
    pub max_rooms: Option<usize>,
    /// Most rooms one session may have created that still exist.
    #[arg(long, env = "FERRY_MAX_ROOMS_PER_SESSION")]
    pub max_rooms_per_session: Option<usize>,
    /// Time a client has to send a whole HTTP request head, and most time idle between requests
    /// (e.g. "10s").
    #[arg(long, env = "FERRY_HTTP_HEADER_TIMEOUT")]
    pub http_header_timeout: Option<String>,
    /// Most TCP connections to the HTTP port from one IP address.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Most WebSocket connections that have not said hello yet.
    #[arg(long, env = "FERRY_MAX_PENDING_CONNECTIONS")]
    pub max_pending_connections: Option<usize>,
    /// Most WebSocket connections from one IP address that have not said hello yet.
    #[arg(long, env = "FERRY_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: Option<usize>,
    /// Web origins whose pages may open /ws (e.g. https://app.example.com), comma-separated;
    /// none = any.
    #[arg(long, env = "FERRY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Serve HTTPS and WSS on http_listen with this certificate chain (PEM); with tls_key.
    #[arg(long, env = "FERRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of tls_cert.
    #[arg(long, env = "FERRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Redis that the nodes of a cluster share (e.g. redis://10.0.0.2:6379); unset: one node,
    /// no Redis.
    #[arg(long, env = "FERRY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Name of this cluster: several clusters may share one Redis.
    #[arg(long, env = "FERRY_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// This node's id in the cluster (default: a random id at every start).
    #[arg(long, env = "FERRY_NODE_ID")]
    pub node_id: Option<String>,
    /// Where the other nodes reach this node's HTTP port (e.g. http://10.0.0.5:8080).
    #[arg(long, env = "FERRY_NODE_ADDRESS")]
    pub node_address: Option<String>,
    /// Shared secret the nodes of a cluster present to each other (default: api_secret).
    #[arg(long, env = "FERRY_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// A node that has not refreshed its entry in the registry for this long is dead (e.g. "2s").
    #[arg(long, env = "FERRY_NODE_TTL")]
    pub node_ttl: Option<String>,
}

/// An ICE server handed to clients in the welcome message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A TURN server whose credentials Ferry mints per session with the shared secret
/// (the "TURN REST" scheme, coturn's `use-auth-secret` / `static-auth-secret`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnServerFile {
    pub urls: Vec<String>,
    pub secret: String,
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnServer {
    pub urls: Vec<String>,
    pub secret: String,
    /// Lifetime of the credentials handed out.
    pub ttl: Duration,
}

/// The most media shards (threads) a server runs.
pub const MAX_MEDIA_SHARDS: usize = 256;

/// The TOML file, with the same names as the flags (snake_case).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub http_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub media_listen: Option<String>,
    pub media_shards: Option<usize>,
    pub announce: Option<Vec<String>>,
    pub api_key: Option<String>,
    pub api_secret: Option<String>,
    pub p2p_max_peers: Option<u32>,
    pub p2p_timeout: Option<String>,
    pub max_room_peers: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_message_bytes: Option<usize>,
    pub rate_limit: Option<u32>,
    pub rate_burst: Option<u32>,
    pub ping_interval: Option<String>,
    pub ping_timeout: Option<String>,
    pub hello_timeout: Option<String>,
    pub resume_timeout: Option<String>,
    pub max_relay_connections_per_minute: Option<u32>,
    pub max_handshakes_per_ip: Option<usize>,
    pub drain_timeout: Option<String>,
    pub empty_room_ttl: Option<String>,
    pub log_format: Option<String>,
    pub srtp_profiles: Option<Vec<String>>,
    pub media_tcp: Option<bool>,
    pub media_tcp_max_connections: Option<usize>,
    pub max_rooms: Option<usize>,
    pub max_rooms_per_session: Option<usize>,
    pub http_header_timeout: Option<String>,
    pub max_connections_per_ip: Option<usize>,
    pub max_pending_connections: Option<usize>,
    pub max_pending_per_ip: Option<usize>,
    pub allowed_origins: Option<Vec<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub redis_url: Option<String>,
    pub cluster_name: Option<String>,
    pub node_id: Option<String>,
    pub node_address: Option<String>,
    pub cluster_secret: Option<String>,
    pub node_ttl: Option<String>,
    #[serde(default)]
    pub ice_servers: Vec<IceServer>,
    #[serde(default)]
    pub turn_servers: Vec<TurnServerFile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub media_listen: SocketAddr,
    /// Media shards (threads, each with its own UDP port: `media_listen`'s port + shard index).
    pub media_shards: usize,
    /// Addresses advertised for the media port; empty = derived from `media_listen`.
    pub announce: Vec<IpAddr>,
    /// `(key, secret)`; `None` means dev mode (anonymous access).
    pub api: Option<(String, String)>,
    pub p2p_max_peers: u32,
    pub p2p_timeout: Duration,
    pub max_room_peers: u32,
    pub max_connections: u32,
    pub max_message_bytes: usize,
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long a session whose connection dropped (no close) is held for a resume.
    pub resume_timeout: Duration,
    /// New relay connections per session per minute.
    pub max_relay_connections_per_minute: u32,
    /// Relay connections in their handshake from one IP address.
    pub max_handshakes_per_ip: usize,
    pub hello_timeout: Duration,
    pub drain_timeout: Duration,
    pub empty_room_ttl: Duration,
    pub log_format: LogFormat,
    /// The DTLS-SRTP profiles the relay accepts (a DTLS server takes the client's first choice
    /// among them).
    pub srtp_profiles: Vec<SrtpProtectionProfile>,
    pub ice_servers: Vec<IceServer>,
    pub turn_servers: Vec<TurnServer>,
    /// ICE-TCP: the relay also takes media over TCP, on a TCP port of the media port's number.
    pub media_tcp: bool,
    /// Most TCP connections to one shard's media port at once.
    pub media_tcp_max_connections: usize,
    /// Most rooms at once.
    pub max_rooms: usize,
    /// Most rooms one session may have created that still exist.
    pub max_rooms_per_session: usize,
    /// A connection to the HTTP port without a whole request head this long is closed (and one
    /// idle this long between requests).
    pub http_header_timeout: Duration,
    pub max_connections_per_ip: usize,
    /// WebSockets before `hello` (they need no token): their own cap, apart from `max_connections`.
    pub max_pending_connections: usize,
    pub max_pending_per_ip: usize,
    /// Origins whose pages may open `/ws` (lower case, no trailing slash); empty = any.
    pub allowed_origins: Vec<String>,
    /// `(certificate chain, key)` PEM files: the HTTP port serves TLS (HTTPS and WSS).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Several nodes sharing a Redis (`redis_url`); `None`: one node on its own.
    pub cluster: Option<ClusterConfig>,
}

/// A node of a cluster (`redis_url` set).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub redis_url: String,
    /// Prefix of every key (`ferry:<name>:`).
    pub name: String,
    pub node_id: String,
    /// Base URL of this node's HTTP port for the other nodes (`http://host:port`).
    pub node_address: String,
    pub secret: String,
    pub node_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            media_listen: SocketAddr::from(([127, 0, 0, 1], 3478)),
            media_shards: 1,
            announce: Vec::new(),
            api: None,
            p2p_max_peers: 2,
            p2p_timeout: Duration::from_secs(5),
            max_room_peers: 50,
            max_connections: 10_000,
            max_message_bytes: 64 * 1024,
            rate_limit: 50,
            rate_burst: 100,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(30),
            resume_timeout: Duration::from_secs(15),
            max_relay_connections_per_minute: 20,
            max_handshakes_per_ip: 32,
            hello_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            empty_room_ttl: Duration::from_secs(300),
            log_format: LogFormat::Text,
            srtp_profiles: crate::media::srtp::PROFILES.to_vec(),
            ice_servers: Vec::new(),
            turn_servers: Vec::new(),
            media_tcp: true,
            media_tcp_max_connections: 1000,
            max_rooms: 10_000,
            max_rooms_per_session: 20,
            http_header_timeout: Duration::from_secs(10),
            max_connections_per_ip: 4096,
            max_pending_connections: 1000,
            max_pending_per_ip: 32,
            allowed_origins: Vec::new(),
            tls: None,
            cluster: None,
        }
    }
}

/// The cluster's settings, when `redis_url` is set (the other cluster options need it).
fn cluster_config(
    args: &ServeArgs,
    file: &FileConfig,
    cfg: &Config,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let pick = |a: &Option<String>, f: &Option<String>| a.clone().or_else(|| f.clone());
    let redis_url = pick(&args.redis_url, &file.redis_url).filter(|u| !u.is_empty());
    let name = pick(&args.cluster_name, &file.cluster_name);
    let node_id = pick(&args.node_id, &file.node_id);
    let node_address = pick(&args.node_address, &file.node_address);
    let secret = pick(&args.cluster_secret, &file.cluster_secret);
    let node_ttl = pick(&args.node_ttl, &file.node_ttl);
    let Some(redis_url) = redis_url else {
        for (name, set) in [
            ("cluster_name", name.is_some()),
            ("node_id", node_id.is_some()),
            ("node_address", node_address.is_some()),
            ("cluster_secret", secret.is_some()),
            ("node_ttl", node_ttl.is_some()),
        ] {
            if set {
                return Err(invalid(
                    name,
                    "only means something with redis_url (a cluster)",
                ));
            }
        }
        return Ok(None);
    };
    if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://")) {
        return Err(invalid(
            "redis_url",
            format!("expected redis://host:port, got {redis_url:?}"),
        ));
    }
    let name = name.unwrap_or_else(|| "ferry".to_string());
    let id_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !id_ok(&name) {
        return Err(invalid(
            "cluster_name",
            "1-64 characters of A-Z a-z 0-9 - _ .",
        ));
    }
    let node_id = match node_id {
        Some(id) if !id_ok(&id) => {
            return Err(invalid("node_id", "1-64 characters of A-Z a-z 0-9 - _ ."));
        }
        Some(id) => id,
        None => {
            use rand::Rng;
            let mut rng = rand::rng();
            let tail: String = (0..10)
                .map(|_| {
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])
                })
                .collect();
            format!("n-{tail}")
        }
    };
    let node_address = match node_address {
        Some(a) => {
            let a = a.trim_end_matches('/').to_string();
            if !a.starts_with("http://") {
                return Err(invalid(
                    "node_address",
                    format!(
                        "expected http://host:port (links between nodes are plain HTTP on a \
                         private network), got {a:?}"
                    ),
                ));
            }
            a
        }
        None if cfg.http_listen.ip().is_unspecified() => {
            return Err(invalid(
                "node_address",
                format!(
                    "http_listen is {} (every address): say at which address the other nodes \
                     reach this one, e.g. http://10.0.0.5:{}",
                    cfg.http_listen,
                    cfg.http_listen.port()
                ),
            ));
        }
        None => format!("http://{}", cfg.http_listen),
    };
    if cfg.tls.is_some() {
        return Err(invalid(
            "tls_cert",
            "a node of a cluster serves plain HTTP (the other nodes link to it without TLS): \
             terminate TLS at the balancer in front of the cluster",
        ));
    }
    let secret = match secret.or_else(|| cfg.api.as_ref().map(|(_, s)| s.clone())) {
        Some(s) if s.len() >= 16 => s,
        Some(_) => return Err(invalid("cluster_secret", "must be at least 16 characters")),
        None => {
            return Err(invalid(
                "cluster_secret",
                "a cluster needs a secret the nodes share: set cluster_secret (or api_secret)",
            ));
        }
    };
    let node_ttl = match node_ttl {
        Some(s) => parse_duration("node_ttl", &s)?,
        None => Duration::from_secs(2),
    };
    if node_ttl < Duration::from_millis(500) {
        return Err(invalid("node_ttl", "must be at least 500ms"));
    }
    Ok(Some(ClusterConfig {
        redis_url,
        name,
        node_id,
        node_address,
        secret,
        node_ttl,
    }))
}

/// The WebSocket layer closes a connection outright above this multiple of `max_message_bytes`;
/// between the two, a message gets a `message_too_large` error and the connection survives.
/// (The transport buffers a frame up to it: 4 keeps a connection that sends one slowly, before
/// `hello` too, to 256 KiB at the default `max_message_bytes`.)
pub const HARD_MESSAGE_LIMIT_FACTOR: usize = 4;

impl Config {
    /// Merge flags/env over the file named by `--config` (if any) over the defaults, and validate.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Config::merge(args, file)
    }

    pub fn merge(args: &ServeArgs, mut file: FileConfig) -> Result<Config, ConfigError> {
        let d = Config::default();
        let file_cluster = FileConfig {
            redis_url: file.redis_url.take(),
            cluster_name: file.cluster_name.take(),
            node_id: file.node_id.take(),
            node_address: file.node_address.take(),
            cluster_secret: file.cluster_secret.take(),
            node_ttl: file.node_ttl.take(),
            ..FileConfig::default()
        };
        let http_listen = match args.http_listen.clone().or(file.http_listen) {
            Some(s) => parse_addr("http_listen", &s)?,
            None => d.http_listen,
        };
        let metrics_listen = match args.metrics_listen.clone().or(file.metrics_listen) {
            Some(s) if s.is_empty() => None,
            Some(s) => Some(parse_addr("metrics_listen", &s)?),
            None => None,
        };
        let media_listen = match args.media_listen.clone().or(file.media_listen) {
            Some(s) => parse_addr("media_listen", &s)?,
            None => d.media_listen,
        };
        let announce = args
            .announce
            .clone()
            .or(file.announce)
            .unwrap_or_default()
            .iter()
            .map(|s| {
                s.trim().parse::<IpAddr>().map_err(|_| {
                    invalid(
                        "announce",
                        format!("{s:?} is not an IP address like 203.0.113.7"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let turn_servers = file
            .turn_servers
            .into_iter()
            .map(|t| {
                let ttl = match &t.ttl {
                    Some(s) => parse_duration("turn_servers.ttl", s)?,
                    None => Duration::from_secs(24 * 3600),
                };
                Ok(TurnServer {
                    urls: t.urls,
                    secret: t.secret,
                    ttl,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let api_key = args.api_key.clone().or(file.api_key);
        let api_secret = args.api_secret.clone().or(file.api_secret);
        let api = match (api_key, api_secret) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "api_secret",
                    "api_key is set but api_secret is not",
                ));
            }
            (key, Some(secret)) => {
                if secret.len() < 32 {
                    return Err(invalid(
                        "api_secret",
                        format!("must be at least 32 characters (got {})", secret.len()),
                    ));
                }
                let key = key.unwrap_or_else(|| "default".to_string());
                if key.is_empty() {
                    return Err(invalid("api_key", "must not be empty"));
                }
                Some((key, secret))
            }
        };
        let dur = |name: &'static str, a: &Option<String>, f: Option<String>, def: Duration| match a
            .clone()
            .or(f)
        {
            Some(s) => parse_duration(name, &s),
            None => Ok(def),
        };
        let p2p_timeout = dur(
            "p2p_timeout",
            &args.p2p_timeout,
            file.p2p_timeout,
            d.p2p_timeout,
        )?;
        let ping_interval = dur(
            "ping_interval",
            &args.ping_interval,
            file.ping_interval,
            d.ping_interval,
        )?;
        let ping_timeout = dur(
            "ping_timeout",
            &args.ping_timeout,
            file.ping_timeout,
            d.ping_timeout,
        )?;
        let resume_timeout = dur(
            "resume_timeout",
            &args.resume_timeout,
            file.resume_timeout,
            d.resume_timeout,
        )?;
        let hello_timeout = dur(
            "hello_timeout",
            &args.hello_timeout,
            file.hello_timeout,
            d.hello_timeout,
        )?;
        let drain_timeout = dur(
            "drain_timeout",
            &args.drain_timeout,
            file.drain_timeout,
            d.drain_timeout,
        )?;
        let empty_room_ttl = dur(
            "empty_room_ttl",
            &args.empty_room_ttl,
            file.empty_room_ttl,
            d.empty_room_ttl,
        )?;
        let log_format = match args
            .log_format
            .clone()
            .or(file.log_format)
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("expected \"text\" or \"json\", got {other:?}"),
                ));
            }
        };
        let srtp_profiles = match args.srtp_profiles.clone().or(file.srtp_profiles) {
            None => d.srtp_profiles.clone(),
            Some(names) => parse_srtp_profiles(&names)?,
        };
        let cfg = Config {
            http_listen,
            metrics_listen,
            media_listen,
            media_shards: match args.media_shards.or(file.media_shards) {
                Some(0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n) => n,
                None => d.media_shards,
            },
            announce,
            api,
            p2p_max_peers: args
                .p2p_max_peers
                .or(file.p2p_max_peers)
                .unwrap_or(d.p2p_max_peers),
            p2p_timeout,
            max_room_peers: args
                .max_room_peers
                .or(file.max_room_peers)
                .unwrap_or(d.max_room_peers),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_message_bytes: args
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            rate_limit: args.rate_limit.or(file.rate_limit).unwrap_or(d.rate_limit),
            rate_burst: args.rate_burst.or(file.rate_burst).unwrap_or(d.rate_burst),
            ping_interval,
            ping_timeout,
            resume_timeout,
            max_relay_connections_per_minute: args
                .max_relay_connections_per_minute
                .or(file.max_relay_connections_per_minute)
                .unwrap_or(d.max_relay_connections_per_minute),
            max_handshakes_per_ip: args
                .max_handshakes_per_ip
                .or(file.max_handshakes_per_ip)
                .unwrap_or(d.max_handshakes_per_ip),
            hello_timeout,
            drain_timeout,
            empty_room_ttl,
            log_format,
            srtp_profiles,
            ice_servers: file.ice_servers,
            turn_servers,
            media_tcp: args.media_tcp.or(file.media_tcp).unwrap_or(d.media_tcp),
            media_tcp_max_connections: args
                .media_tcp_max_connections
                .or(file.media_tcp_max_connections)
                .unwrap_or(d.media_tcp_max_connections),
            max_rooms: args.max_rooms.or(file.max_rooms).unwrap_or(d.max_rooms),
            http_header_timeout: match args
                .http_header_timeout
                .clone()
                .or(file.http_header_timeout)
            {
                Some(s) => parse_duration("http_header_timeout", &s)?,
                None => d.http_header_timeout,
            },
            max_connections_per_ip: args
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(d.max_connections_per_ip),
            max_pending_connections: args
                .max_pending_connections
                .or(file.max_pending_connections)
                .unwrap_or(d.max_pending_connections),
            max_pending_per_ip: args
                .max_pending_per_ip
                .or(file.max_pending_per_ip)
                .unwrap_or(d.max_pending_per_ip),
            allowed_origins: args
                .allowed_origins
                .clone()
                .or(file.allowed_origins)
                .unwrap_or_default()
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
            tls: match (
                args.tls_cert.clone().or(file.tls_cert),
                args.tls_key.clone().or(file.tls_key),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err(invalid("tls_cert", "set tls_cert and tls_key together")),
            },
            max_rooms_per_session: args
                .max_rooms_per_session
                .or(file.max_rooms_per_session)
                .unwrap_or(d.max_rooms_per_session),
            cluster: None,
        };
        let mut cfg = cfg;
        cfg.cluster = cluster_config(args, &file_cluster, &cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_MEDIA_SHARDS).contains(&self.media_shards) {
            return Err(invalid(
                "media_shards",
                format!("must be between 0 (one per CPU) and {MAX_MEDIA_SHARDS}"),
            ));
        }
        if self.media_listen.port() != 0
            && usize::from(self.media_listen.port()) + self.media_shards - 1 > usize::from(u16::MAX)
        {
            return Err(invalid(
                "media_shards",
                "the shards' ports (media_listen's port + shard index) go past 65535",
            ));
        }
        if self.max_room_peers < 2 {
            return Err(invalid("max_room_peers", "must be at least 2"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(invalid(
                "max_message_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if self.rate_limit == 0 {
            return Err(invalid(
                "rate_limit",
                "must be at least 1 message per second",
            ));
        }
        if self.max_relay_connections_per_minute == 0 {
            return Err(invalid(
                "max_relay_connections_per_minute",
                "must be at least 1",
            ));
        }
        if self.max_handshakes_per_ip == 0 {
            return Err(invalid("max_handshakes_per_ip", "must be at least 1"));
        }
        if self.rate_burst == 0 {
            return Err(invalid("rate_burst", "must be at least 1"));
        }
        if self.ping_interval.is_zero() {
            return Err(invalid("ping_interval", "must be greater than zero"));
        }
        if self.ping_timeout <= self.ping_interval {
            return Err(invalid(
                "ping_timeout",
                format!(
                    "must be longer than ping_interval ({})",
                    humantime::format_duration(self.ping_interval)
                ),
            ));
        }
        if self.hello_timeout.is_zero() {
            return Err(invalid("hello_timeout", "must be greater than zero"));
        }
        if self.p2p_timeout.is_zero() {
            return Err(invalid("p2p_timeout", "must be greater than zero"));
        }
        for a in &self.announce {
            if a.is_unspecified() {
                return Err(invalid(
                    "announce",
                    format!("{a} is not an address clients can reach"),
                ));
            }
        }
        for t in &self.turn_servers {
            if t.secret.is_empty() {
                return Err(invalid("turn_servers", "every entry needs a secret"));
            }
            if t.ttl.is_zero() {
                return Err(invalid("turn_servers", "ttl must be greater than zero"));
            }
            check_ice_urls("turn_servers", &t.urls)?;
        }
        for s in &self.ice_servers {
            check_ice_urls("ice_servers", &s.urls)?;
        }
        Ok(())
    }

    /// True when anonymous clients are accepted (no API secret configured).
    pub fn dev_mode(&self) -> bool {
        self.api.is_none()
    }
}

fn check_ice_urls(name: &'static str, urls: &[String]) -> Result<(), ConfigError> {
    if urls.is_empty() {
        return Err(invalid(name, "every entry needs at least one url"));
    }
    const SCHEMES: [&str; 4] = ["stun:", "stuns:", "turn:", "turns:"];
    match urls
        .iter()
        .find(|u| !SCHEMES.iter().any(|p| u.starts_with(p)))
    {
        Some(u) => Err(invalid(
            name,
            format!("{u:?} is not a stun:, stuns:, turn: or turns: URL"),
        )),
        None => Ok(()),
    }
}

fn parse_addr(name: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(name, format!("{s:?} is not an address like 127.0.0.1:8080")))
}

pub fn parse_duration(name: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| invalid(name, format!("{s:?} is not a duration like \"5s\" ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_dev_mode_on_loopback() {
        let c = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert!(c.dev_mode());
        assert_eq!(c.p2p_max_peers, 2);
        assert_eq!(c.p2p_timeout, Duration::from_secs(5));
    }

    #[test]
    fn srtp_profiles_parse_from_file_and_flags() {
        let d = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(d.srtp_profiles, crate::media::srtp::PROFILES.to_vec());
        let file: FileConfig =
            toml::from_str("srtp_profiles = [\"AES256-GCM\", \"aes128-gcm\"]\n").unwrap();
        let c = Config::merge(&ServeArgs::default(), file).unwrap();
        assert_eq!(
            c.srtp_profiles,
            vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm
            ]
        );
        let args = ServeArgs {
            srtp_profiles: Some(vec!["aes128-cm-sha1-80".into(), "aes128-cm-sha1-80".into()]),
            ..Default::default()
        };
        let c = Config::merge(&args, FileConfig::default()).unwrap();
        assert_eq!(
            c.srtp_profiles,
            vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80]
        );
        for bad in [vec!["aes128-cm-sha1-32".to_string()], vec![]] {
            let args = ServeArgs {
                srtp_profiles: Some(bad),
                ..Default::default()
            };
            let e = Config::merge(&args, FileConfig::default()).unwrap_err();
            assert!(e.to_string().contains("srtp_profiles"), "{e}");
        }
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig =
            toml::from_str("http_listen = \"127.0.0.1:9000\"\np2p_max_peers = 4\n").unwrap();
        let args = ServeArgs {
            p2p_max_peers: Some(0),
            ..Default::default()
        };
        let c = Config::merge(&args, file).unwrap();
        assert_eq!(c.http_listen.port(), 9000);
        assert_eq!(c.p2p_max_peers, 0);
    }

    #[test]
    fn bad_values_are_named() {
        let args = ServeArgs {
            p2p_timeout: Some("soon".into()),
            ..Default::default()
        };
        let e = Config::merge(&args, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("p2p_timeout"), "{e}");

        let args = ServeArgs {
            api_secret: Some("short".into()),
            ..Default::default()
        };
        let e = Config::merge(&args, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");

        let args = ServeArgs {
            ping_interval: Some("30s".into()),
            ping_timeout: Some("10s".into()),
            ..Default::default()
        };
        let e = Config::merge(&args, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("ping_timeout"), "{e}");
    }

    #[test]
    fn media_shards() {
        let merge = |shards: usize, listen: &str| {
            let args = ServeArgs {
                media_shards: Some(shards),
                media_listen: Some(listen.into()),
                ..Default::default()
            };
            Config::merge(&args, FileConfig::default())
        };
        assert_eq!(
            Config::merge(&ServeArgs::default(), FileConfig::default())
                .unwrap()
                .media_shards,
            1,
            "one shard, one UDP port, unless asked"
        );
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(merge(0, "0.0.0.0:3478").unwrap().media_shards, cpus);
        assert_eq!(merge(4, "0.0.0.0:3478").unwrap().media_shards, 4);
        let e = merge(1000, "0.0.0.0:3478").unwrap_err();
        assert!(e.to_string().contains("media_shards"), "{e}");
        let e = merge(4, "0.0.0.0:65534").unwrap_err();
        assert!(e.to_string().contains("65535"), "{e}");
        // Ephemeral ports: each shard gets its own.
        assert_eq!(merge(4, "127.0.0.1:0").unwrap().media_shards, 4);
        let file: FileConfig = toml::from_str("media_shards = 2").unwrap();
        assert_eq!(
            Config::merge(&ServeArgs::default(), file)
                .unwrap()
                .media_shards,
            2
        );
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let e = toml::from_str::<FileConfig>("htp_listen = \"x\"").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn cluster_options() {
        // No redis_url: one node, and the other cluster options are refused as meaningless.
        let cfg = Config::merge(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert!(cfg.cluster.is_none());
        let args = ServeArgs {
            node_id: Some("n1".into()),
            ..Default::default()
        };
        let e = Config::merge(&args, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("redis_url"), "{e}");

        let cluster = |f: FileConfig| Config::merge(&ServeArgs::default(), f);
        let base = || FileConfig {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            cluster_secret: Some("0123456789abcdef".into()),
            ..Default::default()
        };
        let c = cluster(base()).unwrap().cluster.unwrap();
        assert_eq!(c.name, "ferry");
        assert!(c.node_id.starts_with("n-"));
        assert_eq!(c.node_address, "http://127.0.0.1:8080");
        assert_eq!(c.node_ttl, Duration::from_secs(2));
        // A wildcard bind needs the address the other nodes use.
        let e = cluster(FileConfig {
            http_listen: Some("0.0.0.0:8080".into()),
            ..base()
        })
        .unwrap_err();
        assert!(e.to_string().contains("node_address"), "{e}");
        let c = cluster(FileConfig {
            http_listen: Some("0.0.0.0:8080".into()),
            node_address: Some("http://10.0.0.5:8080/".into()),
            ..base()
        })
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.node_address, "http://10.0.0.5:8080");
        // The secret: its own, or the API secret, and not short.
        for (secret, api, want) in [
            (None, None, Some("cluster_secret")),
            (Some("short"), None, Some("at least 16")),
            (None, Some("s".repeat(32)), None),
        ] {
            let args = ServeArgs {
                api_key: api.as_ref().map(|_| "k".into()),
                api_secret: api,
                ..Default::default()
            };
            let r = Config::merge(
                &args,
                FileConfig {
                    cluster_secret: secret.map(String::from),
                    ..base()
                },
            );
            match want {
                Some(w) => assert!(r.unwrap_err().to_string().contains(w)),
                None => assert!(r.unwrap().cluster.is_some()),
            }
        }
        for (field, bad) in [
            (
                "redis_url",
                FileConfig {
                    redis_url: Some("localhost:6379".into()),
                    ..base()
                },
            ),
            (
                "cluster_name",
                FileConfig {
                    cluster_name: Some("a b".into()),
                    ..base()
                },
            ),
            (
                "node_ttl",
                FileConfig {
                    node_ttl: Some("100ms".into()),
                    ..base()
                },
            ),
            (
                "node_address",
                FileConfig {
                    node_address: Some("10.0.0.5:8080".into()),
                    ..base()
                },
            ),
            (
                "node_address",
                FileConfig {
                    node_address: Some("https://n1:8443".into()),
                    ..base()
                },
            ),
            (
                "tls_cert",
                FileConfig {
                    tls_cert: Some("c.pem".into()),
                    tls_key: Some("k.pem".into()),
                    ..base()
                },
            ),
        ] {
            let e = cluster(bad).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }
}
