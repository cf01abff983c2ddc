//! The forwarder: a publisher's packet to each subscriber's route: its header rewritten (SSRC,
//! payload type, sequence number and timestamp through the munger, extensions under the
//! subscriber's IDs) and sealed in place into the send batch, or through the subscriber's rtc
//! connection before it has keys; what was sent kept for NACKs, sender reports due.

use super::*;

impl MediaCore {
    /// A packet of `from`'s published `track_id`, opened (by the relay or by rtc): counted, and
    /// copied to the track's subscribers.
    pub(super) fn forward(
        &mut self,
        from: PeerKey,
        track_id: &str,
        packet: rtc::rtp::Packet,
        now: Instant,
    ) {
        let Some(t) = self
            .peers
            .get(&from)
            .and_then(|p| p.published.get(track_id))
        else {
            return;
        };
        let kind = usize::from(t.kind == RtpCodecKind::Video);
        let (layers, simulcast) = (t.layers.len(), t.simulcast());
        let layer = layer_of(&t.layers, packet.header.ssrc);
        self.out.counts.rtp_in[kind] += 1;
        self.out.counts.bytes_in[kind] += packet.payload.len() as u64;
        let (Some(layer), Some(track)) = (layer, self.router.track_mut(from, track_id)) else {
            return;
        };
        // Keyframes matter where a route may change layers: simulcast tracks (even before their
        // other layers arrived) in a codec whose keyframes the relay recognizes (elsewhere a
        // route takes any packet of its layer).
        let gated = simulcast && track.keyframes != Keyframes::Unknown;
        let keyframe = !gated || track.keyframes.starts_keyframe(&packet.payload);
        // A VP8 payload descriptor, read once for every route's copy.
        let vp8 = (track.keyframes == Keyframes::Vp8)
            .then(|| vp8::Descriptor::parse(&packet.payload))
            .flatten();
        track.temporal_layers |= vp8.is_some_and(|d| d.tid.is_some());
        let copy = Incoming {
            kind,
            rx_at: self.rx_at,
            now,
            layer,
            layers,
            keyframe,
            vp8,
        };
        let wanted = forward(
            track,
            &mut self.peers,
            &mut self.out,
            &self.metrics,
            packet,
            copy,
        );
        // Routes waiting to switch layers need a keyframe of theirs.
        for l in 0..layers.min(8) as u8 {
            if wanted & (1 << l) != 0 && self.request_keyframe(from, track_id, l, now) {
                self.metrics.keyframe_requests_layer_switch.inc();
            }
        }
    }
}

/// What the forwarder needs to know of a packet besides its bytes.
#[derive(Clone, Copy)]
pub(super) struct Incoming {
    /// 0 audio, 1 video (the counters' index).
    pub(super) kind: usize,
    /// When its datagram arrived (forwarding latency).
    pub(super) rx_at: Instant,
    pub(super) now: Instant,
    /// Its layer, of the track's `layers`.
    pub(super) layer: u8,
    pub(super) layers: usize,
    /// It starts a keyframe (always true where keyframes do not matter).
    pub(super) keyframe: bool,
    /// Its VP8 payload descriptor (VP8 tracks).
    pub(super) vp8: Option<vp8::Descriptor>,
}

/// One published packet to each of `track`'s routes that takes it (see [`route_takes`]), then
/// into its layer's history (for NACKs). Only the subscribers' connections are touched. The
/// layers (a bit each) some route is waiting for a keyframe of.
pub(super) fn forward(
    track: &mut RoutedTrack,
    peers: &mut Peers,
    out: &mut Outbox,
    metrics: &Metrics,
    mut packet: rtc::rtp::Packet,
    inc: Incoming,
) -> u8 {
    let mut wanted = 0u8;
    // The highest layer the publisher is sending now (a route whose layer stopped coming moves
    // down to it; it moves back when its layer returns).
    let live = if inc.kind == 1 {
        track.rates.add(inc.layer, packet.payload.len(), inc.now);
        track.rates.live_top(inc.now).unwrap_or(inc.layer)
    } else {
        0
    };
    // The publisher's extensions are taken out once (the per-subscriber clone then copies no
    // extension list) and each subscriber gets those it negotiated, under its own IDs. The
    // payload is shared.
    let extensions = std::mem::take(&mut packet.header.extensions);
    let (extension, extension_profile) = (packet.header.extension, packet.header.extension_profile);
    packet.header.extension = false;
    packet.header.extension_profile = 0;
    let bytes = packet.payload.len() as u64;
    for r in track.routes.iter_mut() {
        if inc.kind == 1 && !takes_layer(r, &inc, live, &mut wanted, metrics) {
            continue;
        }
        if r.temporal != u8::MAX && drops_temporal_layer(r, &packet, inc.vp8) {
            continue;
        }
        let Some(sub) = peers.get_mut(&r.to) else {
            continue;
        };
        let Some(sent) = send_copy(r, sub, out, metrics, &packet, &extensions, &inc) else {
            continue;
        };
        match sent {
            Ok(()) => {
                out.counts.rtp_out[inc.kind] += 1;
                out.counts.bytes_out[inc.kind] += bytes;
                if inc.layers > 1 {
                    out.counts.layer_bytes[usize::from(inc.layer.min(2))] += bytes;
                }
                r.limit.on_sent(bytes);
            }
            Err(reason) => {
                r.munger.dropped(packet.header.sequence_number);
                metrics.media_dropped.with_label_values(&[reason]).inc();
            }
        }
    }
    out.forwarded_rx.push(inc.rx_at);
    // Kept (extensions and all) for the subscribers' NACKs: moved, not copied.
    packet.header.extensions = extensions;
    packet.header.extension = extension;
    packet.header.extension_profile = extension_profile;
    let layer = usize::from(inc.layer);
    if track.history.len() <= layer {
        track.history.resize_with(layer + 1, History::default);
    }
    track.history[layer].store(packet);
    wanted
}

/// Route `r`'s copy of `packet` to its subscriber `sub`: sealed straight into the send batch
/// once the connection has its keys, else through rtc. None: not sent and not counted a drop
/// (nothing could send it yet).
#[inline]
fn send_copy(
    r: &mut Route,
    sub: &mut Peer,
    out: &mut Outbox,
    metrics: &Metrics,
    packet: &rtc::rtp::Packet,
    extensions: &[rtc::rtp::header::Extension],
    inc: &Incoming,
) -> Option<Result<(), &'static str>> {
    if let (Some(sealer), Some(to)) = (sub.sealer.as_mut(), sub.remote) {
        // The own path: header written and the packet sealed straight into the send batch,
        // from the moment the DTLS handshake gave the keys (and the address it ran on),
        // which can be a few packets before rtc reports the connection connected.
        let copy = SealedCopy::mapped(&mut r.munger, packet, extensions, inc.vp8);
        let seal = (sealer, &mut sub.downlink);
        match seal_copy(&mut out.tx, r, seal, to, copy, inc.now) {
            Some(report_due) => {
                if report_due {
                    send_sender_report(r, sub, out, inc.now);
                }
                Some(Ok(()))
            }
            None => Some(Err("sender_refused")),
        }
    } else if !sub.connected && sub.sealer.is_none() {
        // No SRTP keys yet (its DTLS handshake has not finished): nothing could send it.
        // rtc's pipeline would take the packet through its interceptors (the NACK
        // responder's send buffer would be made for it) only to refuse it at SRTP.
        // (Nothing mapped: the subscriber's numbering starts at the first packet it gets.)
        metrics
            .media_dropped
            .with_label_values(&["not_connected"])
            .inc();
        None
    } else {
        let sent = copy_via_rtc(r, sub, packet, extensions, inc.now);
        out.needs_poll.insert(r.to);
        Some(sent)
    }
}

/// A VP8 packet of a temporal layer above what route `r` takes: left out, its sequence number
/// and picture id given to what follows (no gap the subscriber would ask for).
fn drops_temporal_layer(
    r: &mut Route,
    packet: &rtc::rtp::Packet,
    d: Option<vp8::Descriptor>,
) -> bool {
    let (Some(map), Some(d)) = (r.vp8.as_mut(), d) else {
        return false;
    };
    if d.tid.is_none_or(|t| t <= r.temporal) {
        return false;
    }
    let h = &packet.header;
    r.munger.map(h.ssrc, h.sequence_number, h.timestamp);
    r.munger.dropped(h.sequence_number);
    map.drop_frame(&d);
    true
}

/// Whether video route `r` takes this packet (of layer `inc.layer`; `live`: the highest layer
/// coming now), moving it to that layer at a keyframe (see [`route_takes`]); the layer it waits
/// for a keyframe of is set in `wanted`.
fn takes_layer(
    r: &mut Route,
    inc: &Incoming,
    live: u8,
    wanted: &mut u8,
    metrics: &Metrics,
) -> bool {
    let top = inc.layers.saturating_sub(1) as u8;
    let want = r.wanted_layer(top).map(|l| l.min(live));
    let want_bit = want.map_or(0, |l| 1 << l.min(7));
    match route_takes(r, inc.layer, inc.keyframe, want) {
        Take::Forward => true,
        Take::Skip => false,
        Take::SkipWantingKeyframe => {
            *wanted |= want_bit;
            false
        }
        Take::ForwardWantingKeyframe => {
            *wanted |= want_bit;
            true
        }
        Take::Switched { up } => {
            // Timestamps go on from what the subscriber last got, by the time between.
            let gap = r.last_sent.map_or(0, |t| {
                let secs = inc.now.saturating_duration_since(t).as_secs_f64();
                (secs * f64::from(r.clock_rate)) as u32
            });
            r.munger.restart(gap);
            if let Some(v) = r.vp8.as_mut() {
                v.restart();
            }
            let direction = if up { "up" } else { "down" };
            metrics.layer_switches.with_label_values(&[direction]).inc();
            true
        }
    }
}

/// A sealed route's sender report, through its subscriber's connection (rtc seals RTCP).
fn send_sender_report(r: &Route, sub: &mut Peer, out: &mut Outbox, now: Instant) {
    let Some(sealed) = r.sealed.as_ref() else {
        return;
    };
    let report = sender_report(r.ssrc, r.clock_rate, sealed, now);
    if let Some(mut s) = sub.pc.rtp_sender(r.sender_id) {
        let _ = s.write_rtcp(now, vec![Box::new(report)]);
        out.needs_poll.insert(r.to);
    }
}

/// A copy for a subscriber whose packets rtc seals (before the relay has its keys, or with a
/// profile the relay does not seal): the rewritten packet into its connection. The reason
/// (a `ferry_media_dropped_total` label) when it is refused.
fn copy_via_rtc(
    r: &mut Route,
    sub: &mut Peer,
    packet: &rtc::rtp::Packet,
    extensions: &[rtc::rtp::header::Extension],
    now: Instant,
) -> Result<(), &'static str> {
    let (seq, ts) = r.munger.map(
        packet.header.ssrc,
        packet.header.sequence_number,
        packet.header.timestamp,
    );
    let mut copy = packet.clone();
    copy.header.ssrc = r.ssrc;
    copy.header.payload_type = r.payload_type;
    copy.header.sequence_number = seq;
    copy.header.timestamp = ts;
    remap_extensions(extensions, &r.ext_map, &mut copy.header);
    // Once the subscriber's connection is up, the packet goes straight into its pipeline:
    // `RTCRtpSender::write_rtp` would rebuild the sender's parameters (allocating) per packet
    // only to check what the route already guarantees (our SSRC, a payload type and extension
    // IDs taken from this sender's negotiated parameters). Before that, the checked path.
    let written = if sub.connected {
        sub.pc
            .handle_write(TaggedRTCMessage {
                now,
                message: RTCMessage::RtpPacket(String::new(), copy),
            })
            .map(Some)
    } else {
        sub.pc
            .rtp_sender(r.sender_id)
            .map(|mut s| s.write_rtp(now, copy))
            .transpose()
    };
    match written {
        Ok(Some(())) => {
            r.last_sent = Some(now);
            Ok(())
        }
        Err(e) => {
            debug!(error = %e, "write_rtp refused");
            Err("sender_refused")
        }
        Ok(None) => Err("no_sender"),
    }
}

/// Give `out` the extensions of `from` this subscriber negotiated, under its IDs (`map`).
pub(super) fn remap_extensions(
    from: &[rtc::rtp::header::Extension],
    map: &[u8; 256],
    out: &mut rtc::rtp::header::Header,
) {
    out.extensions.clear();
    // The publisher's padding belongs to its own extension block.
    out.extensions_padding = 0;
    for e in from {
        let id = map[usize::from(e.id)];
        // As `write_header`: no extension form carries more than 255 bytes (a publisher's
        // RFC 3550 extension block is read as one extension, of any length).
        if id != 0 && e.payload.len() <= 255 {
            out.extensions.push(rtc::rtp::header::Extension {
                id,
                payload: e.payload.clone(),
            });
        }
    }
    if out.extensions.is_empty() {
        out.extension = false;
        out.extension_profile = 0;
    } else {
        out.extension = true;
        // One-byte headers (RFC 8285) carry IDs 1-14 and up to 16 bytes each.
        let one_byte = out
            .extensions
            .iter()
            .all(|e| e.id <= 14 && !e.payload.is_empty() && e.payload.len() <= 16);
        out.extension_profile = if one_byte { 0xBEDE } else { 0x1000 };
    }
}

/// One subscriber's header for a publisher's packet, as an rtc `Header` (the reference
/// [`write_header`] is tested against).
#[cfg(test)]
pub(super) fn rewrite_header(
    h: &mut rtc::rtp::header::Header,
    from: &rtc::rtp::header::Header,
    r: &Route,
    seq: u16,
    ts: u32,
    extensions: &[rtc::rtp::header::Extension],
) {
    h.version = 2;
    h.padding = from.padding;
    h.marker = from.marker;
    h.payload_type = r.payload_type;
    h.sequence_number = seq;
    h.timestamp = ts;
    h.ssrc = r.ssrc;
    h.csrc.clear();
    h.csrc.extend_from_slice(&from.csrc);
    remap_extensions(extensions, &r.ext_map, h);
}

/// A publisher's packet as one route forwards it: its header (extensions taken out), payload and
/// extensions, and the route's sequence number and timestamp for it.
#[derive(Clone, Copy)]
pub(super) struct SealedCopy<'a> {
    pub(super) from: &'a rtc::rtp::header::Header,
    pub(super) payload: &'a [u8],
    pub(super) extensions: &'a [rtc::rtp::header::Extension],
    pub(super) seq: u16,
    pub(super) ts: u32,
    /// Its VP8 payload descriptor, when it has one.
    pub(super) vp8: Option<vp8::Descriptor>,
}

impl<'a> SealedCopy<'a> {
    /// The route's copy of `packet` (whose extensions were taken out into `extensions`, its VP8
    /// descriptor read into `vp8`), its sequence number and timestamp from the route's munger.
    pub(super) fn mapped(
        munger: &mut Munger,
        packet: &'a rtc::rtp::Packet,
        extensions: &'a [rtc::rtp::header::Extension],
        vp8: Option<vp8::Descriptor>,
    ) -> SealedCopy<'a> {
        let (seq, ts) = munger.map(
            packet.header.ssrc,
            packet.header.sequence_number,
            packet.header.timestamp,
        );
        SealedCopy {
            from: &packet.header,
            payload: &packet.payload,
            extensions,
            seq,
            ts,
            vp8,
        }
    }
}

/// The own path's work for one subscriber's copy: header written and the packet sealed into the
/// send batch, recorded for NACKs and sender reports. `None`: the sealer refused it (nothing
/// queued). `Some(true)`: the route's sender report is due (see [`sender_report`]).
pub(super) fn seal_copy(
    tx: &mut TxBatch,
    r: &mut Route,
    (sealer, downlink): (&mut srtp::Sealer, &mut bwe::Downlink),
    to: SocketAddr,
    copy: SealedCopy<'_>,
    now: Instant,
) -> Option<bool> {
    let SealedCopy {
        from,
        payload,
        extensions,
        seq,
        ts,
        vp8,
    } = copy;
    let header = CopyHeader {
        from,
        payload_type: r.payload_type,
        ssrc: r.ssrc,
        ext_map: &r.ext_map,
        seq,
        ts,
        extensions,
        twcc: downlink.stamps().then(|| {
            (
                downlink.ext_id,
                downlink.stamp(payload.len() + SEALED_OVERHEAD, now),
            )
        }),
    };
    let sealed = r.sealed.get_or_insert_with(|| Sealed {
        rollover: Default::default(),
        sent: Box::new([Sent::default(); RETRANSMIT_BUFFER]),
        packets: 0,
        octets: 0,
        last_ts: (ts, now),
        next_report: now,
        since: now,
    });
    let roc = sealed.rollover.roc_for(seq);
    let vp8 = vp8_patch(r.vp8.as_mut(), vp8);
    if !tx.push_with(to, |buf| {
        write_sealed(buf, &header, payload, (sealer, vp8), roc)
    }) {
        return None;
    }
    sealed.sent[usize::from(seq) % RETRANSMIT_BUFFER] = Sent {
        seq,
        publisher_seq: from.sequence_number,
        publisher_ssrc: from.ssrc,
        timestamp: ts,
        used: true,
        vp8: r.vp8.as_ref().map_or((0, 0), |m| m.offsets()),
        resent: None,
    };
    sealed.packets = sealed.packets.wrapping_add(1);
    sealed.octets = sealed.octets.wrapping_add(payload.len() as u32);
    if sealed.last_ts.0 != ts {
        sealed.last_ts = (ts, now);
    }
    r.last_sent = Some(now);
    let report_due = now >= sealed.next_report;
    if report_due {
        sealed.next_report = now + SENDER_REPORT_INTERVAL;
    }
    Some(report_due)
}

/// What to write into a VP8 copy's payload descriptor (`None`: nothing to change).
fn vp8_patch(
    map: Option<&mut vp8::Vp8Map>,
    d: Option<vp8::Descriptor>,
) -> Option<(vp8::Descriptor, u16, u8)> {
    let (map, d) = (map?, d?);
    if d.pid.is_none() && d.tl0.is_none() {
        return None;
    }
    let (pid, tl0) = map.map(&d);
    (!map.identity()).then_some((d, pid, tl0))
}

/// A padding-only packet of `bytes` (1..=255) on route `r`, for a probe of its subscriber's
/// downlink: the next sequence number of the route (see [`Munger::insert`]), the last
/// timestamp, no payload; a subscriber's NACK for it is not answered. Whether it was queued.
pub(super) fn seal_padding(
    tx: &mut TxBatch,
    r: &mut Route,
    (sealer, downlink): (&mut srtp::Sealer, &mut bwe::Downlink),
    to: SocketAddr,
    bytes: usize,
    now: Instant,
) -> bool {
    let Some(sealed) = r.sealed.as_mut() else {
        return false;
    };
    let Some((seq, ts)) = r.munger.insert() else {
        return false;
    };
    let pad = bytes.clamp(1, 255);
    let from = rtc::rtp::header::Header {
        padding: true,
        ..Default::default()
    };
    let header = CopyHeader {
        from: &from,
        payload_type: r.payload_type,
        ssrc: r.ssrc,
        ext_map: &r.ext_map,
        seq,
        ts,
        extensions: &[],
        twcc: downlink
            .stamps()
            .then(|| (downlink.ext_id, downlink.stamp(pad + SEALED_OVERHEAD, now))),
    };
    let roc = sealed.rollover.roc_for(seq);
    let ssrc = r.ssrc;
    let queued = tx.push_with(to, |buf| {
        let start = buf.len();
        let header_len = write_header(buf, &header);
        buf.resize(buf.len() + pad - 1, 0);
        buf.push(pad as u8);
        sealer.seal(buf, start, header_len, ssrc, seq, roc).is_ok()
    });
    if queued {
        sealed.sent[usize::from(seq) % RETRANSMIT_BUFFER] = Sent::default();
        sealed.packets = sealed.packets.wrapping_add(1);
    }
    queued
}

/// Bytes a sealed copy adds to its payload, about (RTP header with a few extensions, the SRTP
/// tag): the size its transport-cc record counts.
pub(super) const SEALED_OVERHEAD: usize = 40;

/// What a copy's RTP header carries: the publisher's packet's marker, padding and CSRCs, the
/// route's payload type, SSRC, sequence number and timestamp, and the publisher's extensions this
/// subscriber negotiated, under its IDs.
pub(super) struct CopyHeader<'a> {
    pub(super) from: &'a rtc::rtp::header::Header,
    pub(super) payload_type: u8,
    pub(super) ssrc: u32,
    pub(super) ext_map: &'a [u8; 256],
    pub(super) seq: u16,
    pub(super) ts: u32,
    pub(super) extensions: &'a [rtc::rtp::header::Extension],
    /// The subscriber's transport-cc extension id and this packet's transport-wide sequence
    /// number (see [`bwe::Downlink`]), written before the forwarded extensions.
    pub(super) twcc: Option<(u8, u16)>,
}

/// Appends a copy's RTP header to `buf` (RFC 3550 5.1; extensions RFC 8285, one-byte form when
/// every one fits it, else two-byte), byte for byte as rtc marshals the same header; its length.
/// Nothing is allocated: the publisher's extension payloads are copied straight in.
pub(super) fn write_header(buf: &mut Vec<u8>, c: &CopyHeader<'_>) -> usize {
    let start = buf.len();
    let csrc = &c.from.csrc[..c.from.csrc.len().min(15)];
    let twcc = c.twcc.map(|(id, seq)| (id, seq.to_be_bytes()));
    let forwarded = || {
        twcc.iter()
            .map(|(id, seq)| (*id, &seq[..]))
            .chain(c.extensions.iter().filter_map(|e| {
                let id = c.ext_map[usize::from(e.id)];
                (id != 0 && e.payload.len() <= 255).then_some((id, &e.payload[..]))
            }))
    };
    let (mut any, mut one_byte) = (false, true);
    for (id, payload) in forwarded() {
        any = true;
        one_byte &= id <= 14 && !payload.is_empty() && payload.len() <= 16;
    }
    buf.push(0x80 | u8::from(c.from.padding) << 5 | u8::from(any) << 4 | csrc.len() as u8);
    buf.push(u8::from(c.from.marker) << 7 | (c.payload_type & 0x7f));
    buf.extend_from_slice(&c.seq.to_be_bytes());
    buf.extend_from_slice(&c.ts.to_be_bytes());
    buf.extend_from_slice(&c.ssrc.to_be_bytes());
    for x in csrc {
        buf.extend_from_slice(&x.to_be_bytes());
    }
    if any {
        buf.extend_from_slice(if one_byte {
            &[0xBE, 0xDE]
        } else {
            &[0x10, 0x00]
        });
        let length_at = buf.len();
        buf.extend_from_slice(&[0, 0]);
        let body = buf.len();
        for (id, payload) in forwarded() {
            if one_byte {
                buf.push(id << 4 | (payload.len() - 1) as u8);
            } else {
                buf.push(id);
                buf.push(payload.len() as u8);
            }
            buf.extend_from_slice(payload);
        }
        let words = (buf.len() - body).div_ceil(4);
        buf.resize(body + 4 * words, 0);
        buf[length_at..length_at + 2].copy_from_slice(&(words as u16).to_be_bytes());
    }
    buf.len() - start
}

/// Appends header, payload (and padding, as rtc writes it) to `buf` and seals them in place;
/// `vp8`: the VP8 picture id and TL0PICIDX to write into the copy's payload descriptor.
pub(super) fn write_sealed(
    buf: &mut Vec<u8>,
    c: &CopyHeader<'_>,
    payload: &[u8],
    (sealer, vp8): (&mut srtp::Sealer, Option<(vp8::Descriptor, u16, u8)>),
    roc: u32,
) -> bool {
    let start = buf.len();
    let header_len = write_header(buf, c);
    let body = buf.len();
    buf.extend_from_slice(payload);
    if let Some((d, pid, tl0)) = vp8 {
        d.write(&mut buf[body..], pid, tl0);
    }
    if c.from.padding {
        let pad = match payload.len() % 4 {
            0 => 4,
            n => 4 - n,
        };
        buf.resize(buf.len() + pad - 1, 0);
        buf.push(pad as u8);
    }
    sealer
        .seal(buf, start, header_len, c.ssrc, c.seq, roc)
        .is_ok()
}

/// A sender report for a sealed route: its counts, and its last timestamp carried forward to now
/// (what rtc's report interceptor sends for the streams it sees).
pub(super) fn sender_report(
    ssrc: u32,
    clock_rate: u32,
    sealed: &Sealed,
    now: Instant,
) -> rtc::rtcp::sender_report::SenderReport {
    let elapsed = now.saturating_duration_since(sealed.last_ts.1);
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // NTP: seconds since 1900 in the high 32 bits, the fraction in the low 32.
    let ntp_secs = since_epoch.as_secs() + 2_208_988_800;
    let ntp_frac = (u64::from(since_epoch.subsec_nanos()) << 32) / 1_000_000_000;
    rtc::rtcp::sender_report::SenderReport {
        ssrc,
        ntp_time: (ntp_secs << 32) | ntp_frac,
        rtp_time: sealed
            .last_ts
            .0
            .wrapping_add((elapsed.as_secs_f64() * f64::from(clock_rate)) as u32),
        packet_count: sealed.packets,
        octet_count: sealed.octets,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rtc::rtp::header::{Extension, Header};
    use rtc::shared::marshal::{Marshal, MarshalSize};

    fn ext(id: u8, len: usize) -> Extension {
        Extension {
            id,
            payload: Bytes::from((0..len).map(|i| id ^ i as u8).collect::<Vec<u8>>()),
        }
    }

    /// Found by fuzz/fuzz_targets/rtp_rewrite.rs: the rtc path's rewrite kept an extension of
    /// more than 255 bytes (a publisher's RFC 3550 extension block, read as one extension) that
    /// no extension form can carry and that `write_header` leaves out.
    #[test]
    fn both_paths_leave_out_extensions_too_long_for_any_form() {
        let mut map = [0u8; 256];
        map[0] = 4;
        map[1] = 5;
        let from = [ext(0, 300), ext(1, 2)];
        let mut h = Header::default();
        remap_extensions(&from, &map, &mut h);
        let ids: Vec<u8> = h.extensions.iter().map(|e| e.id).collect();
        assert_eq!(ids, [5]);
        assert_eq!(h.extension_profile, 0xBEDE);
    }

    /// `write_header` against rtc's marshal of the same rewritten header, over the forms a
    /// forwarded header takes.
    #[test]
    fn copy_headers_are_written_as_rtc_marshals_them() {
        let mut ext_map = Box::new([0u8; 256]);
        ext_map[1] = 5; // one-byte id -> one-byte id
        ext_map[3] = 7;
        ext_map[4] = 15; // -> an id only the two-byte form carries
        ext_map[6] = 2;
        ext_map[9] = 9;
        let mut route = Route {
            to: 1,
            sender_id: RTCRtpSenderId::default(),
            ssrc: 0x0102_0304,
            payload_type: 111,
            munger: Munger::default(),
            ext_map,
            clock_rate: 90_000,
            last_sent: None,
            sealed: None,
            layer: Some(0),
            quality: Quality::High,
            limit: LossLimit::default(),
            fit: None,
            vp8: None,
            temporal: u8::MAX,
        };
        let cases: Vec<(Vec<Extension>, Vec<u32>, bool, bool)> = vec![
            (vec![], vec![], false, false),
            (vec![], vec![7, 8], true, false),
            // 2 unmapped in the middle; 3 + 1 + 4 bytes of mapped ones: padded to 12.
            (vec![ext(1, 2), ext(2, 1), ext(3, 3)], vec![], true, false),
            (vec![ext(3, 16), ext(1, 1)], vec![9], false, true),
            // Two-byte form: an id above 14, a payload above 16 bytes, an empty payload.
            (vec![ext(1, 2), ext(4, 3)], vec![], false, false),
            (vec![ext(6, 17), ext(3, 1)], vec![], true, false),
            (vec![ext(9, 0), ext(1, 4)], vec![], false, false),
            // Nothing mapped: no extension block.
            (vec![ext(2, 4), ext(8, 1)], vec![], false, false),
        ];
        // Each case again with the subscriber's transport-cc number (under its id 12) first: as
        // if the publisher's packet had carried it under an id mapped to 12.
        route.ext_map[13] = 12;
        let twcc = Extension {
            id: 13,
            payload: Bytes::from_static(&[0xbe, 0xef]),
        };
        let cases = cases.into_iter().flat_map(|(e, c, m, p)| {
            let stamped = std::iter::once(twcc.clone()).chain(e.clone()).collect();
            [
                (e, c.clone(), m, p, None),
                (stamped, c, m, p, Some((12, 0xbeef))),
            ]
        });
        for (extensions, csrc, marker, padding, stamp) in cases {
            let from = Header {
                version: 2,
                padding,
                marker,
                payload_type: 96,
                sequence_number: 4000,
                timestamp: 123_456,
                ssrc: 0xdead_beef,
                csrc,
                ..Default::default()
            };
            let (seq, ts) = (65_000, 0xfeed_f00d);
            let mut expected_header = Header::default();
            rewrite_header(&mut expected_header, &from, &route, seq, ts, &extensions);
            let mut expected = vec![0u8; expected_header.marshal_size()];
            expected_header.marshal_to(&mut expected).unwrap();
            let mut got = vec![0xee; 3];
            let n = write_header(
                &mut got,
                &CopyHeader {
                    from: &from,
                    payload_type: route.payload_type,
                    ssrc: route.ssrc,
                    ext_map: &route.ext_map,
                    seq,
                    ts,
                    extensions: if stamp.is_some() {
                        &extensions[1..]
                    } else {
                        &extensions
                    },
                    twcc: stamp,
                },
            );
            assert_eq!(n, got.len() - 3);
            assert_eq!(&got[3..], &expected[..], "{extensions:?}");
        }
    }
}
