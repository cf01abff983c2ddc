//! The HTTP port's accept loop, with the limits `axum::serve` does not have: a connection that
//! does not send a complete request head within `http_header_timeout` is closed (so is one idle
//! that long between requests), a source IP address holds at most `max_connections_per_ip`
//! connections, and running out of file descriptors pauses accepting instead of spinning.
//! WebSocket upgrades leave hyper here and live on in their session task.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::Service;
use tracing::debug;

use crate::metrics::Metrics;

/// The limits of one HTTP listener.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub max_per_ip: usize,
}

/// Connections per source address; an entry goes when its last connection does.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    fn take(&self, ip: IpAddr, max: usize) -> bool {
        // No `.await` while the lock is held.
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, ip: IpAddr) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// Serve `app` on `listener` until `stop` turns true; then stop accepting, let the requests in
/// progress finish, and return. With `tls`, every connection is TLS (handshake within the header
/// timeout).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::Tls>>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let per_ip = Arc::new(PerIp::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = async { stop.wait_for(|v| *v).await.map(|_| ()) } => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: what is open must close first; try again shortly.
                    debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let ip = remote.ip().to_canonical();
        if !per_ip.take(ip, limits.max_per_ip) {
            metrics.http_refused.with_label_values(&["per_ip"]).inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let svc = hyper::service::service_fn({
            let app = app.clone();
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(remote));
                let mut app = app.clone();
                async move { app.call(req).await }
            }
        });
        let stream = FirstByteDeadline::new(stream, limits.header_timeout);
        let (builder, per_ip, watcher) = (builder.clone(), per_ip.clone(), graceful.watcher());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let done = match acceptor {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => Err(e.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = done {
                debug!(error = %e, %remote, "HTTP connection ended");
            }
            per_ip.give_back(ip);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A connection whose first byte must arrive before a deadline (hyper's header timeout runs
/// from the first byte of a request head: a connection that sends nothing would be kept).
struct FirstByteDeadline<S> {
    inner: S,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FirstByteDeadline<S> {
    fn new(inner: S, within: Duration) -> Self {
        FirstByteDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "nothing sent",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_counts_are_capped_and_given_back() {
        let p = PerIp::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(p.take(ip, 2) && p.take(ip, 2));
        assert!(!p.take(ip, 2));
        assert!(p.take("192.0.2.2".parse().unwrap(), 2));
        p.give_back(ip);
        assert!(p.take(ip, 2));
        p.give_back(ip);
        p.give_back(ip);
        assert!(!p.0.lock().unwrap().contains_key(&ip));
    }
}
