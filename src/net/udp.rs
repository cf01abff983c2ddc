//! Batched UDP I/O for the media port, on `quinn-udp`: up to [`RX_BATCH`] receive buffers filled
//! by one `recvmmsg`, each of which may hold a GRO chain of datagrams from one sender; and sends
//! queued during a drain of the core, then handed to the kernel grouped per destination with
//! UDP GSO (one `sendmsg` carries a run of same-size datagrams to one address).
//!
//! Both buffers are allocated once and reused: nothing here allocates per datagram.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Receive buffers per `recvmmsg`.
pub const RX_BATCH: usize = 32;
/// The largest datagram the media port handles (larger ones are truncated by the kernel and then
/// refused by the parsers).
pub const MAX_DATAGRAM: usize = 2048;
/// The most one GSO send may carry (the kernel's limit is 64 KiB of UDP payload).
const MAX_GSO_BYTES: usize = 60_000;

/// The kernel side of the media port: the socket and what `quinn-udp` learnt about it (GSO and
/// GRO support, which it turns off by itself if the device refuses them).
pub struct MediaSocket {
    pub socket: std::sync::Arc<UdpSocket>,
    state: UdpSocketState,
}

impl MediaSocket {
    pub fn new(socket: std::sync::Arc<UdpSocket>) -> io::Result<MediaSocket> {
        let state = UdpSocketState::new((&*socket).into())?;
        Ok(MediaSocket { socket, state })
    }

    /// Turns UDP GRO off (quinn-udp turns it on where the kernel has it): every datagram is then
    /// received on its own.
    pub fn disable_gro(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let off: libc::c_int = 0;
        // SAFETY: a valid socket descriptor and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Datagrams one GSO send may carry here (1 when the kernel or device has no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// One `recvmmsg` into `rx`, without waiting: the number of buffers filled (0 when nothing is
    /// queued).
    pub fn try_recv(&self, rx: &mut RxBatch) -> io::Result<usize> {
        let n = rx.bufs.len();
        let mut bufs = rx.bufs.iter_mut();
        let mut slices: [IoSliceMut<'_>; RX_BATCH] = std::array::from_fn(|_| {
            IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| b.as_mut()))
        });
        let r = self.socket.try_io(Interest::READABLE, || {
            self.state
                .recv((&*self.socket).into(), &mut slices[..n], &mut rx.meta[..n])
        });
        match r {
            Ok(n) => {
                rx.filled = n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                rx.filled = 0;
                Ok(0)
            }
            Err(e) => {
                rx.filled = 0;
                Err(e)
            }
        }
    }

    /// One datagram now, outside any batch (STUN answers to strangers).
    pub fn try_send_one(&self, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: None,
        };
        self.state.try_send((&*self.socket).into(), &transmit)
    }

    /// Hand every queued datagram to the kernel and empty the queue. The datagrams are grouped by
    /// destination (each destination's keep their order): a run of same-size datagrams to one
    /// destination goes as one GSO send (a subscriber's packets of one drain: one syscall instead
    /// of one each). Never waits: what the socket buffer cannot take is dropped and reported.
    pub fn send(&self, tx: &mut TxBatch) -> SendOutcome {
        let mut out = SendOutcome::default();
        tx.drain_runs(self.max_gso_segments(), |transmit, count| {
            // Straight to the non-blocking socket, not through tokio's readiness: a send is
            // tried whenever there is something to send, and a full buffer answers WouldBlock.
            let r = self.state.try_send((&*self.socket).into(), transmit);
            out.syscalls += 1;
            match r {
                Ok(()) => out.sent += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => out.would_block += count,
                Err(e) => {
                    out.failed += count;
                    out.last_error = Some(e);
                }
            }
        });
        out
    }
}

/// What one [`MediaSocket::send`] did.
#[derive(Debug, Default)]
pub struct SendOutcome {
    pub sent: usize,
    pub syscalls: usize,
    /// Datagrams the full send buffer did not take.
    pub would_block: usize,
    /// Datagrams refused for another reason (`last_error` tells one).
    pub failed: usize,
    pub last_error: Option<io::Error>,
}

/// Reused receive buffers (each big enough for a GRO chain) and what the last receive put there.
pub struct RxBatch {
    bufs: Vec<Box<[u8]>>,
    meta: [RecvMeta; RX_BATCH],
    filled: usize,
}

impl RxBatch {
    pub fn new(socket: &MediaSocket) -> RxBatch {
        RxBatch::with_buffers(socket, RX_BATCH)
    }

    /// `buffers` (at most [`RX_BATCH`]) receive buffers: a client's socket needs fewer.
    pub fn with_buffers(socket: &MediaSocket, buffers: usize) -> RxBatch {
        let size = MAX_DATAGRAM * socket.state.gro_segments().max(1);
        RxBatch {
            bufs: (0..buffers.clamp(1, RX_BATCH))
                .map(|_| vec![0u8; size].into_boxed_slice())
                .collect(),
            meta: [RecvMeta::default(); RX_BATCH],
            filled: 0,
        }
    }

    /// The datagrams of the last receive, GRO chains split back into their datagrams.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(self.bufs.iter())
            .flat_map(|(m, buf)| {
                let stride = m.stride.max(1);
                // An empty datagram is a datagram too (it is counted as malformed).
                let count = m.len.div_ceil(stride).max(1);
                (0..count).map(move |i| {
                    let start = (i * stride).min(m.len);
                    (&buf[start..m.len.min(start + stride)], m.addr)
                })
            })
    }
}

/// Datagrams waiting to be sent, copied into one reused buffer in the order they were queued.
#[derive(Default)]
pub struct TxBatch {
    data: Vec<u8>,
    items: Vec<(SocketAddr, usize, usize)>,
    /// Reused by `send`: the items by destination, and a run's datagrams made contiguous.
    order: Vec<(SocketAddr, usize)>,
    scratch: Vec<u8>,
}

impl TxBatch {
    pub fn push(&mut self, to: SocketAddr, bytes: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        self.items.push((to, start, bytes.len()));
    }

    /// Queues the datagram `write` appends to the buffer (in place: no copy of its own). When
    /// `write` returns false, whatever it appended is discarded and nothing is queued.
    pub fn push_with(&mut self, to: SocketAddr, write: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let start = self.data.len();
        if write(&mut self.data) {
            self.items.push((to, start, self.data.len() - start));
            true
        } else {
            self.data.truncate(start);
            false
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Empties the queue through `send`, a run at a time: the datagrams grouped by destination
    /// (each destination's keep their queue order), a run of up to `max_segments` same-size
    /// datagrams to one destination (the last may be shorter) as one [`Transmit`] with its
    /// segment size, and the number of datagrams it carries.
    pub fn drain_runs(&mut self, max_segments: usize, mut send: impl FnMut(&Transmit<'_>, usize)) {
        let max_segments = max_segments.max(1);
        let mut order = std::mem::take(&mut self.order);
        let mut scratch = std::mem::take(&mut self.scratch);
        order.clear();
        order.extend(self.items.iter().enumerate().map(|(i, item)| (item.0, i)));
        // Stable: per destination, queue order.
        order.sort_by_key(|item| item.0);
        let mut k = 0;
        while k < order.len() {
            let (to, first) = order[k];
            let (_, start, len) = self.items[first];
            let (mut end, mut total, mut contiguous) = (start + len, len, true);
            let mut j = k + 1;
            while j < order.len() && j - k < max_segments {
                let (next_to, idx) = order[j];
                let (_, next_start, next_len) = self.items[idx];
                if next_to != to || next_len > len || total + next_len > MAX_GSO_BYTES {
                    break;
                }
                contiguous &= next_start == end;
                end = next_start + next_len;
                total += next_len;
                j += 1;
                // Only the last segment of a GSO send may be shorter.
                if next_len < len {
                    break;
                }
            }
            let count = j - k;
            let contents: &[u8] = if contiguous {
                &self.data[start..start + total]
            } else {
                scratch.clear();
                for &(_, idx) in &order[k..j] {
                    let (_, s, l) = self.items[idx];
                    scratch.extend_from_slice(&self.data[s..s + l]);
                }
                &scratch
            };
            let transmit = Transmit {
                destination: to,
                ecn: None,
                contents,
                segment_size: (count > 1).then_some(len),
                src_ip: None,
            };
            send(&transmit, count);
            k = j;
        }
        self.order = order;
        self.scratch = scratch;
        self.data.clear();
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn pair() -> (MediaSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (MediaSocket::new(Arc::new(a)).unwrap(), b)
    }

    async fn recv_all(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..n {
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), s.recv_from(&mut buf))
                .await
                .expect("datagram within 5 s")
                .unwrap();
            out.push(buf[..r.0].to_vec());
        }
        out
    }

    /// Datagrams keep their boundaries and order through GSO runs: same-size runs, a shorter last
    /// segment, interleaved destinations.
    #[tokio::test]
    async fn batched_sends_keep_every_datagram_whole_and_in_order() {
        let (m, b) = pair().await;
        let (_, c) = pair().await;
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut tx = TxBatch::default();
        let mut want_b = Vec::new();
        for i in 0..10u8 {
            let len = if i == 9 { 300 } else { 1200 };
            let d = vec![i; len];
            tx.push(to_b, &d);
            want_b.push(d);
        }
        tx.push(to_c, b"for c");
        for i in 20..23u8 {
            let d = vec![i; 500];
            tx.push(to_b, &d);
            want_b.push(d);
        }
        let out = m.send(&mut tx);
        assert_eq!(out.sent, 14, "{out:?}");
        assert!(tx.is_empty());
        if m.max_gso_segments() > 1 {
            assert_eq!(out.syscalls, 3, "one GSO send per run: {out:?}");
        }
        assert_eq!(recv_all(&b, want_b.len()).await, want_b);
        assert_eq!(recv_all(&c, 1).await, vec![b"for c".to_vec()]);
    }

    /// Datagrams to several destinations, interleaved as a fan-out queues them, go as one GSO
    /// send per destination, each destination's in order.
    #[tokio::test]
    async fn interleaved_destinations_are_grouped_per_destination() {
        let (m, b) = pair().await;
        let (_, c) = pair().await;
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut tx = TxBatch::default();
        let (mut want_b, mut want_c) = (Vec::new(), Vec::new());
        for i in 0..6u8 {
            tx.push(to_b, &[i; 1000]);
            want_b.push(vec![i; 1000]);
            tx.push(to_c, &[100 + i; 1000]);
            want_c.push(vec![100 + i; 1000]);
        }
        let out = m.send(&mut tx);
        assert_eq!(out.sent, 12, "{out:?}");
        if m.max_gso_segments() > 1 {
            assert_eq!(out.syscalls, 2, "one GSO send per destination: {out:?}");
        }
        assert_eq!(recv_all(&b, 6).await, want_b);
        assert_eq!(recv_all(&c, 6).await, want_c);
    }

    /// One receive takes many datagrams, each whole, with its sender.
    #[tokio::test]
    async fn batched_receive_splits_every_datagram() {
        let (m, b) = pair().await;
        let to = m.socket.local_addr().unwrap();
        let mut want = Vec::new();
        for i in 0..40u8 {
            // The first half the same size (the kernel may coalesce them with GRO), then mixed.
            let d = vec![
                i;
                if i < 20 {
                    1000
                } else {
                    1000 + usize::from(i % 3)
                }
            ];
            b.send_to(&d, to).await.unwrap();
            want.push(d);
        }
        let mut rx = RxBatch::new(&m);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < want.len() && std::time::Instant::now() < deadline {
            m.socket.readable().await.unwrap();
            m.try_recv(&mut rx).unwrap();
            for (d, from) in rx.datagrams() {
                assert_eq!(from, b.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, want);
    }
}
