//! Batched UDP I/O for the media port: up to [`RX_BATCH`] receive buffers filled by one
//! `recvmmsg` (`quinn-udp`), each of which may hold a GRO chain of datagrams from one sender; and
//! sends queued during a drain of the core, then handed to the kernel grouped per destination with
//! UDP GSO (one message carries a run of same-size datagrams to one address), [`MMSG_BATCH`]
//! messages per `sendmmsg`.
//!
//! Both buffers are allocated once and reused: nothing here allocates per datagram.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Receive buffers per `recvmmsg`.
pub const RX_BATCH: usize = 32;
/// The largest datagram the media port handles (larger ones are truncated by the kernel and then
/// refused by the parsers).
pub const MAX_DATAGRAM: usize = 2048;
/// The most one GSO send may carry (the kernel's limit is 64 KiB of UDP payload).
const MAX_GSO_BYTES: usize = 60_000;

/// The kernel side of the media port: the socket and what `quinn-udp` learnt about it (GSO and
/// GRO support, which it turns off by itself if the device refuses them).
///
/// The socket is registered with tokio for reading only. Sends never wait on it (see
/// [`MediaSocket::send`]), and write interest would cost an epoll wake-up after every send: the
/// kernel reports the send buffer's space coming back (EPOLLOUT) each time a sent datagram is
/// freed.
pub struct MediaSocket {
    socket: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// Bound to an IPv6 address (IPv4 destinations are then written v4-mapped).
    v6: bool,
    /// A GSO send failed with EIO (a device that cannot segment): runs go one datagram per
    /// message from then on.
    gso_failed: std::sync::atomic::AtomicBool,
    /// Bound to 0.0.0.0 or [::]: the kernel would pick each reply's source address by its routes,
    /// which on a host with several addresses may not be the one the client sent to (and the
    /// client drops what comes from another). Replies to these destinations leave from the local
    /// address their datagrams arrived at (IP_PKTINFO / IPV6_PKTINFO).
    sources: rustc_hash::FxHashMap<SocketAddr, IpAddr>,
    wildcard: bool,
}

impl MediaSocket {
    /// Takes `socket` over (made non-blocking) and registers it with the current tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<MediaSocket> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let v6 = socket.local_addr()?.is_ipv6();
        let wildcard = socket.local_addr()?.ip().is_unspecified();
        // SAFETY: the registered descriptor is the socket's own; the `AsyncFd` owns the socket,
        // so the descriptor stays open and the same until the registration is dropped with it.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(MediaSocket {
            socket,
            state,
            v6,
            gso_failed: Default::default(),
            sources: Default::default(),
            wildcard,
        })
    }

    /// Bound to 0.0.0.0 or [::] (see [`MediaSocket::set_source`]).
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// On a wildcard socket: send what goes to `to` from the local address `src` (where `to`'s
    /// datagrams arrive). A no-op on a socket bound to one address.
    pub fn set_source(&mut self, to: SocketAddr, src: IpAddr) {
        if self.wildcard {
            self.sources.insert(to, src);
        }
    }

    /// `to` is no longer a peer's address.
    pub fn forget_source(&mut self, to: &SocketAddr) {
        self.sources.remove(to);
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    /// Waits until the socket has datagrams to read (or had, when the last receive did not empty
    /// it).
    pub async fn readable(&self) -> io::Result<()> {
        // Dropping the guard keeps the readiness: `try_recv` clears it when it empties the queue.
        self.socket.readable().await.map(drop)
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
        if self.gso_failed.load(std::sync::atomic::Ordering::Relaxed) {
            1
        } else {
            self.state.max_gso_segments()
        }
    }

    /// One `recvmmsg` into `rx`, without waiting: the number of buffers filled (0 when nothing is
    /// queued).
    ///
    /// A receive that fills fewer buffers than it could emptied the socket's queue, so the socket's
    /// readiness is cleared there and then (the closure reports `WouldBlock` to tokio, the count
    /// is kept aside): the next wait goes straight to epoll instead of first paying one more
    /// `recvmmsg` that can only say EAGAIN. Nothing is missed: the socket is registered
    /// edge-triggered, and a datagram arriving after this receive is a new edge that epoll
    /// reports.
    pub fn try_recv(&self, rx: &mut RxBatch) -> io::Result<usize> {
        let n = rx.bufs.len();
        let mut bufs = rx.bufs.iter_mut();
        let mut slices: [IoSliceMut<'_>; RX_BATCH] = std::array::from_fn(|_| {
            IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| b.as_mut()))
        });
        // What one receive can fill: quinn-udp takes at most BATCH_SIZE messages per call (32 with
        // recvmmsg on Linux, 1 where it receives one datagram per call).
        let capacity = n.min(quinn_udp::BATCH_SIZE);
        let mut drained = None;
        let r = self.socket.try_io(Interest::READABLE, |socket| {
            let got = self
                .state
                .recv(socket.into(), &mut slices[..n], &mut rx.meta[..n])?;
            if got < capacity {
                drained = Some(got);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(got)
        });
        match r {
            Ok(n) => {
                rx.filled = n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                rx.filled = drained.unwrap_or(0);
                Ok(rx.filled)
            }
            Err(e) => {
                rx.filled = 0;
                Err(e)
            }
        }
    }

    /// One datagram now, outside any batch (STUN answers to strangers).
    pub fn try_send_one(&self, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        self.try_send_one_from(to, None, bytes)
    }

    /// As [`MediaSocket::try_send_one`], from the local address `src` on a wildcard socket (the
    /// one the datagram it answers arrived at).
    pub fn try_send_one_from(
        &self,
        to: SocketAddr,
        src: Option<IpAddr>,
        bytes: &[u8],
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: src.filter(|_| self.wildcard).map(|ip| self.for_socket(ip)),
        };
        self.state.try_send(self.socket.get_ref().into(), &transmit)
    }

    /// Hand every queued datagram to the kernel and empty the queue. The datagrams are grouped by
    /// destination (each destination's keep their order): a run of same-size datagrams to one
    /// destination is one GSO message (a subscriber's packets of one drain), and the runs go to
    /// the kernel [`MMSG_BATCH`] messages per `sendmmsg` (a packet fanned out to 100 subscribers:
    /// two syscalls, not 100). Never waits: what the socket buffer cannot take is dropped and
    /// reported.
    pub fn send(&self, tx: &mut TxBatch) -> SendOutcome {
        let mut out = SendOutcome::default();
        tx.plan_runs(self.max_gso_segments());
        out.messages = tx.runs.len();
        #[cfg(target_os = "linux")]
        self.send_runs_mmsg(tx, &mut out);
        #[cfg(not(target_os = "linux"))]
        for (transmit, count) in tx.transmits() {
            out.syscalls += 1;
            match self.state.try_send(self.socket.get_ref().into(), &transmit) {
                Ok(()) => out.sent += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => out.would_block += count,
                Err(e) => {
                    out.failed += count;
                    out.last_error = Some(e);
                }
            }
        }
        tx.data.clear();
        tx.items.clear();
        out
    }

    /// The planned runs through `sendmmsg`, each with its `UDP_SEGMENT` control message when it
    /// carries more than one datagram. A message the kernel refuses is counted and skipped.
    #[cfg(target_os = "linux")]
    fn send_runs_mmsg(&self, tx: &TxBatch, out: &mut SendOutcome) {
        use std::mem::MaybeUninit;
        use std::os::fd::AsRawFd;
        /// Room for a `cmsghdr` with a `u16` (UDP_SEGMENT) and one with an `in6_pktinfo` (the
        /// source address), aligned as the kernel reads them.
        #[derive(Clone, Copy)]
        #[repr(C, align(8))]
        struct Control([u8; 72]);
        let fd = self.socket.as_raw_fd();
        // Only the entries a call fills are initialised (each as a whole, below): zeroing all
        // four arrays (~9 kB) cost more than the rest of a small send.
        let mut names = [const { MaybeUninit::<libc::sockaddr_in6>::uninit() }; MMSG_BATCH];
        let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; MMSG_BATCH];
        let mut controls = [const { MaybeUninit::<Control>::uninit() }; MMSG_BATCH];
        let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; MMSG_BATCH];
        for chunk in tx.runs.chunks(MMSG_BATCH) {
            let mut n = 0;
            let mut sent_runs: [usize; MMSG_BATCH] = [0; MMSG_BATCH];
            for (i, r) in chunk.iter().enumerate() {
                // SAFETY: all-zero is a valid sockaddr_in6 (a plain C struct).
                let name = names[n].write(unsafe { std::mem::zeroed() });
                let Some(namelen) = write_sockaddr(name, r.to, self.v6) else {
                    out.failed += r.count;
                    out.last_error = Some(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} cannot be reached from this socket", r.to),
                    ));
                    continue;
                };
                let contents = tx.run_contents(r);
                let iov = iovs[n].write(libc::iovec {
                    iov_base: contents.as_ptr() as *mut libc::c_void,
                    iov_len: contents.len(),
                });
                // SAFETY: all-zero is a valid mmsghdr (a plain C struct; null pointers, lengths 0).
                let hdr = hdrs[n].write(unsafe { std::mem::zeroed() });
                let h = &mut hdr.msg_hdr;
                h.msg_name = (name as *mut libc::sockaddr_in6).cast();
                h.msg_namelen = namelen;
                h.msg_iov = iov;
                h.msg_iovlen = 1;
                let src = if self.wildcard {
                    self.sources.get(&r.to).copied()
                } else {
                    None
                };
                if r.count > 1 || src.is_some() {
                    let control = controls[n].write(Control([0; 72]));
                    h.msg_control = control.0.as_mut_ptr().cast();
                    // SAFETY: CMSG_SPACE of a u16 (24) plus that of an in6_pktinfo (40) fit the
                    // 72-byte, 8-aligned buffer the header points to; msg_controllen is set to
                    // what is written before each CMSG_NXTHDR, so the cmsg macros stay inside it.
                    unsafe {
                        let mut len = 0;
                        if r.count > 1 {
                            h.msg_controllen = libc::CMSG_SPACE(2) as _;
                            let c = libc::CMSG_FIRSTHDR(h);
                            (*c).cmsg_level = libc::SOL_UDP;
                            (*c).cmsg_type = libc::UDP_SEGMENT;
                            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                            std::ptr::write_unaligned(
                                libc::CMSG_DATA(c).cast::<u16>(),
                                r.segment as u16,
                            );
                            len += libc::CMSG_SPACE(2) as usize;
                        }
                        if let Some(src) = src {
                            len += write_pktinfo(h, len, self.for_socket(src));
                        }
                        h.msg_controllen = len as _;
                    }
                }
                sent_runs[n] = i;
                n += 1;
            }
            let mut k = 0;
            while k < n {
                // SAFETY: `hdrs[k..n]` are initialised above (MaybeUninit<T> has T's layout) and
                // point into `names`, `iovs`, `controls` and the batch's buffers, all alive and
                // unmoved for this call.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        hdrs[k..n].as_mut_ptr().cast::<libc::mmsghdr>(),
                        (n - k) as libc::c_uint,
                        0,
                    )
                };
                out.syscalls += 1;
                if r > 0 {
                    for &i in &sent_runs[k..k + r as usize] {
                        out.sent += chunk[i].count;
                    }
                    k += r as usize;
                    continue;
                }
                let e = io::Error::last_os_error();
                let run = &chunk[sent_runs[k]];
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => out.would_block += run.count,
                    _ => {
                        if e.raw_os_error() == Some(libc::EIO) && run.count > 1 {
                            // The device cannot segment: no more GSO on this socket.
                            self.gso_failed
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        out.failed += run.count;
                        out.last_error = Some(e);
                    }
                }
                k += 1;
            }
        }
    }
}

impl MediaSocket {
    /// `ip` as this socket's family writes it (an IPv4 address v4-mapped on an IPv6 socket).
    fn for_socket(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) if self.v6 => IpAddr::V6(v4.to_ipv6_mapped()),
            ip => ip,
        }
    }
}

/// Appends an IP_PKTINFO (IPv4) or IPV6_PKTINFO control message asking the kernel to send from
/// `src`, `at` bytes into `h`'s control buffer; the space it took.
///
/// # Safety
/// `h.msg_control` must point to a buffer of at least `at + CMSG_SPACE(in6_pktinfo)` bytes,
/// aligned for `cmsghdr`.
#[cfg(target_os = "linux")]
unsafe fn write_pktinfo(h: &mut libc::msghdr, at: usize, src: IpAddr) -> usize {
    // SAFETY: per the contract, the buffer has room at `at` for the header and its data.
    unsafe {
        let c = h.msg_control.cast::<u8>().add(at).cast::<libc::cmsghdr>();
        match src {
            IpAddr::V4(v4) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                let size = std::mem::size_of::<libc::in_pktinfo>() as u32;
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
                libc::CMSG_SPACE(size) as usize
            }
            IpAddr::V6(v6) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                let size = std::mem::size_of::<libc::in6_pktinfo>() as u32;
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), info);
                libc::CMSG_SPACE(size) as usize
            }
        }
    }
}

/// Messages per `sendmmsg`.
pub const MMSG_BATCH: usize = 64;

/// `to` as the socket address the kernel takes from a socket of this family (IPv4 destinations
/// v4-mapped on an IPv6 socket); its length. `None`: an IPv6 destination on an IPv4 socket.
#[cfg(target_os = "linux")]
fn write_sockaddr(
    out: &mut libc::sockaddr_in6,
    to: SocketAddr,
    v6: bool,
) -> Option<libc::socklen_t> {
    let ip6 = match (to, v6) {
        (SocketAddr::V4(a), false) => {
            // SAFETY: a sockaddr_in fits in (and is no more aligned than) a sockaddr_in6.
            let sin = unsafe { &mut *(out as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
            *sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            return Some(std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t);
        }
        (SocketAddr::V6(_), false) => return None,
        (SocketAddr::V4(a), true) => {
            std::net::SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)
        }
        (SocketAddr::V6(a), true) => a,
    };
    *out = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: ip6.port().to_be(),
        sin6_flowinfo: ip6.flowinfo(),
        sin6_addr: libc::in6_addr {
            s6_addr: ip6.ip().octets(),
        },
        sin6_scope_id: ip6.scope_id(),
    };
    Some(std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
}

/// What one [`MediaSocket::send`] did.
#[derive(Debug, Default)]
pub struct SendOutcome {
    pub sent: usize,
    /// Messages handed to the kernel (a run of datagrams to one destination is one GSO message).
    pub messages: usize,
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
        self.received().map(|(d, from, _)| (d, from))
    }

    /// As [`RxBatch::datagrams`], with the local address each arrived at (where the kernel says;
    /// what a wildcard socket needs), IPv4-mapped addresses as IPv4.
    pub fn received(&self) -> impl Iterator<Item = (&[u8], SocketAddr, Option<IpAddr>)> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(self.bufs.iter())
            .flat_map(|(m, buf)| {
                let stride = m.stride.max(1);
                // An empty datagram is a datagram too (it is counted as malformed).
                let count = m.len.div_ceil(stride).max(1);
                let from = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                let to = m.dst_ip.map(|ip| ip.to_canonical());
                (0..count).map(move |i| {
                    let start = (i * stride).min(m.len);
                    (&buf[start..m.len.min(start + stride)], from, to)
                })
            })
    }
}

/// 32 bits that are equal for equal addresses (and rarely for different ones).
fn destination_key(to: &SocketAddr) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(to) >> 32
}

/// The queue index in an entry of [`TxBatch::order`] (its low 32 bits).
fn item_index(order: u64) -> usize {
    order as u32 as usize
}

/// Datagrams waiting to be sent, copied into one reused buffer in the order they were queued.
#[derive(Default)]
pub struct TxBatch {
    data: Vec<u8>,
    items: Vec<(SocketAddr, usize, usize)>,
    /// Reused by `send`: the queue's indices grouped by destination, as `(hash of the
    /// destination << 32) | index` sorted as plain integers (much cheaper than comparing
    /// `SocketAddr`s); the datagrams of runs that were not contiguous, copied together; the runs.
    order: Vec<u64>,
    scratch: Vec<u8>,
    runs: Vec<Run>,
}

/// Datagrams to one destination sent as one GSO send: `len` bytes at `start` of the batch's data
/// (or of its scratch buffer), `count` datagrams of `segment` bytes (the last may be shorter).
#[derive(Clone, Copy, Debug)]
struct Run {
    to: SocketAddr,
    in_scratch: bool,
    start: usize,
    len: usize,
    segment: usize,
    count: usize,
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

    /// Hands each queued datagram to `take` (its destination and bytes) and removes those it
    /// took (true): the ones that go another way than this socket (a client over TCP).
    pub fn take_matching(&mut self, mut take: impl FnMut(SocketAddr, &[u8]) -> bool) {
        let data = &self.data;
        self.items
            .retain(|(to, start, len)| !take(*to, &data[*start..*start + *len]));
        // Nothing left to send: the bytes go too (a batch of only TCP destinations is never
        // handed to `send`, which is where a batch is otherwise emptied).
        if self.items.is_empty() {
            self.data.clear();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Groups the queue into [`Run`]s: the datagrams by destination (each destination's keep
    /// their queue order), a run of up to `max_segments` same-size datagrams to one destination
    /// (the last may be shorter), copied into the scratch buffer when they are not contiguous.
    fn plan_runs(&mut self, max_segments: usize) {
        let max_segments = max_segments.max(1);
        self.order.clear();
        self.order.extend(
            self.items
                .iter()
                .enumerate()
                .map(|(i, item)| (destination_key(&item.0) << 32) | i as u64),
        );
        // Per destination, queue order (the index breaks ties). Two destinations with the same
        // hash may interleave: a run stops at a different address, so that only splits a run.
        self.order.sort_unstable();
        self.scratch.clear();
        self.runs.clear();
        let mut k = 0;
        while k < self.order.len() {
            let (to, start, len) = self.items[item_index(self.order[k])];
            let (mut end, mut total, mut contiguous) = (start + len, len, true);
            let mut j = k + 1;
            while j < self.order.len() && j - k < max_segments {
                let (next_to, next_start, next_len) = self.items[item_index(self.order[j])];
                // An empty datagram goes on its own: a GSO send cannot carry it in a run.
                if next_to != to
                    || next_len > len
                    || next_len == 0
                    || total + next_len > MAX_GSO_BYTES
                {
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
            let (in_scratch, start) = if contiguous {
                (false, start)
            } else {
                let at = self.scratch.len();
                for &o in &self.order[k..j] {
                    let (_, s, l) = self.items[item_index(o)];
                    self.scratch.extend_from_slice(&self.data[s..s + l]);
                }
                (true, at)
            };
            self.runs.push(Run {
                to,
                in_scratch,
                start,
                len: total,
                segment: len,
                count: j - k,
            });
            k = j;
        }
    }

    fn run_contents(&self, r: &Run) -> &[u8] {
        let buf = if r.in_scratch {
            &self.scratch
        } else {
            &self.data
        };
        &buf[r.start..r.start + r.len]
    }

    /// The planned runs as `Transmit`s (with their segment size), and the datagrams each carries.
    fn transmits(&self) -> impl Iterator<Item = (Transmit<'_>, usize)> {
        self.runs.iter().map(|r| {
            let transmit = Transmit {
                destination: r.to,
                ecn: None,
                contents: self.run_contents(r),
                segment_size: (r.count > 1).then_some(r.segment),
                src_ip: None,
            };
            (transmit, r.count)
        })
    }

    /// Empties the queue through `send`, a run at a time (see [`TxBatch::plan_runs`]): each run
    /// as one [`Transmit`] with its segment size, and the number of datagrams it carries.
    pub fn drain_runs(&mut self, max_segments: usize, mut send: impl FnMut(&Transmit<'_>, usize)) {
        self.plan_runs(max_segments);
        for (transmit, count) in self.transmits() {
            send(&transmit, count);
        }
        self.data.clear();
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    async fn pair() -> (MediaSocket, UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (MediaSocket::new(a).unwrap(), b)
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

    /// A batch whose datagrams all went another way (TCP clients) keeps none of their bytes: it
    /// is never handed to `send`, which empties it otherwise.
    #[test]
    fn a_batch_taken_whole_by_another_transport_is_emptied() {
        let tcp = SocketAddr::from(([10, 0, 0, 1], 4000));
        let udp = SocketAddr::from(([10, 0, 0, 2], 4000));
        let mut tx = TxBatch::default();
        for _ in 0..100 {
            tx.push(tcp, &[7; 1200]);
        }
        tx.push(udp, &[1; 100]);
        let mut taken = 0;
        tx.take_matching(|to, d| {
            taken += usize::from(to == tcp && d.len() == 1200);
            to == tcp
        });
        assert_eq!((taken, tx.len()), (100, 1), "only the UDP datagram is left");
        tx.take_matching(|_, _| true);
        assert!(tx.is_empty());
        assert_eq!(tx.data.len(), 0, "the taken datagrams' bytes are released");
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
            assert_eq!(out.messages, 3, "one GSO message per run: {out:?}");
            assert_eq!(out.syscalls, 1, "the runs in one sendmmsg: {out:?}");
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
            assert_eq!(out.messages, 2, "one GSO message per destination: {out:?}");
        }
        assert_eq!(recv_all(&b, 6).await, want_b);
        assert_eq!(recv_all(&c, 6).await, want_c);
    }

    /// More destinations than one `sendmmsg` takes: every one gets its datagram; a destination
    /// the socket cannot reach (IPv6 from an IPv4 socket) is counted as failed and the others
    /// still go.
    #[tokio::test]
    async fn many_destinations_go_in_few_syscalls_and_a_bad_one_is_skipped() {
        let (m, _) = pair().await;
        let mut peers = Vec::new();
        let mut tx = TxBatch::default();
        for i in 0..(MMSG_BATCH + 6) {
            let p = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            tx.push(p.local_addr().unwrap(), &[i as u8; 700]);
            if i == 3 {
                tx.push(
                    "[::1]:9".parse().unwrap(),
                    b"unreachable from an IPv4 socket",
                );
            }
            peers.push(p);
        }
        let out = m.send(&mut tx);
        assert_eq!(out.sent, MMSG_BATCH + 6, "{out:?}");
        assert_eq!(out.failed, 1, "{out:?}");
        assert_eq!(out.messages, MMSG_BATCH + 7, "{out:?}");
        assert_eq!(out.syscalls, 2, "{out:?}");
        for (i, p) in peers.iter().enumerate() {
            assert_eq!(recv_all(p, 1).await, vec![vec![i as u8; 700]], "peer {i}");
        }
    }

    /// A socket bound to IPv6 (dual-stack) reaches IPv4 destinations v4-mapped.
    #[tokio::test]
    async fn an_ipv6_socket_sends_to_ipv4_destinations() {
        let Ok(a) = std::net::UdpSocket::bind("[::]:0") else {
            writeln_skip("an_ipv6_socket_sends_to_ipv4_destinations", "no IPv6 here");
            return;
        };
        let m = MediaSocket::new(a).unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut tx = TxBatch::default();
        tx.push(b.local_addr().unwrap(), b"one");
        tx.push(b.local_addr().unwrap(), b"two");
        let out = m.send(&mut tx);
        assert_eq!(out.sent, 2, "{out:?}");
        assert_eq!(
            recv_all(&b, 2).await,
            vec![b"one".to_vec(), b"two".to_vec()]
        );
    }

    fn writeln_skip(test: &str, why: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
    }

    /// A receive that empties the queue clears the socket's readiness (no extra EAGAIN receive
    /// before the next wait), and a datagram arriving afterwards still wakes the socket; a
    /// receive that fills every buffer leaves it ready, and the rest is read next.
    #[tokio::test]
    async fn a_drained_socket_waits_for_the_next_datagram_and_a_full_batch_does_not() {
        use futures_util::FutureExt;
        let (m, b) = pair().await;
        let to = m.local_addr().unwrap();
        let wait = || async {
            tokio::time::timeout(std::time::Duration::from_secs(5), m.readable())
                .await
                .expect("readable within 5 s")
                .unwrap();
        };
        let mut rx = RxBatch::new(&m);
        // Sizes all different: no two are coalesced by GRO, one buffer each.
        for i in 0..3u8 {
            b.send_to(&vec![i; 100 + usize::from(i)], to).await.unwrap();
        }
        let mut got = 0;
        while got < 3 {
            wait().await;
            got += m.try_recv(&mut rx).unwrap();
        }
        assert_eq!(got, 3);
        assert!(
            m.readable().now_or_never().is_none(),
            "a drained socket is not ready any more"
        );
        b.send_to(b"later", to).await.unwrap();
        wait().await;
        assert_eq!(m.try_recv(&mut rx).unwrap(), 1);
        let (d, from) = rx.datagrams().next().unwrap();
        assert_eq!((d, from), (&b"later"[..], b.local_addr().unwrap()));

        // More datagrams than buffers: the first receive fills all of them and the socket stays
        // ready for the rest.
        let total = RX_BATCH + 5;
        for i in 0..total {
            b.send_to(&vec![i as u8; 200 + i], to).await.unwrap();
        }
        // Until every datagram is queued (loopback delivers as it is sent), the first receive
        // may see fewer.
        let mut seen = Vec::new();
        while seen.len() < total {
            wait().await;
            let n = m.try_recv(&mut rx).unwrap();
            seen.extend(rx.datagrams().map(|(d, _)| d.len()));
            if n == RX_BATCH {
                assert!(
                    m.readable().now_or_never().is_some(),
                    "a full batch leaves the socket ready"
                );
            }
        }
        assert_eq!(seen, (0..total).map(|i| 200 + i).collect::<Vec<_>>());
    }

    /// One receive takes many datagrams, each whole, with its sender.
    #[tokio::test]
    async fn batched_receive_splits_every_datagram() {
        let (m, b) = pair().await;
        let to = m.local_addr().unwrap();
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
            m.readable().await.unwrap();
            m.try_recv(&mut rx).unwrap();
            for (d, from) in rx.datagrams() {
                assert_eq!(from, b.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, want);
    }
}

/// Property tests of the send batch: however datagrams to however many destinations are queued
/// (some written in place and withdrawn, some taken by another transport), the runs send each
/// one exactly once, to its own destination, with its own bytes, in its order within that
/// destination, in runs a GSO send can carry.
#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    struct Queued {
        to: usize,
        len: usize,
        /// Queued through `push_with`, whose writer gives up (nothing is queued).
        withdrawn: bool,
    }

    fn queued() -> impl Strategy<Value = Queued> {
        let len = prop_oneof![3 => Just(1200usize), 2 => Just(300usize), 2 => 0usize..1500, 1 => 1500usize..9000];
        (0usize..6, len, proptest::bool::weighted(0.1)).prop_map(|(to, len, withdrawn)| Queued {
            to,
            len,
            withdrawn,
        })
    }

    fn destination(i: usize) -> SocketAddr {
        match i % 3 {
            0 => SocketAddr::from(([10, 0, 0, i as u8], 4000 + i as u16)),
            1 => SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16], 5000)),
            _ => SocketAddr::from(([192, 0, 2, 1], 6000 + i as u16)),
        }
    }

    /// A datagram's bytes: its queue index and length, then a pattern of both.
    fn bytes(i: usize, len: usize) -> Vec<u8> {
        (0..len)
            .map(|k| (i.wrapping_mul(31) ^ k.wrapping_mul(7)) as u8)
            .collect()
    }

    /// Found by the property test below: an empty datagram after others to the same
    /// destination joined their GSO run, where it cannot be (it was never sent).
    #[test]
    fn an_empty_datagram_is_a_run_of_its_own() {
        let to = destination(0);
        let mut tx = TxBatch::default();
        tx.push(to, &[1; 1200]);
        tx.push(to, &[]);
        let mut runs = Vec::new();
        tx.drain_runs(64, |t, count| runs.push((t.contents.len(), count)));
        assert_eq!(runs, [(1200, 1), (0, 1)]);
    }

    proptest! {
        #[test]
        fn every_datagram_goes_once_to_its_destination_in_order(
            items in proptest::collection::vec(queued(), 0..300),
            max_segments in prop_oneof![Just(1usize), Just(64), 2usize..80],
            tcp in proptest::option::of(0usize..6),
        ) {
            for round in 0..2 {
                let mut tx = TxBatch::default();
                let mut want: HashMap<SocketAddr, Vec<Vec<u8>>> = HashMap::new();
                for (i, q) in items.iter().enumerate() {
                    let to = destination(q.to);
                    let d = bytes(i + round, q.len);
                    if q.withdrawn {
                        let queued = tx.push_with(to, |buf| {
                            buf.extend_from_slice(&d);
                            false
                        });
                        prop_assert!(!queued);
                    } else if i % 2 == 0 {
                        tx.push(to, &d);
                        want.entry(to).or_default().push(d);
                    } else {
                        let queued = tx.push_with(to, |buf| {
                            buf.extend_from_slice(&d);
                            true
                        });
                        prop_assert!(queued);
                        want.entry(to).or_default().push(d);
                    }
                }
                if let Some(t) = tcp {
                    let t = destination(t);
                    let mut taken = Vec::new();
                    tx.take_matching(|to, d| {
                        if to == t {
                            taken.push(d.to_vec());
                        }
                        to == t
                    });
                    prop_assert_eq!(taken, want.remove(&t).unwrap_or_default());
                }
                prop_assert_eq!(tx.len(), want.values().map(Vec::len).sum::<usize>());
                let mut got: HashMap<SocketAddr, Vec<Vec<u8>>> = HashMap::new();
                let mut failure = None;
                tx.drain_runs(max_segments, |t, count| {
                    let segment = t.segment_size.unwrap_or(t.contents.len());
                    let datagrams: Vec<Vec<u8>> = if count == 1 {
                        vec![t.contents.to_vec()]
                    } else {
                        t.contents.chunks(segment.max(1)).map(<[u8]>::to_vec).collect()
                    };
                    let ok = count <= max_segments
                        && datagrams.len() == count
                        && (count == 1 || (segment > 0 && t.contents.len() <= MAX_GSO_BYTES))
                        && datagrams[..count - 1].iter().all(|d| d.len() == segment);
                    if !ok && failure.is_none() {
                        failure = Some(format!(
                            "run to {}: {count} datagrams, segment {:?}, {} bytes",
                            t.destination,
                            t.segment_size,
                            t.contents.len()
                        ));
                    }
                    got.entry(t.destination).or_default().extend(datagrams);
                });
                prop_assert_eq!(failure, None);
                prop_assert!(tx.is_empty());
                prop_assert_eq!(got, want);
            }
        }
    }
}
