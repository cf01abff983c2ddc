//! The HTTP surface on one port: demo page, SDK, WebSocket signaling, health, readiness, metrics.
//! Static assets are compiled into the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::config::HARD_MESSAGE_LIMIT_FACTOR;
use crate::signal::hub::{Hub, Refused};
use crate::signal::protocol::close;
use crate::signal::session;

const DEMO_HTML: &str = include_str!("sdk/index.html");
const SDK_JS: &str = include_str!("sdk/ferry.js");
/// Read chunk of a signaling WebSocket (see `ws`).
const WS_READ_BUFFER_BYTES: usize = 4096;

/// The main router. `with_metrics` adds `/metrics` (off when metrics have their own address).
pub fn router(hub: Arc<Hub>, with_metrics: bool) -> Router {
    let mut r = Router::new()
        .route("/", get(demo))
        .route("/sdk/ferry.js", get(sdk))
        .route("/ws", get(ws))
        .route("/cluster/attach", get(attach))
        .route("/cluster/ws", get(cluster_ws))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if with_metrics {
        r = r.route("/metrics", get(metrics));
    }
    r.with_state(hub)
}

/// A router serving only `/metrics`, for `metrics_listen`.
pub fn metrics_router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(hub)
}

async fn demo() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DEMO_HTML,
    )
        .into_response()
}

async fn sdk() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        SDK_JS,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(hub): State<Arc<Hub>>) -> Response {
    // A cluster node stays ready while Redis is away (calls in progress go on, rooms here can
    // be joined): the body says how the cluster looks from here.
    let cluster = match hub.directory().cluster() {
        Some(c) => format!(
            "cluster {}: node {}, {} nodes seen, redis {}\n",
            c.config.name,
            c.node_id(),
            c.nodes().len(),
            if c.is_up() {
                "reachable"
            } else {
                "unreachable"
            }
        ),
        None => String::new(),
    };
    if hub.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("draining\n{cluster}"),
        )
            .into_response()
    } else {
        (StatusCode::OK, format!("ready\n{cluster}")).into_response()
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    hub.observe_tables();
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        hub.metrics.render(),
    )
        .into_response()
}

/// A signaling WebSocket's buffers and limits (every WebSocket path: `/ws` and the cluster's).
fn sized(hub: &Hub, upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    let limit = hub.config.max_message_bytes * HARD_MESSAGE_LIMIT_FACTOR;
    // tungstenite zero-fills its read buffer up to `read_buffer_size` on every read, and the
    // buffer stays allocated (and touched) for the connection's life: the default 128 KiB was
    // a memset of 128 KiB per signaling frame and 128 KiB of RSS per connected peer. Signaling
    // messages are small; a larger one is read in several chunks (its frame length is reserved
    // up front), so 4 KiB costs nothing but the extra reads of a big SDP.
    upgrade
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .max_message_size(limit)
        .max_frame_size(limit)
}

/// The refusal of a request to `/cluster/…` that does not come from a node of this cluster (its
/// secret); `None` when it does.
fn not_from_a_node(hub: &Hub, headers: &axum::http::HeaderMap) -> Option<Response> {
    let Some(cluster) = hub.directory().cluster() else {
        return Some((StatusCode::NOT_FOUND, "not a cluster node\n").into_response());
    };
    let presented = headers
        .get(crate::cluster::link::SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !crate::cluster::link::secret_matches(presented, &cluster.config.secret) {
        hub.metrics
            .http_refused
            .with_label_values(&["cluster_secret"])
            .inc();
        return Some((StatusCode::FORBIDDEN, "wrong or missing cluster secret\n").into_response());
    }
    None
}

/// A member link from another node of the cluster (see cluster::link): only with the cluster's
/// secret.
async fn attach(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = not_from_a_node(&hub, &headers) {
        return refused;
    }
    let upgrade = sized(&hub, upgrade);
    upgrade.on_upgrade(move |socket| async move {
        if hub.is_draining() {
            session::refuse(socket, close::TRY_AGAIN_LATER, "node is draining").await;
            return;
        }
        let slot = match hub.try_connect(remote.ip()) {
            Ok(slot) => slot,
            Err(_) => {
                session::refuse(
                    socket,
                    close::TRY_AGAIN_LATER,
                    "too many pending connections",
                )
                .await;
                return;
            }
        };
        session::run_attached(hub, socket, slot, remote).await;
    })
}

/// A client's connection carried from another node of the cluster (a `resume` of a session
/// held here): the signaling WebSocket, with the client's address from that node.
async fn cluster_ws(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = not_from_a_node(&hub, &headers) {
        return refused;
    }
    let client = headers
        .get(crate::cluster::link::CLIENT_IP_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<std::net::IpAddr>().ok())
        .map_or(remote, |ip| SocketAddr::new(ip, 0));
    let upgrade = sized(&hub, upgrade);
    upgrade.on_upgrade(move |socket| serve_session(hub, socket, client, None))
}

async fn ws(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Pages of other sites may not open a session (`allowed_origins`; empty: any). Clients that
    // are not browsers send no Origin and are not concerned.
    let allowed = &hub.config.allowed_origins;
    if let Some(origin) = headers.get(header::ORIGIN)
        && !allowed.is_empty()
    {
        let origin = origin.to_str().unwrap_or_default().to_ascii_lowercase();
        if !allowed.contains(&origin) {
            hub.metrics
                .http_refused
                .with_label_values(&["origin"])
                .inc();
            return (
                StatusCode::FORBIDDEN,
                format!("origin {origin:?} is not in allowed_origins\n"),
            )
                .into_response();
        }
    }
    let upgrade = sized(&hub, upgrade);
    // A draining node of a cluster answers before the upgrade, so that a balancer can take the
    // connection to another node at once (nginx `proxy_next_upstream http_503`, haproxy's
    // health check); one node on its own closes after the upgrade with 1013, as clients expect.
    if hub.is_draining() && hub.directory().cluster().is_some() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining: connect to another\n",
        )
            .into_response();
    }
    let token = query.get("token").cloned();
    upgrade.on_upgrade(move |socket| serve_session(hub, socket, remote, token))
}

/// A signaling WebSocket after its upgrade: refused while draining or past the pending caps,
/// else a session.
async fn serve_session(
    hub: Arc<Hub>,
    socket: axum::extract::ws::WebSocket,
    remote: SocketAddr,
    token: Option<String>,
) {
    if hub.is_draining() {
        session::refuse(socket, close::TRY_AGAIN_LATER, "server is draining").await;
        return;
    }
    let slot = match hub.try_connect(remote.ip()) {
        Ok(slot) => slot,
        Err(why) => {
            let (label, reason) = match why {
                Refused::Pending => (
                    "pending",
                    format!(
                        "too many connections waiting for hello (max_pending_connections = {})",
                        hub.config.max_pending_connections
                    ),
                ),
                Refused::PendingPerIp => (
                    "pending_per_ip",
                    format!(
                        "too many connections from your address waiting for hello \
                         (max_pending_per_ip = {})",
                        hub.config.max_pending_per_ip
                    ),
                ),
            };
            hub.metrics.http_refused.with_label_values(&[label]).inc();
            hub.metrics
                .signal_errors
                .with_label_values(&["too_many_connections"])
                .inc();
            session::refuse(socket, close::TRY_AGAIN_LATER, &reason).await;
            return;
        }
    };
    session::run(hub, socket, slot, token, remote).await;
}
