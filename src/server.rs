//! The server's life: bind, serve, and the graceful drain.
//!
//! Drain sequence, started by [`ShutdownHandle::shutdown`] (SIGTERM/SIGINT in the binary):
//! `/readyz` turns 503 and new WebSocket sessions are refused at once; every session gets a
//! `draining` event; the server waits until every session has left or `drain_timeout` passed,
//! closes what remains with 1001, then stops serving HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::signal::hub::Hub;

pub struct Server {
    hub: Arc<Hub>,
    http: TcpListener,
    media: Vec<MediaShard>,
    metrics: Option<TcpListener>,
    shutdown_tx: watch::Sender<bool>,
    /// Set by [`ShutdownHandle::shutdown_now`].
    shutdown_now_tx: watch::Sender<bool>,
    /// TLS on the HTTP port (`tls_cert` / `tls_key`).
    tls: Option<Arc<crate::tls::Tls>>,
    media_thread_start: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// One media shard before it runs: its UDP port, what it advertises, its command queue.
struct MediaShard {
    socket: std::net::UdpSocket,
    addrs: Vec<SocketAddr>,
    commands: tokio::sync::mpsc::Receiver<crate::media::Command>,
    control: tokio::sync::mpsc::UnboundedReceiver<crate::media::Command>,
    /// The ICE-TCP listener on the UDP port's number (`media_tcp`).
    tcp: Option<std::net::TcpListener>,
}

/// Starts the drain of a running [`Server`]; cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<bool>,
    now: watch::Sender<bool>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    /// Cut a drain short: close every session now (1001) and stop (a second SIGTERM).
    pub fn shutdown_now(&self) {
        self.tx.send_replace(true);
        self.now.send_replace(true);
    }
}

impl Server {
    pub async fn bind(config: Config) -> std::io::Result<Server> {
        let config = Arc::new(config);
        let tls = match &config.tls {
            Some((cert, key)) => Some(
                crate::tls::Tls::load(cert, key)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
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
        // Shard i listens on the configured port + i (or an ephemeral port of its own for 0).
        let mut media = Vec::new();
        let mut senders = Vec::new();
        for i in 0..config.media_shards {
            let mut addr = config.media_listen;
            if addr.port() != 0 {
                addr.set_port(addr.port() + i as u16);
            }
            let socket = bind_media(addr).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot bind the media port {addr}: {e}"))
            })?;
            let bound = socket.local_addr()?;
            let addrs = crate::net::advertised(bound, &config.announce);
            let tcp = if config.media_tcp {
                // With port 0 the UDP port is ephemeral: its number may be taken for TCP.
                let same_number = bind_media_tcp(bound).or_else(|e| match addr.port() {
                    0 => bind_media_tcp(SocketAddr::new(bound.ip(), 0)),
                    _ => Err(e),
                });
                Some(same_number.map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot listen for media over TCP on {bound} (media_tcp = false turns it off): {e}"
                        ),
                    )
                })?)
            } else {
                None
            };
            let (tx, commands) = tokio::sync::mpsc::channel(1024);
            let (control_tx, control) = tokio::sync::mpsc::unbounded_channel();
            senders.push(crate::media::MediaControl {
                commands: tx,
                control: control_tx,
            });
            media.push(MediaShard {
                socket,
                addrs,
                commands,
                control,
                tcp,
            });
        }
        // Clients use shard 0's port for STUN; each relay connection gets its shard's candidates.
        let media_addrs = media[0].addrs.clone();
        let hub = Hub::new(
            config.clone(),
            Arc::new(Metrics::new()),
            media_addrs,
            senders,
        );
        if let Some(c) = &config.cluster {
            let media: Vec<String> = hub.media_addrs.iter().map(|a| a.to_string()).collect();
            let dir = crate::cluster::RedisDirectory::new(c.clone(), media, &hub.metrics.registry)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            info!(node = %c.node_id, address = %c.node_address, cluster = %c.name, "cluster node");
            hub.set_directory(crate::cluster::Directory::Redis(Arc::new(dir)));
        }
        let (shutdown_tx, _) = watch::channel(false);
        let (shutdown_now_tx, _) = watch::channel(false);
        Ok(Server {
            hub,
            http,
            media,
            metrics,
            shutdown_tx,
            shutdown_now_tx,
            tls,
            media_thread_start: None,
        })
    }

    /// Run `f` first on every media shard's thread (e.g. to mark it for a profiler or a
    /// counting allocator).
    pub fn on_media_thread_start(mut self, f: impl Fn() + Send + Sync + 'static) -> Server {
        self.media_thread_start = Some(Arc::new(f));
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound socket has an address")
    }

    /// Shard 0's media port (the STUN port clients are told about).
    pub fn media_addr(&self) -> SocketAddr {
        self.media_addrs()[0]
    }

    /// Every shard's ICE-TCP port (`media_tcp`), by shard index.
    pub fn media_tcp_addrs(&self) -> Vec<SocketAddr> {
        self.media
            .iter()
            .filter_map(|m| m.tcp.as_ref().and_then(|t| t.local_addr().ok()))
            .collect()
    }

    /// Every shard's media port, by shard index.
    pub fn media_addrs(&self) -> Vec<SocketAddr> {
        self.media
            .iter()
            .map(|m| m.socket.local_addr().expect("bound socket has an address"))
            .collect()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket has an address"))
    }

    /// The HTTP port's TLS (to reload its certificate), when it has one.
    pub fn tls(&self) -> Option<Arc<crate::tls::Tls>> {
        self.tls.clone()
    }

    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shutdown_tx.clone(),
            now: self.shutdown_now_tx.clone(),
        }
    }

    /// Serve until a shutdown is requested and the drain completes.
    pub async fn run(self) -> std::io::Result<()> {
        let Server {
            hub,
            http: listener,
            media,
            metrics,
            shutdown_tx,
            shutdown_now_tx,
            tls,
            media_thread_start,
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
        let cluster = hub.directory().cluster().cloned();
        if let Some(dir) = &cluster {
            tokio::spawn(crate::cluster::heartbeat(hub.clone(), dir.clone()));
        }
        let mut media_threads = Vec::new();
        for (i, shard) in media.into_iter().enumerate() {
            media_threads.push(start_shard(i, shard, &hub, media_thread_start.clone()).await?);
        }

        let mut stop_rx = shutdown_tx.subscribe();
        let (http_stop_tx, http_stop_rx) = watch::channel(false);
        let limits = crate::listener::HttpLimits {
            header_timeout: cfg.http_header_timeout,
            max_per_ip: cfg.max_connections_per_ip,
        };
        let mut metrics_task = None;
        if let Some(ml) = metrics {
            info!(addr = %ml.local_addr()?, "metrics listening");
            let app = http::metrics_router(hub.clone());
            metrics_task = Some(tokio::spawn(crate::listener::serve(
                ml,
                app,
                limits,
                hub.metrics.clone(),
                http_stop_rx.clone(),
                None,
            )));
        }
        let app = http::router(hub.clone(), metrics_task.is_none());
        let serve = tokio::spawn(crate::listener::serve(
            listener,
            app,
            limits,
            hub.metrics.clone(),
            http_stop_rx,
            tls,
        ));

        let _ = stop_rx.wait_for(|v| *v).await;
        let sessions = hub.connection_count();
        info!(sessions, drain_timeout = ?cfg.drain_timeout, "draining");
        hub.start_drain();
        hub.metrics.ready.set(0);
        if let Some(dir) = &cluster {
            crate::cluster::drain(&hub, dir).await;
        }
        let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
        let now_rx = shutdown_now_tx.subscribe();
        while hub.connection_count() > 0
            && tokio::time::Instant::now() < deadline
            && !*now_rx.borrow()
        {
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
        if let Some(dir) = &cluster {
            dir.leave().await;
        }
        http_stop_tx.send_replace(true);
        let res = serve.await.map_err(std::io::Error::other)?;
        for done in media_threads {
            let _ = done.await;
        }
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

/// Start one media shard on a thread of its own (a single-threaded runtime: its socket, timers
/// and core never leave it). Resolves once the core is ready; the receiver fires when it stopped.
async fn start_shard(
    index: usize,
    shard: MediaShard,
    hub: &Arc<Hub>,
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (metrics, sink, shutdown) = (hub.metrics.clone(), hub.clone(), hub.shutdown.clone());
    let srtp_profiles = hub.config.srtp_profiles.clone();
    let tcp_max = hub.config.media_tcp_max_connections;
    let max_handshakes_per_ip = hub.config.max_handshakes_per_ip;
    std::thread::Builder::new()
        .name(format!("ferry-media-{index}"))
        .spawn(move || {
            if let Some(f) = on_start {
                f();
            }
            let started = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|rt| {
                    let core = rt.block_on(async {
                        let tcp = match shard.tcp {
                            Some(l) => {
                                l.set_nonblocking(true)?;
                                let l = tokio::net::TcpListener::from_std(l)?;
                                let port = l.local_addr()?.port();
                                let (tx, rx) =
                                    tokio::sync::mpsc::channel(crate::net::tcp::EVENT_QUEUE);
                                tokio::spawn(crate::net::tcp::accept(
                                    l,
                                    tcp_max,
                                    tx,
                                    metrics.clone(),
                                    shutdown.clone(),
                                ));
                                Some((port, rx))
                            }
                            None => None,
                        };
                        let mut core =
                            crate::media::MediaCore::new(shard.socket, shard.addrs, metrics, sink)?;
                        core.set_srtp_profiles(srtp_profiles);
                        core.set_max_handshakes_per_ip(max_handshakes_per_ip);
                        let tcp = tcp.map(|(port, rx)| {
                            core.set_tcp_port(port);
                            rx
                        });
                        Ok::<_, std::io::Error>((core, tcp))
                    })?;
                    Ok((rt, core))
                });
            match started {
                Ok((rt, (core, tcp))) => {
                    let _ = ready_tx.send(Ok(()));
                    rt.block_on(core.run(shard.commands, shard.control, tcp, shutdown));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            let _ = done_tx.send(());
        })?;
    ready_rx
        .await
        .map_err(|_| std::io::Error::other("media shard thread ended before starting"))??;
    Ok(done_rx)
}

/// The ICE-TCP listener of a media port bound at `udp` (the same address and port number).
fn bind_media_tcp(udp: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(udp), Type::STREAM, Some(Protocol::TCP))?;
    if udp.is_ipv6() && udp.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&udp.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn bind_media(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` takes IPv4 too (v4-mapped), whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer is not a reason to refuse to start.
    let _ = socket.set_send_buffer_size(MEDIA_SOCKET_BUFFER);
    let _ = socket.set_recv_buffer_size(MEDIA_SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
