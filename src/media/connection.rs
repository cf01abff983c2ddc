//! A relayed connection: its rtc peer connection made (ICE-lite, DTLS server, the relay's
//! interceptors and candidates), negotiated (the client's offers, the server's offers), its events
//! (tracks published, state), its SRTP keys and addresses, and its end.

use super::*;

impl MediaCore {
    pub(super) fn handle_event(&mut self, key: PeerKey, ev: RTCPeerConnectionEvent, _now: Instant) {
        match ev {
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                let Some(p) = self.peers.get_mut(&key) else {
                    return;
                };
                // rtc reports a track again after each renegotiation; it is routed already (keep
                // its SSRC current for keyframe requests).
                if let Some(t) = p.published.get_mut(&init.track_id) {
                    t.ssrc = init.ssrc;
                    self.refresh_ext_maps(key);
                    return;
                }
                if !p.may_publish {
                    warn!(user = %p.user_id, track = %init.track_id,
                          "track refused: the member's token does not grant publish");
                    return;
                }
                let Some(receiver) = p.pc.rtp_receiver(init.receiver_id) else {
                    return;
                };
                let track = receiver.track();
                let kind = track.kind();
                let Some(codec) = track.codec(init.ssrc).cloned() else {
                    warn!(user = %p.user_id, "published track without a codec");
                    return;
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
                p.published.insert(
                    init.track_id.clone(),
                    Published {
                        kind,
                        codec,
                        ssrc: init.ssrc,
                        receiver_id: init.receiver_id,
                        ty: ty.clone(),
                        stream_id,
                        history: History::default(),
                    },
                );
                let (room, user) = (p.room_id.clone(), p.user_id.clone());
                self.sink.send_to_room(
                    &room,
                    &user,
                    json!({"type": "track", "event": "published", "userId": user,
                           "streamType": ty, "kind": kind_name(kind)}),
                );
                let subs: Vec<PeerKey> = self
                    .peers
                    .iter()
                    .filter(|(k, q)| {
                        **k != key && q.room_id == room && self.wants(&q.user_id, &user, &ty)
                    })
                    .map(|(k, _)| *k)
                    .collect();
                for s in subs {
                    self.attach(s, key, &init.track_id);
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id)) => {
                self.unpublish(key, &track_id, Instant::now());
            }
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                let Some(p) = self.peers.get_mut(&key) else {
                    return;
                };
                info!(user = %p.user_id, %state, "relay connection state");
                let label = state.to_string();
                p.connected = state == RTCPeerConnectionState::Connected;
                if p.connected && p.sealer.is_none() && !p.sealed_by_rtc {
                    // DTLS done without captured AES-GCM keys (an AES-CM profile): rtc seals.
                    p.sealed_by_rtc = true;
                    self.metrics.srtp_sealed_by_rtc.inc();
                    self.metrics
                        .srtp_profiles
                        .with_label_values(&["unknown"])
                        .inc();
                }
                self.metrics
                    .peer_connections
                    .with_label_values(&[&p.state])
                    .dec();
                self.metrics
                    .peer_connections
                    .with_label_values(&[&label])
                    .inc();
                p.state = label;
                if state == RTCPeerConnectionState::Failed {
                    self.metrics
                        .media_dropped
                        .with_label_values(&["connection_failed"])
                        .inc();
                    if p.ice_failed {
                        self.metrics.failures_ice.inc();
                    } else {
                        self.metrics.failures_dtls.inc();
                    }
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

    /// Recompute the header-extension maps of every route from or to `key` (after a
    /// negotiation: IDs are known, and stay as they are, once negotiated).
    pub(super) fn refresh_ext_maps(&mut self, key: PeerKey) {
        let mut receivers: HashMap<(PeerKey, String), Vec<(String, u16)>> = HashMap::new();
        let mut todo = Vec::new();
        for (publisher, tracks) in &self.routes {
            for (track, routes) in tracks {
                for (i, r) in routes.iter().enumerate() {
                    if *publisher == key || r.to == key {
                        todo.push((*publisher, track.clone(), i));
                    }
                }
            }
        }
        for (publisher, track, i) in todo {
            let pub_exts = receivers
                .entry((publisher, track.clone()))
                .or_insert_with(|| {
                    let Some(p) = self.peers.get_mut(&publisher) else {
                        return Vec::new();
                    };
                    let Some(t) = p.published.get(&track) else {
                        return Vec::new();
                    };
                    let kind = t.kind;
                    p.pc.rtp_receiver(t.receiver_id)
                        .map(|mut r| {
                            r.get_parameters()
                                .rtp_parameters
                                .header_extensions
                                .iter()
                                .filter(|h| {
                                    FORWARDED_EXTENSIONS
                                        .iter()
                                        .any(|(u, k)| *u == h.uri && *k == kind)
                                })
                                .map(|h| (h.uri.clone(), h.id))
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .clone();
            let Some(r) = self
                .routes
                .get_mut(&publisher)
                .and_then(|t| t.get_mut(&track))
                .and_then(|rs| rs.get_mut(i))
            else {
                continue;
            };
            let Some(s) = self.peers.get_mut(&r.to) else {
                continue;
            };
            let mime = s
                .feeds
                .values()
                .find(|f| f.sender_id == r.sender_id)
                .map(|f| f.mime.clone())
                .unwrap_or_default();
            let (sub_exts, payload_type): (Vec<(String, u16)>, Option<u8>) =
                s.pc.rtp_sender(r.sender_id)
                    .map(|mut snd| {
                        let params = &snd.get_parameters().rtp_parameters;
                        (
                            params
                                .header_extensions
                                .iter()
                                .map(|h| (h.uri.clone(), h.id))
                                .collect(),
                            params
                                .codecs
                                .iter()
                                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&mime))
                                .map(|c| c.payload_type),
                        )
                    })
                    .unwrap_or_default();
            // The payload type as negotiated (the subscriber may number the codec its own way).
            if let Some(pt) = payload_type {
                r.payload_type = pt;
            }
            let mut map = [0u8; 256];
            for (uri, id) in &pub_exts {
                if let Some((_, sid)) = sub_exts.iter().find(|(u, _)| u == uri)
                    && let (Ok(from), Ok(to)) = (u8::try_from(*id), u8::try_from(*sid))
                {
                    map[usize::from(from)] = to;
                }
            }
            *r.ext_map = map;
        }
    }

    pub(super) fn negotiate(&mut self, key: PeerKey) {
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
        if let Err(e) = p.pc.set_local_description(Instant::now(), offer) {
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
        self.dirty.insert(key);
    }

    pub(super) fn handle_offer(
        &mut self,
        user_id: String,
        room_id: String,
        sdp: String,
        meta: Option<Value>,
        may_publish: bool,
        now: Instant,
    ) {
        // A client that moved to another room starts afresh.
        if let Some(&k) = self.by_user.get(&user_id)
            && self.peers.get(&k).is_some_and(|p| p.room_id != room_id)
        {
            self.remove_peer(&user_id, now);
        }
        let key = match self.by_user.get(&user_id) {
            Some(&k) => k,
            None => match self.new_peer(&user_id, &room_id, may_publish, now) {
                Ok(k) => k,
                Err(e) => {
                    warn!(user = %user_id, error = %e, "cannot create the relay connection");
                    return;
                }
            },
        };
        let fresh = self
            .peers
            .get(&key)
            .is_some_and(|p| p.pc.remote_description().is_none());
        let p = self.peers.get_mut(&key).expect("peer exists");
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
        let answer = RTCSessionDescription::offer(sdp)
            .and_then(|d| p.pc.set_remote_description(now, d))
            .and_then(|_| p.pc.create_answer(None))
            .and_then(|a| p.pc.set_local_description(now, a));
        if let Err(e) = answer {
            warn!(user = %user_id, error = %e, "client offer refused");
            self.sink.send_to(
                &user_id,
                json!({ "type": "bye", "from": SERVER_ID, "reason": format!("offer refused: {e}") }),
            );
            return;
        }
        let sdp =
            p.pc.local_description()
                .map(|d| without_rtcp_candidates(&d.sdp))
                .unwrap_or_default();
        debug!(user = %user_id, %sdp, "relay answer");
        let meta = json!({ "streams": p.stream_meta });
        self.sink.send_to(
            &user_id,
            json!({ "type": "answer", "from": SERVER_ID, "sdp": sdp, "meta": meta }),
        );
        self.dirty.insert(key);
        self.refresh_ext_maps(key);
        if fresh {
            // A new relay connection receives what its client subscribed to.
            let existing: Vec<(PeerKey, String)> = self
                .peers
                .iter()
                .filter(|(k, q)| **k != key && q.room_id == room_id)
                .flat_map(|(k, q)| {
                    q.published
                        .iter()
                        .filter(|(_, t)| self.wants(&user_id, &q.user_id, &t.ty))
                        .map(move |(t, _)| (*k, t.clone()))
                })
                .collect();
            for (publisher, track) in existing {
                self.attach(key, publisher, &track);
            }
        }
    }

    pub(super) fn new_peer(
        &mut self,
        user_id: &str,
        room_id: &str,
        may_publish: bool,
        now: Instant,
    ) -> rtc::shared::error::Result<PeerKey> {
        let ufrag = loop {
            let u = random_token(8);
            if !self.by_ufrag.contains_key(&u) {
                break u;
            }
        };
        let pwd = random_token(24);
        let setting_engine = SettingEngineBuilder::new()
            .with_lite(true)
            .with_answering_dtls_role(RTCDtlsRole::Server)
            .with_ice_credentials(ufrag.clone(), pwd.clone())
            .with_crypto_provider(self.crypto.clone())
            .with_srtp_protection_profiles(self.srtp_profiles.clone())
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
            .with(Slot::from(3_500), count_feedback(&self.metrics));
        let receive_side = ReceiveSide::new();
        let registry = relay_interceptors(registry, &mut media_engine, receive_side.clone())?;
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(setting_engine)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(now)?;
        for addr in &self.advertised {
            pc.add_local_candidate(net::host_candidate(*addr)?)?;
        }
        if let Some(port) = self.tcp_port {
            for addr in &self.advertised {
                let addr = SocketAddr::new(addr.ip(), port);
                pc.add_local_candidate(net::tcp_host_candidate(addr)?)?;
            }
        }
        let key = self.next_key;
        self.next_key += 1;
        self.peers.insert(
            key,
            Peer {
                user_id: user_id.to_string(),
                room_id: room_id.to_string(),
                pc,
                ufrag: ufrag.clone(),
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
            },
        );
        self.by_user.insert(user_id.to_string(), key);
        self.by_ufrag.insert(ufrag, key);
        self.metrics.relay_connections.inc();
        self.metrics
            .peer_connections
            .with_label_values(&["new"])
            .inc();
        info!(user = %user_id, room = %room_id, "relay connection created");
        Ok(key)
    }

    pub(super) fn remove_peer(&mut self, user_id: &str, now: Instant) {
        let Some(key) = self.by_user.remove(user_id) else {
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
        // Its copies of others' tracks.
        self.routes.remove(&key);
        for tracks in self.routes.values_mut() {
            for routes in tracks.values_mut() {
                routes.retain(|r| r.to != key);
            }
        }
        if let Some(mut p) = self.peers.remove(&key) {
            let _ = p.pc.close();
            self.by_ufrag.remove(&p.ufrag);
            for (a, _) in &p.addrs {
                if self.by_addr.get(a) == Some(&key) {
                    self.by_addr.remove(a);
                    self.socket.forget_source(a);
                }
            }
            self.metrics.relay_connections.dec();
            self.metrics
                .peer_connections
                .with_label_values(&[&p.state])
                .dec();
            info!(user = %user_id, "relay connection closed");
        }
        self.dirty.remove(&key);
        if let Some(t) = self.deadlines.remove(&key) {
            self.timers.remove(&(t, key));
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
/// An address an authenticated ICE check came from: datagrams from it go to `p` (key `k`) until
/// its consent expires ([`CONSENT_TIMEOUT`]).
pub(super) fn learn_address(
    p: &mut Peer,
    by_addr: &mut FxHashMap<SocketAddr, PeerKey>,
    k: PeerKey,
    from: SocketAddr,
    now: Instant,
) {
    if let Some(a) = p.addrs.iter_mut().find(|(a, _)| *a == from) {
        a.1 = now;
        by_addr.insert(from, k);
        return;
    }
    if p.addrs.len() >= MAX_ADDRESSES_PER_CONNECTION {
        let (i, _) = p
            .addrs
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, t))| *t)
            .expect("not empty");
        let (old, _) = p.addrs.swap_remove(i);
        if by_addr.get(&old) == Some(&k) {
            by_addr.remove(&old);
        }
    }
    p.addrs.push((from, now));
    by_addr.insert(from, k);
}

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
