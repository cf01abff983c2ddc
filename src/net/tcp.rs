//! ICE over TCP for the media port (RFC 6544: the relay's passive TCP candidates; RFC 4571: each
//! STUN, DTLS or SRTP datagram framed by a 2-byte length): clients whose network lets no UDP out
//! still reach the relay, on a TCP port of the media port's number, with no other server.
//!
//! Each shard accepts on its own listener. A connection is two tasks on the shard's runtime: the
//! reader hands each frame to the media core as a [`TcpEvent::Frame`] (the core treats it as a
//! datagram from that address), the writer sends what the core queued for it. Every buffer is
//! bounded: a frame over [`MAX_FRAME`] closes the connection; frames the core has no room for,
//! and frames for a client that does not read (its queue of [`WRITE_QUEUE`] full), are dropped and
//! counted; connections past the cap are refused; one that says nothing for [`IDLE_TIMEOUT`] is
//! closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::Metrics;

/// The largest frame accepted from a client (media packets are under 1 500 bytes; DTLS records
/// too).
pub const MAX_FRAME: usize = 4096;
/// Frames queued for one client before more are dropped (a client that does not read).
pub const WRITE_QUEUE: usize = 512;
/// Frames from every connection of a shard waiting for its core.
pub const EVENT_QUEUE: usize = 4096;
/// A connection silent this long is closed (ICE consent checks come every few seconds).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that does not complete within this time means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the connections of a shard tell its core.
#[derive(Debug)]
pub enum TcpEvent {
    /// A client connected from `peer` to `local`; `writer` takes framed datagrams for it (see
    /// [`frame`]).
    Opened {
        peer: SocketAddr,
        local: SocketAddr,
        writer: mpsc::Sender<Bytes>,
    },
    /// One datagram from `peer`.
    Frame {
        peer: SocketAddr,
        local: SocketAddr,
        data: Bytes,
    },
    /// The connection from `peer` closed.
    Closed { peer: SocketAddr },
}

/// `datagram` with its RFC 4571 length prefix, ready for a connection's writer; `None` when it
/// is too long for one.
pub fn frame(datagram: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(datagram.len()).ok()?;
    let mut b = BytesMut::with_capacity(2 + datagram.len());
    b.put_u16(len);
    b.put_slice(datagram);
    Some(b.freeze())
}

/// Accept on `listener` until `shutdown`, at most `max_connections` at once; each connection's
/// events go to `events`. Runs on the shard's runtime.
pub async fn accept(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    events: mpsc::Sender<TcpEvent>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    debug!(error = %e, "media TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.load(std::sync::atomic::Ordering::Relaxed) >= max_connections {
            metrics.media_tcp_refused.inc();
            drop(stream);
            continue;
        }
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics.media_tcp_connections.inc();
        let (events, metrics, open, shutdown) = (
            events.clone(),
            metrics.clone(),
            open.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            connection(stream, peer, &events, &metrics, shutdown).await;
            let _ = events.send(TcpEvent::Closed { peer }).await;
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            metrics.media_tcp_connections.dec();
        });
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    events: &mpsc::Sender<TcpEvent>,
    metrics: &Metrics,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let (mut rd, mut wr) = stream.into_split();
    let (writer, mut queue) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    if events
        .send(TcpEvent::Opened {
            peer,
            local,
            writer,
        })
        .await
        .is_err()
    {
        return;
    }
    let write = async move {
        while let Some(f) = queue.recv().await {
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&f)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    };
    let read = async {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(IDLE_TIMEOUT, rd.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let n = usize::from(u16::from_be_bytes(len));
            if n > MAX_FRAME {
                debug!(%peer, n, "media TCP frame too long: closing");
                metrics
                    .media_dropped
                    .with_label_values(&["malformed"])
                    .inc();
                return;
            }
            match tokio::time::timeout(IDLE_TIMEOUT, rd.read_exact(&mut buf[..n])).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let ev = TcpEvent::Frame {
                peer,
                local,
                data: Bytes::copy_from_slice(&buf[..n]),
            };
            if events.try_send(ev).is_err() {
                metrics
                    .media_dropped
                    .with_label_values(&["tcp_overflow"])
                    .inc();
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = write => {}
        _ = read => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_length() {
        let f = frame(&[1, 2, 3]).unwrap();
        assert_eq!(&f[..], &[0, 3, 1, 2, 3]);
        assert!(frame(&vec![0; 70_000]).is_none());
    }
}
