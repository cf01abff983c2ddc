//! A relayed connection: its rtc peer connection made (ICE-lite, DTLS server, the relay's
//! interceptors and candidates), negotiated (the client's offers, the server's offers), its events
//! (tracks published, state), its SRTP keys and addresses, and its end.

use super::*;

impl MediaCore {
    /// What rtc reported of `key`'s connection.
    pub(super) fn handle_event(&mut self, key: PeerKey, ev: RTCPeerConnectionEvent, now: Instant) {
        match ev {
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init))
                if self.on_track_open(key, &init) =>
            {
                self.router.attach_to_subscribers(
                    &mut self.peers,
                    &mut self.out,
                    key,
                    &init.track_id,
                    now,
                );
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id)) => {
                self.unpublish(key, &track_id, now);
            }
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                if let Some(p) = self.peers.get_mut(&key) {
                    on_state_change(p, state, &self.metrics);
                }
            }
            RTCPeerConnectionEvent::OnIceConnectionStateChangeEvent(state) => {
                if let Some(p) = self.peers.get_mut(&key) {
                    debug!(user = %p.user_id, %state, "relay ICE state");
                    p.ice_failed =
                        state == rtc::peer_connection::state::RTCIceConnectionState::Failed;
                }
            }
            _ => {}
        }
    }

    /// rtc opened a track on `key`'s connection: published (and announced to the room) if the
    /// member may publish. True when it is a new published track, to attach to subscribers.
    fn on_track_open(
        &mut self,
        key: PeerKey,
        init: &rtc::peer_connection::event::RTCTrackEventInit,
    ) -> bool {
        let Some(p) = self.peers.get_mut(&key) else {
            return false;
        };
        let rid = init.rid.clone().unwrap_or_default();
        // rtc reports a track again after each renegotiation, and once per simulcast layer: it
        // is routed already (keep its layers' SSRCs current, for keyframe requests and for
        // telling the layers' packets apart).
        if let Some(t) = p.published.get_mut(&init.track_id) {
            if rid.is_empty() {
                // Without simulcast a new SSRC replaces the one layer.
                t.layers.truncate(1);
                if let Some(l) = t.layers.first_mut() {
                    l.ssrc = init.ssrc;
                }
            } else {
                learn_layer(&mut t.layers, &rid, init.ssrc);
                info!(user = %p.user_id, track = %init.track_id, %rid, layers = t.layers.len(), "simulcast layer published to the relay");
            }
            self.router.refresh_ext_maps(&mut self.peers, key);
            return false;
        }
        if !p.may_publish {
            warn!(user = %p.user_id, track = %init.track_id,
                  "track refused: the member's token does not grant publish");
            return false;
        }
        let Some(receiver) = p.pc.rtp_receiver(init.receiver_id) else {
            return false;
        };
        let track = receiver.track();
        let kind = track.kind();
        let Some(codec) = track.codec(init.ssrc).cloned() else {
            warn!(user = %p.user_id, "published track without a codec");
            return false;
        };
        let client_stream = init.stream_ids.first().cloned().unwrap_or_default();
        let ty = p
            .stream_types
            .get(&client_stream)
            .cloned()
            .unwrap_or_else(|| "cam".into());
        let stream_id = format!("{}~{}", p.user_id, ty);
        info!(user = %p.user_id, track = %init.track_id, mime = %codec.mime_type, %stream_id, "track published to the relay");
        // A stream the own path opens that now belongs to this track.
        for (ssrc, track) in p.inbound.iter_mut() {
            if *ssrc == init.ssrc {
                *track = Arc::from(init.track_id.as_str());
            }
        }
        self.sink.send_to_room(
            &p.room_id,
            &p.user_id,
            json!({"type": "track", "event": "published", "userId": p.user_id,
                   "streamType": ty, "kind": kind_name(kind)}),
        );
        p.published.insert(
            init.track_id.clone(),
            Published {
                kind,
                codec,
                layers: vec![Layer {
                    rid,
                    ssrc: init.ssrc,
                }],
                receiver_id: init.receiver_id,
                paused: Vec::new(),
                ty,
                stream_id,
            },
        );
        true
    }

    /// `publisher`'s track went: announced to the room; its subscribers' feeds wait for a
    /// republish ([`Router::unpublish`]).
    pub(super) fn unpublish(&mut self, publisher: PeerKey, track_id: &str, now: Instant) {
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        let Some(t) = p.published.remove(track_id) else {
            return;
        };
        let paused = t.paused.iter().filter(|p| **p).count() as i64;
        self.metrics.layers_paused.sub(paused);
        self.sink.send_to_room(
            &p.room_id,
            &p.user_id,
            json!({"type": "track", "event": "unpublished", "userId": p.user_id,
                   "streamType": t.ty, "kind": kind_name(t.kind)}),
        );
        self.router
            .unpublish(&mut self.peers, &mut self.out, publisher, track_id, now);
    }

    /// Send the server's offer on `key`'s connection (its feeds changed).
    pub(super) fn negotiate(&mut self, key: PeerKey, now: Instant) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        p.negotiation_needed = false;
        let offer = match p.pc.create_offer(None) {
            Ok(o) => o,
            Err(e) => {
                warn!(user = %p.user_id, error = %e, "cannot create an offer");
                return;
            }
        };
        if let Err(e) = p.pc.set_local_description(now, offer) {
            warn!(user = %p.user_id, error = %e, "cannot set our offer");
            return;
        }
        let sdp =
            p.pc.local_description()
                .map(|d| without_rtcp_candidates(&d.sdp))
                .unwrap_or_default();
        let meta = json!({ "streams": p.stream_meta });
        self.sink.send_to(
            &p.user_id,
            json!({ "type": "offer", "from": SERVER_ID, "sdp": sdp, "meta": meta }),
        );
        self.out.needs_poll.insert(key);
    }

    /// The client's answer to the server's offer.
    pub(super) fn apply_answer(&mut self, user_id: &str, sdp: String, now: Instant) {
        let Some(k) = self.peers.key_of(user_id) else {
            return;
        };
        let p = self.peers.get_mut(&k).expect("indexed peer exists");
        let res =
            RTCSessionDescription::answer(sdp).and_then(|d| p.pc.set_remote_description(now, d));
        if let Err(e) = res {
            warn!(user = %user_id, error = %e, "client answer refused");
        }
        self.out.needs_poll.insert(k);
        self.router.refresh_ext_maps(&mut self.peers, k);
    }

    /// A client's offer: its connection made if it has none (or has one in another room),
    /// answered; a new connection receives what its member subscribed to.
    pub(super) fn handle_offer(
        &mut self,
        (user_id, room_id): (String, String),
        sdp: String,
        meta: Option<Value>,
        may_publish: bool,
        now: Instant,
    ) {
        // A client that moved to another room starts afresh.
        if let Some(k) = self.peers.key_of(&user_id)
            && self.peers.get(&k).is_some_and(|p| p.room_id != room_id)
        {
            self.remove_peer(&user_id, now);
        }
        let key = match self.peers.key_of(&user_id) {
            Some(k) => k,
            None => match self.new_peer(&user_id, &room_id, may_publish, now) {
                Ok(k) => k,
                Err(e) => {
                    warn!(user = %user_id, error = %e, "cannot create the relay connection");
                    return;
                }
            },
        };
        let p = self.peers.get_mut(&key).expect("peer exists");
        let fresh = p.pc.remote_description().is_none();
        if let Some(streams) = meta
            .as_ref()
            .and_then(|m| m.get("streams"))
            .and_then(|s| s.as_object())
        {
            for (sid, ty) in streams {
                if let Some(ty) = ty.as_str() {
                    p.stream_types.insert(sid.clone(), ty.to_string());
                }
            }
        }
        if p.pc.pending_local_description().is_some() {
            // Our offer crossed theirs: we are impolite, they roll back and answer ours.
            debug!(user = %user_id, "ignoring a client offer that crossed ours");
            return;
        }
        let reply = match answer(p, sdp, now) {
            Ok(sdp) => {
                debug!(user = %user_id, %sdp, "relay answer");
                json!({ "type": "answer", "from": SERVER_ID, "sdp": sdp,
                        "meta": { "streams": p.stream_meta } })
            }
            Err(e) => {
                warn!(user = %user_id, error = %e, "client offer refused");
                let reason = format!("offer refused: {e}");
                self.sink.send_to(
                    &user_id,
                    json!({ "type": "bye", "from": SERVER_ID, "reason": reason }),
                );
                return;
            }
        };
        self.sink.send_to(&user_id, reply);
        self.out.needs_poll.insert(key);
        self.router.refresh_ext_maps(&mut self.peers, key);
        if fresh {
            self.router
                .attach_existing(&mut self.peers, &mut self.out, key, now);
        }
    }

    /// A relay connection for `user_id` in `room_id`.
    pub(super) fn new_peer(
        &mut self,
        user_id: &str,
        room_id: &str,
        may_publish: bool,
        now: Instant,
    ) -> rtc::shared::error::Result<PeerKey> {
        let credentials = (self.peers.fresh_ufrag(), random_token(24));
        let (mut pc, receive_side) = build_connection(
            &self.crypto,
            self.srtp_profiles.clone(),
            &self.metrics,
            credentials.clone(),
            now,
        )?;
        for addr in &self.advertised {
            pc.add_local_candidate(net::host_candidate(*addr)?)?;
        }
        if let Some(port) = self.tcp_port {
            for addr in &self.advertised {
                let addr = SocketAddr::new(addr.ip(), port);
                pc.add_local_candidate(net::tcp_host_candidate(addr)?)?;
            }
        }
        let (ufrag, pwd) = credentials;
        let peer = Peer::new(user_id, room_id, pc, receive_side, ufrag, pwd, may_publish);
        let key = self.peers.insert(peer);
        self.metrics.relay_connections.inc();
        self.metrics
            .peer_connections
            .with_label_values(&["new"])
            .inc();
        info!(user = %user_id, room = %room_id, "relay connection created");
        Ok(key)
    }

    /// Close `user_id`'s relay connection: its tracks unpublished, its copies of others' gone.
    pub(super) fn remove_peer(&mut self, user_id: &str, now: Instant) {
        let Some(key) = self.peers.key_of(user_id) else {
            return;
        };
        let tracks: Vec<String> = self
            .peers
            .get(&key)
            .map(|p| p.published.keys().cloned().collect())
            .unwrap_or_default();
        for t in tracks {
            self.unpublish(key, &t, now);
        }
        self.router.remove_connection(key);
        let socket = &mut self.socket;
        if let Some(mut p) = self.peers.remove(key, |a| socket.forget_source(a)) {
            let _ = p.pc.close();
            self.metrics.relay_connections.dec();
            self.metrics
                .peer_connections
                .with_label_values(&[&p.state])
                .dec();
            info!(user = %user_id, "relay connection closed");
        }
        self.out.needs_poll.remove(&key);
        if let Some(t) = self.deadlines.remove(&key) {
            self.timers.remove(&(t, key));
        }
    }
}

/// Answer the client offer `sdp` on `p`'s connection: the answer's SDP, as sent.
fn answer(p: &mut Peer, sdp: String, now: Instant) -> rtc::shared::error::Result<String> {
    let offer = RTCSessionDescription::offer(sdp)?;
    p.pc.set_remote_description(now, offer)?;
    let answer = p.pc.create_answer(None)?;
    p.pc.set_local_description(now, answer)?;
    Ok(p.pc
        .local_description()
        .map(|d| without_rtcp_candidates(&d.sdp))
        .unwrap_or_default())
}

/// The connection's state changed: kept as its metric label; failures counted as ICE or DTLS.
fn on_state_change(p: &mut Peer, state: RTCPeerConnectionState, metrics: &Metrics) {
    info!(user = %p.user_id, %state, "relay connection state");
    let label = state.to_string();
    p.connected = state == RTCPeerConnectionState::Connected;
    if p.connected && p.sealer.is_none() && !p.sealed_by_rtc {
        // DTLS done without captured AES-GCM keys (an AES-CM profile): rtc seals.
        p.sealed_by_rtc = true;
        metrics.srtp_sealed_by_rtc.inc();
        metrics.srtp_profiles.with_label_values(&["unknown"]).inc();
    }
    metrics
        .peer_connections
        .with_label_values(&[&p.state])
        .dec();
    metrics.peer_connections.with_label_values(&[&label]).inc();
    p.state = label;
    if state == RTCPeerConnectionState::Failed {
        metrics
            .media_dropped
            .with_label_values(&["connection_failed"])
            .inc();
        if p.ice_failed {
            metrics.failures_ice.inc();
        } else {
            metrics.failures_dtls.inc();
        }
    }
}

/// A relay connection's rtc peer: ICE-lite with `(ufrag, pwd)`, the DTLS server, the relay's
/// codecs, forwarded extensions and interceptors; and its receiving interceptors, which the own
/// packet-in path also feeds.
pub(super) fn build_connection(
    crypto: &Arc<srtp::KeyCapture>,
    srtp_profiles: Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>,
    metrics: &Arc<Metrics>,
    (ufrag, pwd): (String, String),
    now: Instant,
) -> rtc::shared::error::Result<(RTCPeerConnection, ReceiveSide)> {
    let setting_engine = SettingEngineBuilder::new()
        .with_lite(true)
        .with_answering_dtls_role(RTCDtlsRole::Server)
        .with_ice_credentials(ufrag, pwd)
        .with_crypto_provider(crypto.clone())
        .with_srtp_protection_profiles(srtp_profiles)
        // The relay's data channel only opens the connection (the SDK creates it so that a
        // member who publishes nothing still negotiates); nothing is sent on it. rtc keeps a
        // working buffer of the negotiated message size per connection, zero-filled at the
        // start (64 KiB by default), and lets a peer fill a 1 MiB receive window.
        .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(SCTP_MAX_MESSAGE_BYTES))
        .with_sctp_max_receive_buffer_size(SCTP_RECEIVE_WINDOW_BYTES)
        .build();
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs()?;
    for (uri, kind) in FORWARDED_EXTENSIONS {
        media_engine.register_header_extension(
            rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability {
                uri: uri.to_string(),
            },
            kind,
            None,
        )?;
    }
    let registry = Registry::new()
        .with(Slot::from(14_000), DeliverRtcp::relay_feedback())
        .with(Slot::from(3_500), count_feedback(metrics));
    let receive_side = ReceiveSide::new();
    let registry = relay_interceptors(registry, &mut media_engine, receive_side.clone())?;
    let pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(setting_engine)
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .build(now)?;
    Ok((pc, receive_side))
}

impl Peer {
    /// A new connection's state: nothing published, received or learned yet.
    pub(super) fn new(
        user_id: &str,
        room_id: &str,
        pc: RTCPeerConnection,
        receive_side: ReceiveSide,
        ufrag: String,
        pwd: String,
        may_publish: bool,
    ) -> Peer {
        Peer {
            user_id: user_id.to_string(),
            room_id: room_id.to_string(),
            pc,
            ufrag,
            stream_types: HashMap::new(),
            published: FxHashMap::default(),
            feeds: HashMap::new(),
            stream_meta: BTreeMap::new(),
            negotiation_needed: false,
            pli_at: Vec::new(),
            relayed_tracks: HashMap::new(),
            last_pli: HashMap::new(),
            state: "new".to_string(),
            ice_failed: false,
            connected: false,
            parked_deadline: None,
            sealer: None,
            remote: None,
            sealed_by_rtc: false,
            opener: None,
            inbound: Vec::new(),
            receive_side,
            pwd,
            addrs: Vec::new(),
            admission: guard::Admission::default(),
            refusals: guard::RefusalLog::default(),
            may_publish,
            downlink: bwe::Downlink::default(),
        }
    }
}

pub(super) fn random_token(len: usize) -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut r = rand::rng();
    (0..len)
        .map(|_| A[r.random_range(0..A.len())] as char)
        .collect()
}

/// `sdp` without component-2 (RTCP) candidates: rtc lists each candidate for both components,
/// but the relay requires rtcp-mux (RTP and RTCP on one transport), so the second is noise a
/// client could try to pair.
pub(super) fn without_rtcp_candidates(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let rtcp = line
            .strip_prefix("a=candidate:")
            .and_then(|c| c.split_whitespace().nth(1))
            == Some("2");
        if !rtcp {
            out.push_str(line);
        }
    }
    out
}

/// A published stream's packet that rtc's pipeline opened: from now on the own packet-in path
/// opens that SSRC's packets ([`Peer::open_own`]), continuing after this one. This is
/// the stream's first packet rtc delivered, so its rollover counter is still 0 (streams start
/// after DTLS, which is when the opener is made).
pub(super) fn learn_inbound(p: &mut Peer, track_id: &str, h: &rtc::rtp::header::Header) {
    let Some(opener) = p.opener.as_mut() else {
        return;
    };
    if p.inbound.iter().any(|(s, _)| *s == h.ssrc) || !p.published.contains_key(track_id) {
        return;
    }
    opener.resume(h.ssrc, h.sequence_number, 0);
    p.inbound.push((h.ssrc, Arc::from(track_id)));
}

/// After a call into a connection: the SRTP keys its DTLS handshake just derived, if it did. rtc
/// derives the local (sending) context first; with an AES-GCM profile the relay seals this
/// connection's relayed packets itself from now on.
pub(super) fn take_srtp_keys(p: &mut Peer, metrics: &Metrics) {
    let keys = srtp::take_captured();
    if keys.is_empty() {
        return;
    }
    if keys.len() != 2 || p.sealer.is_some() {
        warn!(user = %p.user_id, contexts = keys.len(), "unexpected SRTP key derivation; ignored");
        return;
    }
    // The remote (receiving) context: the own packet-in path, and what checks the first packet
    // of each SSRC before rtc sees it.
    match srtp::Opener::new(&keys[1]) {
        Ok(opener) => p.opener = Some(opener),
        Err(e) => warn!(user = %p.user_id, error = %e, "SRTP opener not available"),
    }
    match keys[1]
        .rtcp
        .as_ref()
        .map(|k| srtp::RtcpAuth::new(keys[1].transform, k))
    {
        Some(Ok(auth)) => p.admission.rtcp_auth = Some(auth),
        Some(Err(e)) => warn!(user = %p.user_id, error = %e, "SRTCP check not available"),
        None => warn!(user = %p.user_id, "SRTCP keys not captured: RTCP will be refused"),
    }
    match srtp::Sealer::new(&keys[0]) {
        Ok(sealer) => {
            debug!(user = %p.user_id, transform = ?keys[0].transform, "relayed packets sealed by the relay");
            p.sealer = Some(sealer);
            metrics.srtp_sealed_by_relay.inc();
            metrics
                .srtp_profiles
                .with_label_values(&[srtp::profile_label(keys[0].transform)])
                .inc();
        }
        Err(e) => warn!(user = %p.user_id, error = %e, "SRTP sealer not available"),
    }
}
