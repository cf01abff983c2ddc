//! The shard's loop: one thread owns a media port (UDP, and its ICE-TCP connections), the relay
//! connections of the rooms pinned to it, and their timers. Datagrams, commands and timers in;
//! after each, every connection with output is drained and the send batch handed to the kernel.

use super::*;

impl MediaCore {
    /// The DTLS-SRTP profiles new connections accept (default [`srtp::PROFILES`]); each is
    /// sealed by the relay itself.
    pub fn set_srtp_profiles(
        &mut self,
        profiles: Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>,
    ) {
        if !profiles.is_empty() {
            self.srtp_profiles = profiles;
        }
    }

    /// Offer a passive TCP candidate on `port` (ICE-TCP) in every new connection's answer.
    /// At most `n` connections from one IP address in their ICE/DTLS handshake at once.
    pub fn set_max_handshakes_per_ip(&mut self, n: usize) {
        self.max_handshakes_per_ip = n;
    }

    pub fn set_tcp_port(&mut self, port: u16) {
        self.tcp_port = Some(port);
    }

    /// Takes over the media port's `socket` (registered with the current tokio runtime).
    pub fn new(
        socket: std::net::UdpSocket,
        advertised: Vec<SocketAddr>,
        metrics: Arc<Metrics>,
        sink: Arc<dyn ClientSink>,
    ) -> std::io::Result<MediaCore> {
        let local_addr = socket.local_addr()?;
        Ok(MediaCore {
            socket: MediaSocket::new(socket)?,
            out: Outbox::default(),
            local_addr,
            advertised,
            metrics,
            sink,
            peers: Peers::default(),
            router: Router::default(),
            timers: Default::default(),
            deadlines: FxHashMap::default(),
            rx_at: Instant::now(),
            scratch_keys: Vec::new(),
            crypto: srtp::KeyCapture::new(),
            srtp_profiles: srtp::PROFILES.to_vec(),
            stun_limiter: guard::SourceLimiter::new(
                guard::STUN_PER_SOURCE_RATE,
                guard::STUN_PER_SOURCE_BURST,
            ),
            scratch: Vec::new(),
            left: HashMap::new(),
            next_consent_sweep: Instant::now() + Duration::from_secs(1),
            tcp_port: None,
            tcp: FxHashMap::default(),
            reported_tables: Default::default(),
            max_handshakes_per_ip: usize::MAX,
            rx_tcp: false,
        })
    }

    /// Run until `shutdown`: datagrams, commands and timers in; transmits and events out.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut control: mpsc::UnboundedReceiver<Command>,
        mut tcp: Option<mpsc::Receiver<net::tcp::TcpEvent>>,
        shutdown: CancellationToken,
    ) {
        info!(addr = %self.local_addr, "media port (UDP) listening: STUN and relay");
        let mut rx = RxBatch::new(&self.socket);
        info!(
            gso_segments = self.socket.max_gso_segments(),
            "media port batching: up to {RX_BATCH} receive buffers per syscall"
        );
        // One timer for the loop, moved when the next deadline changes (a new one every turn
        // would be registered in and removed from tokio's timer wheel at every wake-up).
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
            self.next_deadline() + TIMER_SLACK,
        ));
        tokio::pin!(sleep);
        loop {
            // Timers are due whatever woke us: a busy socket must not starve them.
            self.handle_timeouts(Instant::now());
            self.flush();
            // Every command sent before the `Leave`s seen so far has been handled.
            if !self.left.is_empty() && commands.is_empty() {
                self.left.clear();
            }
            let deadline = tokio::time::Instant::from_std(self.next_deadline() + TIMER_SLACK);
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(c) = control.recv() => self.handle_command(c, Instant::now()),
                Some(ev) = async {
                    match tcp.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.handle_tcp(ev, Instant::now()),
                c = commands.recv() => match c {
                    Some(c) => self.handle_command(c, Instant::now()),
                    None => break,
                },
                r = self.socket.readable() => match r.and_then(|()| self.socket.try_recv(&mut rx)) {
                    Ok(_) => {
                        let now = Instant::now();
                        for (i, (datagram, from, to)) in rx.received().enumerate() {
                            self.handle_datagram(datagram, from, to, now);
                            if (i + 1) % FLUSH_EVERY == 0 {
                                self.flush();
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "media port receive error"),
                },
                _ = &mut sleep => {}
            }
        }
        for p in self.peers.values_mut() {
            let _ = p.pc.close();
        }
    }

    /// The earliest timer of any peer (or a second from now).
    pub(super) fn next_deadline(&self) -> Instant {
        self.timers
            .first()
            .map(|(t, _)| *t)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
    }

    /// Re-read one peer's next timer after it was driven (only peers that did something change).
    pub(super) fn refresh_timer(&mut self, key: PeerKey) {
        if let Some(old) = self.deadlines.remove(&key) {
            self.timers.remove(&(old, key));
        }
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let next = [
            p.pc.poll_timeout(),
            p.pli_at.iter().min().copied(),
            p.parked_deadline,
            p.downlink.padding_wake(Instant::now()),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(t) = next {
            self.deadlines.insert(key, t);
            self.timers.insert((t, key));
        }
    }

    /// Fire the timers that are due (only those peers: no scan of every peer).
    pub(super) fn handle_timeouts(&mut self, now: Instant) {
        if now >= self.next_consent_sweep {
            self.next_consent_sweep = now + Duration::from_secs(1);
            self.expire_consent(now);
            self.dynacast();
            self.observe_estimates(now);
            self.report_tables();
        }
        while let Some(&(t, k)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            self.deadlines.remove(&k);
            let Some(p) = self.peers.get_mut(&k) else {
                continue;
            };
            if p.pc.poll_timeout().is_some_and(|t| t <= now) {
                let _ = p.pc.handle_timeout(now);
                take_srtp_keys(p, &self.metrics);
            }
            if p.pli_at.iter().any(|t| *t <= now) {
                p.pli_at.retain(|t| *t > now);
                request_keyframes(p, now);
                self.metrics.keyframe_requests_new_subscriber.inc();
            }
            let (probing, parked) = (
                p.downlink.padding_wake(now).is_some(),
                p.parked_deadline.is_some_and(|t| t <= now),
            );
            if probing {
                self.pad(k, now);
            }
            if parked {
                self.router
                    .expire_parked(&mut self.peers, &mut self.out, k, now);
            }
            // Draining it re-reads its next timer.
            self.out.needs_poll.insert(k);
        }
    }

    /// Dynacast: each publisher is told which of its simulcast layers nobody takes or wants (to
    /// pause them: no encoding, no upload) and which are wanted again. Checked every second.
    pub(super) fn dynacast(&mut self) {
        for (key, p) in self.peers.iter_mut() {
            for (track_id, t) in p.published.iter_mut().filter(|(_, t)| t.simulcast()) {
                let needed = self.router.layers_needed(*key, track_id, t.layers.len());
                let paused: Vec<bool> = needed.iter().map(|n| !n).collect();
                if paused == t.paused {
                    continue;
                }
                let count = |v: &[bool]| v.iter().filter(|p| **p).count() as i64;
                self.metrics
                    .layers_paused
                    .add(count(&paused) - count(&t.paused));
                let rids: Vec<&str> = t
                    .layers
                    .iter()
                    .zip(&paused)
                    .filter(|(_, p)| **p)
                    .map(|(l, _)| l.rid.as_str())
                    .collect();
                debug!(user = %p.user_id, track = %track_id, paused = ?rids, "simulcast layers paused");
                self.sink.send_to(
                    &p.user_id,
                    json!({"type": "layers", "streamType": t.ty, "paused": rids}),
                );
                self.router.forget_paused(*key, track_id, &paused);
                t.paused = paused;
            }
        }
    }

    /// This shard's table sizes into `ferry_table_entries` (as changes: the gauges are the sum
    /// over shards). Once a second.
    pub(super) fn report_tables(&mut self) {
        let (users, ufrags, addrs) = self.peers.index_sizes();
        let sizes = [
            self.peers.len(),
            users,
            ufrags,
            addrs,
            self.router.tracks.values().map(|t| t.len()).sum(),
            self.router
                .tracks
                .values()
                .flat_map(|t| t.values())
                .map(|t| t.routes.len())
                .sum(),
            self.router.subscription_count(),
            self.router.quality_count(),
            self.timers.len(),
            self.left.len(),
            self.tcp.len(),
        ];
        for (i, (table, n)) in crate::metrics::MEDIA_TABLES.iter().zip(sizes).enumerate() {
            let n = n as i64;
            let delta = n - self.reported_tables[i];
            if delta != 0 {
                self.metrics.tables.with_label_values(&[table]).add(delta);
                self.reported_tables[i] = n;
            }
        }
    }

    /// Forget the addresses no authenticated check came from within [`CONSENT_TIMEOUT`].
    pub(super) fn expire_consent(&mut self, now: Instant) {
        let socket = &mut self.socket;
        self.peers.expire_consent(now, |a| socket.forget_source(a));
    }

    /// The local address a datagram that arrived at `to` was sent to, as the connections know
    /// it: on a socket bound to one address, that address; on a wildcard socket, the advertised
    /// candidate with that IP, or (behind a 1:1 NAT, `announce` set) the advertised one of the
    /// same family; what rtc's ICE agent checks against its local candidates.
    pub(super) fn local_for(&self, to: Option<IpAddr>, from: &SocketAddr, tcp: bool) -> SocketAddr {
        if !tcp && !self.socket.is_wildcard() {
            return self.local_addr;
        }
        let port = match (tcp, self.tcp_port) {
            (true, Some(p)) => p,
            _ => self.local_addr.port(),
        };
        let same_ip = to.and_then(|ip| self.advertised.iter().find(|a| a.ip() == ip));
        let same_family = || {
            self.advertised
                .iter()
                .find(|a| a.is_ipv4() == from.is_ipv4())
        };
        let ip = same_ip
            .or_else(same_family)
            .map(|a| a.ip())
            .or(to)
            .unwrap_or(self.local_addr.ip());
        SocketAddr::new(ip, port)
    }

    /// What a client connected over TCP did (see [`net::tcp`]).
    pub(super) fn handle_tcp(&mut self, ev: net::tcp::TcpEvent, now: Instant) {
        match ev {
            net::tcp::TcpEvent::Opened { peer, writer, .. } => {
                self.tcp.insert(peer, writer);
            }
            net::tcp::TcpEvent::Frame { peer, local, data } => {
                self.rx_tcp = true;
                self.handle_datagram(&data, peer, Some(local.ip()), now);
                self.rx_tcp = false;
            }
            net::tcp::TcpEvent::Closed { peer } => {
                self.tcp.remove(&peer);
                self.peers.forget_address(&peer);
            }
        }
        self.flush();
    }

    /// Queue `datagram` for the client connected over TCP from `to`; false when `to` is not one.
    pub(super) fn send_tcp(
        tcp: &FxHashMap<SocketAddr, mpsc::Sender<bytes::Bytes>>,
        metrics: &Metrics,
        to: SocketAddr,
        datagram: &[u8],
    ) -> bool {
        let Some(w) = tcp.get(&to) else {
            return false;
        };
        let sent = net::tcp::frame(datagram).is_some_and(|f| w.try_send(f).is_ok());
        if !sent {
            metrics
                .media_dropped
                .with_label_values(&["tcp_overflow"])
                .inc();
        }
        true
    }

    /// A datagram from `from` to our `to` (wildcard sockets), or a frame of an ICE-TCP client:
    /// to its connection ([`Self::demux`]); media of a stream the own path opens is opened and
    /// forwarded here, the rest goes through the connection (authenticated first).
    pub(super) fn handle_datagram(
        &mut self,
        buf: &[u8],
        from: SocketAddr,
        to: Option<IpAddr>,
        now: Instant,
    ) {
        self.rx_at = now;
        let drop = |m: &Metrics, reason: &str| m.media_dropped.with_label_values(&[reason]).inc();
        let kind = net::classify(buf);
        let key = match self.demux(kind, buf, from, to, now) {
            Ok(Some(k)) => k,
            Ok(None) => return,
            Err(reason) => return drop(&self.metrics, reason),
        };
        let transport = TransportContext {
            local_addr: self.local_for(to, &from, self.rx_tcp),
            peer_addr: from,
            ecn: None,
            transport_protocol: if self.rx_tcp {
                TransportProtocol::TCP
            } else {
                TransportProtocol::UDP
            },
        };
        let Some(p) = self.peers.get_mut(&key) else {
            return drop(&self.metrics, "unknown_peer");
        };
        // A media packet of a stream the own path opens (see `Peer::inbound`).
        if let Some(rtp @ (_, ssrc, _)) = srtp::rtp_header(buf)
            && let Some(i) = p.inbound.iter().position(|(s, _)| *s == ssrc)
        {
            let track = p.inbound[i].1.clone();
            match p.open_own(buf, rtp, transport, now) {
                Ok(packet) => {
                    self.out.counts.opened[0] += 1;
                    self.forward(key, &track, packet, now);
                }
                Err(reason) => drop(&self.metrics, reason),
            }
            return;
        }
        // SRTP or SRTCP for rtc: only of SSRCs whose first packet authenticated (rtc would make
        // a context for any SSRC it is shown, before checking the tag).
        if kind == Kind::RtpRtcp
            && let Err(reason) = p.admission.admit(buf, p.opener.as_mut(), &mut self.scratch)
        {
            if let Some(n) = p.refusals.note(now) {
                warn!(user = %p.user_id, %from, reason, refused = n,
                      "media packets refused before the connection (not authentic, or too many SSRCs)");
            }
            return drop(&self.metrics, reason);
        }
        let msg = TaggedBytesMut {
            now,
            transport,
            message: BytesMut::from(buf),
        };
        if let Err(e) = p.pc.handle_read(msg) {
            debug!(user = %p.user_id, error = %e, "datagram refused by the connection");
            drop(&self.metrics, "undecryptable");
        }
        take_srtp_keys(p, &self.metrics);
        self.out.needs_poll.insert(key);
    }

    /// Which connection a datagram belongs to: STUN checks by their ufrag (learning the address
    /// when the check is signed with that connection's password), everything else by the
    /// address. `Ok(None)`: answered here (a plain binding request); `Err`: the drop reason.
    fn demux(
        &mut self,
        kind: Kind,
        buf: &[u8],
        from: SocketAddr,
        to: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<PeerKey>, &'static str> {
        match kind {
            Kind::Stun => {}
            Kind::Dtls | Kind::RtpRtcp => {
                return self.peers.by_addr(&from).map(Some).ok_or("unknown_peer");
            }
            Kind::Unknown => return Err("malformed"),
        }
        // Requests cost a parse and a reply or an HMAC: each source address gets its share,
        // counted before anything is parsed (a flood then costs a hash per datagram). An address
        // a connection already uses is not counted: a flood from its IP (the same NAT) must not
        // cut its consent checks.
        if stun::is_request(buf)
            && self.peers.by_addr(&from).is_none()
            && !self.stun_limiter.allow(from.ip(), now)
        {
            return Err("rate_limited");
        }
        match stun::handle(buf, from) {
            stun::StunAction::Reply(bytes) => {
                self.metrics.stun_bindings.inc();
                if self.rx_tcp {
                    Self::send_tcp(&self.tcp, &self.metrics, from, &bytes);
                } else if self.socket.try_send_one_from(from, to, &bytes).is_err() {
                    return Err("send_buffer_full");
                }
                Ok(None)
            }
            stun::StunAction::Peer(ufrag) => {
                let k = self.peers.by_ufrag(&ufrag).ok_or("unknown_peer")?;
                let p = self.peers.get(&k).ok_or("unknown_peer")?;
                // The ufrag is in every check in the clear: only a check signed with our
                // password shows that the sender has the SDP.
                if !stun::authentic(buf, &p.pwd) {
                    return Err("unauthenticated");
                }
                // A connection's first address starts its handshake: one address may have only
                // so many connections in theirs at once.
                if p.addrs.is_empty()
                    && !p.connected
                    && self.peers.handshakes_from(from.ip()) >= self.max_handshakes_per_ip
                {
                    self.metrics
                        .limit_refusals
                        .with_label_values(&["handshakes_per_ip"])
                        .inc();
                    return Err("rate_limited");
                }
                self.peers.learn_address(k, from, now);
                if let Some(local) = to {
                    self.socket.set_source(from, local);
                }
                Ok(Some(k))
            }
            stun::StunAction::ByAddress => {
                self.peers.by_addr(&from).map(Some).ok_or("unexpected_stun")
            }
            stun::StunAction::Drop(reason) => Err(reason),
        }
    }

    /// Drain every connection that may have output: transmits, events, received media.
    pub(super) fn flush(&mut self) {
        // The key list is reused: no allocation per datagram.
        let mut keys = std::mem::take(&mut self.scratch_keys);
        while !self.out.needs_poll.is_empty() {
            keys.extend(self.out.needs_poll.drain());
            for k in keys.drain(..) {
                self.drain_peer(k);
            }
        }
        self.scratch_keys = keys;
        self.send_batch();
    }

    /// Hand this drain's datagrams to the kernel. Never waits on the socket: what a full send
    /// buffer does not take is dropped (counted) rather than stalling every other peer.
    pub(super) fn send_batch(&mut self) {
        if !self.tcp.is_empty() && !self.out.tx.is_empty() {
            let (tcp, metrics) = (&self.tcp, &self.metrics);
            self.out
                .tx
                .take_matching(|to, d| Self::send_tcp(tcp, metrics, to, d));
        }
        if !self.out.tx.is_empty() {
            let out = self.socket.send(&mut self.out.tx);
            if out.would_block > 0 {
                self.metrics
                    .media_dropped
                    .with_label_values(&["send_buffer_full"])
                    .inc_by(out.would_block as u64);
            }
            if let Some(e) = out.last_error {
                debug!(error = %e, datagrams = out.failed, "media send failed");
            }
        }
        self.out.counts.publish(&self.metrics);
        if !self.out.forwarded_rx.is_empty() {
            let sent = Instant::now();
            for rx_at in self.out.forwarded_rx.drain(..) {
                self.metrics
                    .forward_latency
                    .observe(sent.saturating_duration_since(rx_at).as_secs_f64());
            }
        }
    }

    pub(super) fn drain_peer(&mut self, key: PeerKey) {
        let now = Instant::now();
        // Events first: they may add tracks and routes.
        loop {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            let Some(ev) = p.pc.poll_event() else { break };
            self.handle_event(key, ev, now);
        }
        // Media in: route to subscribers.
        loop {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            let Some(TaggedRTCMessage { message, .. }) = p.pc.poll_read() else {
                break;
            };
            match message {
                RTCMessage::RtpPacket(_, _) if !p.may_publish => {
                    self.metrics
                        .media_dropped
                        .with_label_values(&["not_publisher"])
                        .inc();
                }
                RTCMessage::RtpPacket(track_id, packet) => {
                    self.out.counts.opened[1] += 1;
                    learn_inbound(p, &track_id, &packet.header);
                    self.forward(key, &track_id, packet, now)
                }
                RTCMessage::RtcpPacket(track_id, packets) => {
                    let lost: Vec<u16> = packets
                        .iter()
                        .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
                        .flat_map(|n| n.nacks.iter().flat_map(|pair| pair.into_iter()))
                        .collect();
                    if !lost.is_empty() {
                        self.retransmit(key, &track_id, &lost, now);
                    }
                    if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                        self.relay_keyframe_request(key, &track_id, now);
                    }
                    for fb in packets.iter().filter_map(|p| {
                        p.as_any()
                            .downcast_ref::<rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc>()
                    }) {
                        self.on_transport_feedback(key, fb, now);
                    }
                    for remb in packets.iter().filter_map(|p| {
                        p.as_any().downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                    }) {
                        self.on_remb(key, remb.bitrate, now);
                    }
                    for (ssrc, lost) in reception_reports(&packets) {
                        self.router
                            .on_reception_report(&self.peers, key, ssrc, lost, now);
                    }
                }
                _ => {}
            }
        }
        // Transmits out.
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        // Queued, sent with everything else of this drain at its end (see `send_batch`).
        while let Some(t) = p.pc.poll_write() {
            // Not STUN (first byte 0-3): DTLS or SRTP, sent on the selected candidate pair.
            if t.message.first().is_some_and(|b| *b > 3) {
                p.remote = Some(t.transport.peer_addr);
            }
            self.out.tx.push(t.transport.peer_addr, &t.message);
        }
        if p.negotiation_needed
            && p.pc.pending_local_description().is_none()
            && p.pc.pending_remote_description().is_none()
        {
            self.negotiate(key, now);
        }
        self.refresh_timer(key);
    }
}

/// How late the loop's own timer may wake after the earliest connection timer. Every wake-up runs
/// the timers that are due, so with media flowing (a paced publisher's packet every few
/// milliseconds) connection timers — RTCP reports, TWCC feedback, NACK scans, keyframe-request
/// throttles — ride on packet wake-ups instead of waking the thread themselves: at 1 -> 10 about
/// half the wake-ups were timers', and a wake-up costs ~20-30 µs of kernel and hypervisor time
/// here (docs/performance.md, "Where the time goes"). Timers fire late by at most this, never early (rtc
/// stamps what it sends with the time it is given).
pub(super) const TIMER_SLACK: Duration = Duration::from_millis(4);

/// Received datagrams handled before what they produced is sent. Larger batches give longer GSO
/// runs per subscriber; smaller ones send the first copies sooner. Measured with `ferry loadgen`,
/// 1 -> 100 (server CPU per forwarded packet): 1: 12.5 us, 4: 8.7 us, 8: 7.7 us, 32: 7.4 us.
pub(super) const FLUSH_EVERY: usize = 8;
