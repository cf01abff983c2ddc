//! The kernel's floor under the relay's fan-out, on this machine: a thread that does only what the
//! media thread's system calls do — wait for datagrams (`poll`), take them in (`recvmmsg`), send one
//! copy of each to every receiver on loopback (`sendmmsg`, or one GSO send per receiver) — and
//! nothing of the relay's own work (no SRTP, no RTP rewrite, no bookkeeping). Its CPU time per copy
//! is what any user-space SFU pays on this machine before doing anything of its own, so the figures
//! `ferry loadgen` reports for the whole server can be read against it.
//!
//! The load is shaped like `ferry loadgen`'s: one publisher, paced (one 1200-byte datagram at a
//! time, as a browser paces video) or frames at once (9 datagrams back to back, as a frame arrives
//! unpaced), and N receivers each with its own socket, drained by tasks on a two-thread tokio
//! runtime as the load generator's subscribers are, each running AES-128-GCM over every datagram as
//! they do to open SRTP (so a datagram finds a receiver awake or asleep about as often as there: on
//! loopback the receivers' wake-ups are charged to the sender).
//!
//! `cargo bench --bench udp_floor` (optional: `FLOOR_RECEIVERS="10 50 100" FLOOR_SECONDS=6
//! FLOOR_PPS=310 FLOOR_MODES="paced frames frames-gso" FLOOR_PIN=1`; with `FLOOR_PIN=1` the relaying
//! thread runs on CPU 0 and the publisher and receivers on CPU 1, so the receivers never preempt it;
//! `FLOOR_RELAY_IP` / `FLOOR_RECEIVER_IP`, default 127.0.0.1, the addresses to bind; `FLOOR_JSON=1`:
//! a JSON object per run instead of a line, as `benches/compare.sh` reads them).
//! Prints one line per run; it reports, it asserts nothing (wall-clock figures do not belong in
//! tests).

use ring::aead;
use std::{
    io,
    mem::MaybeUninit,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const SIZE: usize = 1200;
/// Datagrams per frame when frames arrive at once (2.5 Mbit/s at 30 frames/s).
const FRAME: usize = 9;
/// recvmmsg batch, as the media thread's.
const RX_BATCH: usize = 64;
/// The kernel's limit on messages per `sendmmsg` call (UIO_MAXIOV).
const TX_CHUNK: usize = 1024;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Paced,
    Frames,
    FramesGso,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s {
            "paced" => Some(Mode::Paced),
            "frames" => Some(Mode::Frames),
            "frames-gso" => Some(Mode::FramesGso),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Paced => "paced",
            Mode::Frames => "frames",
            Mode::FramesGso => "frames-gso",
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter word, if given, picks modes.
    let receivers: Vec<usize> = env_or("FLOOR_RECEIVERS", "10 50 100")
        .split_whitespace()
        .map(|n| n.parse().expect("FLOOR_RECEIVERS: numbers"))
        .collect();
    let seconds: f64 = env_or("FLOOR_SECONDS", "6").parse().expect("FLOOR_SECONDS");
    let pps: f64 = env_or("FLOOR_PPS", "310").parse().expect("FLOOR_PPS");
    let pin = env_or("FLOOR_PIN", "0") == "1";
    let json = env_or("FLOOR_JSON", "0") == "1";
    let ips = Ips {
        relay: env_or("FLOOR_RELAY_IP", "127.0.0.1")
            .parse()
            .expect("FLOOR_RELAY_IP: an IPv4 address"),
        receivers: env_or("FLOOR_RECEIVER_IP", "127.0.0.1")
            .parse()
            .expect("FLOOR_RECEIVER_IP: an IPv4 address"),
    };
    let modes: Vec<Mode> = env_or("FLOOR_MODES", "paced frames frames-gso")
        .split_whitespace()
        .map(|m| Mode::parse(m).expect("FLOOR_MODES: paced, frames, frames-gso"))
        .collect();
    if !json {
        println!(
            "udp_floor: {SIZE}-byte datagrams, {pps} packets/s in, {seconds} s measured per run (after 1 s of warm-up){}",
            if pin {
                ", relay pinned to CPU 0, publisher and receivers to CPU 1"
            } else {
                ""
            }
        );
    }
    if pin {
        pin_to(1);
    }
    for &mode in &modes {
        for &n in &receivers {
            match run(mode, n, pps, Duration::from_secs_f64(seconds), pin, ips) {
                Ok(r) if json => r.print_json(mode, n),
                Ok(r) => r.print(mode, n),
                Err(e) => println!("udp_floor: {} x {n}: failed: {e}", mode.name()),
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Ips {
    relay: std::net::Ipv4Addr,
    receivers: std::net::Ipv4Addr,
}

struct Report {
    copies: u64,
    wakeups: u64,
    cpu: Duration,
    user: Duration,
    sys: Duration,
    received: u64,
    unsent: u64,
    /// Per wake-up: from the datagrams' arrival in the relay to the end of the last send.
    fanout_us: Vec<f64>,
}

impl Report {
    fn per_copy_us(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.copies.max(1) as f64
    }

    /// The fan-out times per wake-up, sorted.
    fn fanout_sorted(&self) -> Vec<f64> {
        let mut f = self.fanout_us.clone();
        f.sort_by(f64::total_cmp);
        f
    }

    fn print_json(&self, mode: Mode, n: usize) {
        let f = self.fanout_sorted();
        let q = |p: f64| {
            f.get(((f.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "{{\"mode\":\"{}\",\"receivers\":{n},\"cpu_us_per_copy\":{:.3},\"user_us_per_copy\":{:.3},\"system_us_per_copy\":{:.3},\"copies\":{},\"received\":{},\"unsent\":{},\"fanout_us_p50\":{:.0},\"fanout_us_p99\":{:.0}}}",
            mode.name(),
            self.per_copy_us(self.cpu),
            self.per_copy_us(self.user),
            self.per_copy_us(self.sys),
            self.copies,
            self.received,
            self.unsent,
            q(0.5),
            q(0.99),
        );
    }

    fn print(&self, mode: Mode, n: usize) {
        let per = |d: Duration| self.per_copy_us(d);
        let f = self.fanout_sorted();
        let q = |p: f64| f.get(((f.len() as f64 - 1.0) * p) as usize).copied();
        println!(
            "udp_floor: {:<10} 1 -> {n:>4}: {:.2} µs CPU per copy (user {:.2}, system {:.2}) | {} copies, {:.1} per wake-up, {:.3} % not received, {} not sent | fan-out per wake-up p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            mode.name(),
            per(self.cpu),
            per(self.user),
            per(self.sys),
            self.copies,
            self.copies as f64 / self.wakeups.max(1) as f64,
            100.0 * (self.copies.saturating_sub(self.received)) as f64 / self.copies.max(1) as f64,
            self.unsent,
            q(0.5).unwrap_or(0.0),
            q(0.99).unwrap_or(0.0),
            f.last().copied().unwrap_or(0.0),
        );
    }
}

/// Keeps the calling thread on one CPU.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn thread_user_sys() -> (Duration, Duration) {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr());
        ru.assume_init()
    };
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (d(ru.ru_utime), d(ru.ru_stime))
}

fn run(
    mode: Mode,
    n: usize,
    pps: f64,
    measure: Duration,
    pin: bool,
    ips: Ips,
) -> io::Result<Report> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));

    // Receivers: a socket each, drained by tasks on a two-thread runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || {
            if pin {
                pin_to(1)
            }
        })
        .enable_io()
        .build()?;
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        let s = UdpSocket::bind((ips.receivers, 0))?;
        s.set_nonblocking(true)?;
        addrs.push(s.local_addr()?);
        let received = received.clone();
        let _guard = rt.enter();
        let s = tokio::net::UdpSocket::from_std(s)?;
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_128_GCM, &[7; 16]).expect("an AES-128 key"),
        );
        rt.spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                if s.readable().await.is_err() {
                    return;
                }
                while let Ok(len) = s.try_recv(&mut buf) {
                    // As much work as a light subscriber's SRTP open (AES-128-GCM over the
                    // datagram), so the receivers are as busy as the load generator's.
                    let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
                    let _ = key.seal_in_place_separate_tag(
                        nonce,
                        aead::Aad::from(&[0u8; 12]),
                        &mut buf[12..len.max(12)],
                    );
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    let relay = UdpSocket::bind((ips.relay, 0))?;
    relay.set_nonblocking(true)?;
    let relay_addr = relay.local_addr()?;
    let warmup = Duration::from_secs(1);

    let relay_stop = stop.clone();
    let relay_received = received.clone();
    let relay_thread = std::thread::spawn(move || {
        if pin {
            pin_to(0);
        }
        relay_loop(
            relay,
            mode,
            &addrs,
            warmup,
            measure,
            &relay_stop,
            &relay_received,
        )
    });

    // The publisher.
    let publisher = UdpSocket::bind((ips.receivers, 0))?;
    let per_wake = if mode == Mode::Paced { 1 } else { FRAME };
    let interval = Duration::from_secs_f64(per_wake as f64 / pps);
    let mut payload = [0x5au8; SIZE];
    let mut seq = 0u64;
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < warmup + measure + Duration::from_millis(200) {
        for _ in 0..per_wake {
            payload[..8].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
            publisher.send_to(&payload, relay_addr)?;
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let report = relay_thread.join().expect("relay thread")?;
    rt.shutdown_background();
    Ok(report)
}

fn relay_loop(
    socket: UdpSocket,
    mode: Mode,
    to: &[SocketAddr],
    warmup: Duration,
    measure: Duration,
    stop: &AtomicBool,
    received: &AtomicU64,
) -> io::Result<Report> {
    let fd = socket.as_raw_fd();
    let names: Vec<socket2::SockAddr> = to.iter().map(|a| socket2::SockAddr::from(*a)).collect();
    let mut bufs = vec![[0u8; SIZE + 100]; RX_BATCH];
    let mut rx_iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY (all the zeroed structs below): plain C structs, all-zero is a valid value.
    let mut rx_msgs: Vec<libc::mmsghdr> = rx_iov
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let cap = RX_BATCH * to.len();
    let mut tx_iov: Vec<libc::iovec> = Vec::with_capacity(cap);
    let mut tx_msgs: Vec<libc::mmsghdr> = Vec::with_capacity(cap);
    // One UDP_SEGMENT control message per destination, for the GSO mode.
    let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = vec![0u8; cmsg_space * to.len()];
    for c in control.chunks_mut(cmsg_space) {
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_control = c.as_mut_ptr().cast();
        h.msg_controllen = cmsg_space;
        // SAFETY: the control buffer is CMSG_SPACE bytes for one u16.
        unsafe {
            let cm = libc::CMSG_FIRSTHDR(&h);
            (*cm).cmsg_level = libc::SOL_UDP;
            (*cm).cmsg_type = libc::UDP_SEGMENT;
            (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), SIZE as u16);
        }
    }

    let start = Instant::now();
    let mut measuring = false;
    let mut cpu0 = Duration::ZERO;
    let (mut user0, mut sys0) = (Duration::ZERO, Duration::ZERO);
    let mut received0 = 0;
    let mut report = Report {
        copies: 0,
        wakeups: 0,
        cpu: Duration::ZERO,
        user: Duration::ZERO,
        sys: Duration::ZERO,
        received: 0,
        unsent: 0,
        fanout_us: Vec::new(),
    };
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let woke = Instant::now();
        let elapsed = woke - start;
        if !measuring && elapsed >= warmup {
            measuring = true;
            cpu0 = thread_cpu();
            (user0, sys0) = thread_user_sys();
            received0 = received.load(Ordering::Relaxed);
        }
        if measuring && elapsed >= warmup + measure {
            report.cpu = thread_cpu() - cpu0;
            let (u, s) = thread_user_sys();
            report.user = u - user0;
            report.sys = s - sys0;
            // Let the receivers take in what is still on its way.
            std::thread::sleep(Duration::from_millis(100));
            report.received = received.load(Ordering::Relaxed) - received0;
            return Ok(report);
        }
        // SAFETY: RX_BATCH messages, each with one iovec into `bufs`.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                rx_msgs.as_mut_ptr(),
                RX_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got <= 0 {
            continue;
        }
        let got = got as usize;
        tx_iov.clear();
        tx_msgs.clear();
        match mode {
            Mode::Paced | Mode::Frames => {
                for (i, m) in rx_msgs[..got].iter().enumerate() {
                    for _ in to {
                        tx_iov.push(libc::iovec {
                            iov_base: bufs[i].as_mut_ptr().cast(),
                            iov_len: m.msg_len as usize,
                        });
                    }
                }
                for (k, iov) in tx_iov.iter_mut().enumerate() {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    let name = &names[k % to.len()];
                    m.msg_hdr.msg_name = name.as_ptr().cast_mut().cast();
                    m.msg_hdr.msg_namelen = name.len();
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    tx_msgs.push(m);
                }
            }
            Mode::FramesGso => {
                // One send per receiver carrying every datagram of the wake-up as segments.
                for _ in to {
                    for (i, m) in rx_msgs[..got].iter().enumerate() {
                        tx_iov.push(libc::iovec {
                            iov_base: bufs[i].as_mut_ptr().cast(),
                            iov_len: m.msg_len as usize,
                        });
                    }
                }
                for (k, iovs) in tx_iov.chunks_mut(got).enumerate() {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    let name = &names[k];
                    m.msg_hdr.msg_name = name.as_ptr().cast_mut().cast();
                    m.msg_hdr.msg_namelen = name.len();
                    m.msg_hdr.msg_iov = iovs.as_mut_ptr();
                    m.msg_hdr.msg_iovlen = got;
                    if got > 1 {
                        m.msg_hdr.msg_control = control[k * cmsg_space..].as_mut_ptr().cast();
                        m.msg_hdr.msg_controllen = cmsg_space;
                    }
                    tx_msgs.push(m);
                }
            }
        }
        let mut unsent = 0;
        for chunk in tx_msgs.chunks_mut(TX_CHUNK) {
            // SAFETY: every message points at live names, iovecs and buffers.
            let sent = unsafe { libc::sendmmsg(fd, chunk.as_mut_ptr(), chunk.len() as u32, 0) };
            unsent += chunk.len() - sent.max(0) as usize;
        }
        if measuring {
            let copies = got * to.len();
            report.copies += copies as u64;
            report.wakeups += 1;
            report.unsent += (unsent * if mode == Mode::FramesGso { got } else { 1 }) as u64;
            report.fanout_us.push(woke.elapsed().as_secs_f64() * 1e6);
        }
    }
    Err(io::Error::other(
        "stopped before the measuring window ended",
    ))
}
