//! The server's life: bind, serve, and the graceful drain.
//!
//! Drain sequence, started by [`ShutdownHandle::shutdown`] (SIGTERM/SIGINT in the binary):
//! `/readyz` turns 503 and new WebSocket sessions are refused at once; every session gets a
//! `draining` event; the server waits until every session has left or `drain_timeout` passed,
//! closes what remains with 1001, then stops serving HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::signal::hub::Hub;

pub struct Server {
    hub: Arc<Hub>,
    http: TcpListener,
    media: Arc<UdpSocket>,
    media_rx: tokio::sync::mpsc::Receiver<crate::media::Command>,
    metrics: Option<TcpListener>,
    shutdown_tx: watch::Sender<bool>,
}

/// Starts the drain of a running [`Server`]; cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<bool>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

impl Server {
    pub async fn bind(config: Config) -> std::io::Result<Server> {
        let config = Arc::new(config);
        let http = TcpListener::bind(config.http_listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", config.http_listen),
            )
        })?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let media = bind_media(config.media_listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot bind the media port {}: {e}", config.media_listen),
            )
        })?;
        let media_addrs = crate::net::advertised(media.local_addr()?, &config.announce);
        let (media_tx, media_rx) = tokio::sync::mpsc::channel(1024);
        let hub = Hub::new(config, Arc::new(Metrics::new()), media_addrs, media_tx);
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Server {
            hub,
            http,
            media: Arc::new(media),
            media_rx,
            metrics,
            shutdown_tx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound socket has an address")
    }

    pub fn media_addr(&self) -> SocketAddr {
        self.media
            .local_addr()
            .expect("bound socket has an address")
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket has an address"))
    }

    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shutdown_tx.clone(),
        }
    }

    /// Serve until a shutdown is requested and the drain completes.
    pub async fn run(self) -> std::io::Result<()> {
        let Server {
            hub,
            http: listener,
            media,
            media_rx,
            metrics,
            shutdown_tx,
        } = self;
        let cfg = hub.config.clone();
        info!(addr = %listener.local_addr()?, "HTTP and WebSocket listening");
        if cfg.dev_mode() {
            warn!(
                "DEV MODE: no api_secret configured, anyone can connect without a token. \
                 Set FERRY_API_KEY and FERRY_API_SECRET (or api_key/api_secret in the config file) in production."
            );
        }
        tokio::spawn(hub.clone().reaper());
        let core = crate::media::MediaCore::new(
            media,
            hub.media_addrs.clone(),
            hub.metrics.clone(),
            hub.clone(),
        )?;
        let media_task = tokio::spawn(core.run(media_rx, hub.shutdown.clone()));

        let mut stop_rx = shutdown_tx.subscribe();
        let (http_stop_tx, http_stop_rx) = watch::channel(false);
        let mut metrics_task = None;
        if let Some(ml) = metrics {
            info!(addr = %ml.local_addr()?, "metrics listening");
            let app = http::metrics_router(hub.clone());
            let mut rx = http_stop_rx.clone();
            metrics_task = Some(tokio::spawn(async move {
                axum::serve(ml, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|v| *v).await;
                    })
                    .await
            }));
        }
        let app = http::router(hub.clone(), metrics_task.is_none())
            .into_make_service_with_connect_info::<SocketAddr>();
        let mut rx = http_stop_rx;
        let serve = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await
        });

        let _ = stop_rx.wait_for(|v| *v).await;
        let sessions = hub.connection_count();
        info!(sessions, drain_timeout = ?cfg.drain_timeout, "draining");
        hub.start_drain();
        hub.metrics.ready.set(0);
        let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
        while hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = hub.connection_count();
        if left > 0 {
            info!(
                sessions = left,
                "drain timeout passed: closing remaining sessions"
            );
        }
        hub.shutdown.cancel();
        // Give the closing sessions a moment to send their close frames.
        let grace = tokio::time::Instant::now() + Duration::from_secs(2);
        while hub.connection_count() > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        http_stop_tx.send_replace(true);
        let res = serve.await.map_err(std::io::Error::other)?;
        media_task.await.map_err(std::io::Error::other)?;
        if let Some(t) = metrics_task {
            t.await.map_err(std::io::Error::other)??;
        }
        info!("stopped");
        res
    }
}

/// Socket buffers asked for on the media port. One video packet fanned out to 100 subscribers is
/// ~120 kB of sends in one go; the kernel's default (~200 kB) would drop a frame's worth, and with
/// it the DTLS handshakes of members who are joining. The kernel caps the request at
/// `net.core.wmem_max` / `rmem_max`.
const MEDIA_SOCKET_BUFFER: usize = 8 << 20;

fn bind_media(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer is not a reason to refuse to start.
    let _ = socket.set_send_buffer_size(MEDIA_SOCKET_BUFFER);
    let _ = socket.set_recv_buffer_size(MEDIA_SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}
