//! RTCP both ways: subscribers' NACKs answered from the history of what was sent, their keyframe
//! requests relayed to the publisher (throttled), and keyframe requests when a subscriber is added.

use super::*;

impl MediaCore {
    /// A subscriber on the own sealing path lost packets of one of our tracks: send them again
    /// from the publisher's history (rtc's NACK responder answers for the other connections).
    pub(super) fn retransmit(&mut self, sub: PeerKey, track_id: &str, lost: &[u16], now: Instant) {
        let Some((publisher, ptrack)) = self.peers.get(&sub).and_then(|s| {
            s.sealer.as_ref()?;
            let feed = s.relayed_tracks.get(track_id)?;
            s.feeds.get(feed)?.bound.clone()
        }) else {
            return;
        };
        // A simulcast track's top layer: the NACKs are loss on the subscriber's link too.
        let top = self
            .peers
            .get(&publisher)
            .and_then(|p| p.published.get(&ptrack))
            .filter(|t| t.simulcast())
            .map(|t| t.layers.len().saturating_sub(1) as u8);
        let (Some(track), Some(s)) = (
            self.router.track_mut(publisher, &ptrack),
            self.peers.get_mut(&sub),
        ) else {
            return;
        };
        let sent = resend(track, sub, s, &mut self.out.tx, lost, now);
        self.metrics.retransmits.inc_by(sent);
        if let Some(top) = top
            && let Some(r) = track.routes.iter_mut().find(|r| r.to == sub)
            && let Some(up) = r.limit.on_nacks(
                lost.len(),
                (r.layer, top, r.layer.and_then(|l| track.rates.bps(l + 1))),
                now,
            )
        {
            debug!(
                sub,
                up,
                ceiling = r.limit.ceiling,
                "simulcast layer limit from the subscriber's NACKs"
            );
        }
    }

    /// A subscriber asked for a keyframe on one of the tracks we send it: ask its publisher, for
    /// the layer that subscriber receives (the others' layers are not disturbed).
    pub(super) fn relay_keyframe_request(&mut self, sub: PeerKey, track_id: &str, now: Instant) {
        let Some((publisher, ptrack)) = self.peers.get(&sub).and_then(|s| {
            let feed = s.relayed_tracks.get(track_id)?;
            s.feeds.get(feed)?.bound.clone()
        }) else {
            return;
        };
        let layer = self
            .router
            .track_mut(publisher, &ptrack)
            .and_then(|t| t.routes.iter().find(|r| r.to == sub))
            .and_then(|r| r.layer)
            .unwrap_or(0);
        if self.request_keyframe(publisher, &ptrack, layer, now) {
            self.metrics.keyframe_requests_relayed.inc();
        }
    }

    /// Ask `publisher` for a keyframe on `layer` of its `track`, at most once per
    /// [`PLI_THROTTLE`]; whether it was asked.
    pub(super) fn request_keyframe(
        &mut self,
        publisher: PeerKey,
        track: &str,
        layer: u8,
        now: Instant,
    ) -> bool {
        let Some(p) = self.peers.get_mut(&publisher) else {
            return false;
        };
        let Some(t) = p.published.get(track) else {
            return false;
        };
        let Some(l) = t.layers.get(usize::from(layer)) else {
            return false;
        };
        let (receiver, ssrc) = (t.receiver_id, l.ssrc);
        if p.last_pli
            .get(&ssrc)
            .is_some_and(|t| now.saturating_duration_since(*t) < PLI_THROTTLE)
        {
            return false;
        }
        p.last_pli.insert(ssrc, now);
        self.out.needs_poll.insert(publisher);
        send_pli(&mut p.pc, receiver, ssrc, now)
    }
}

/// The least time between two retransmissions of one packet (a round trip, about): a
/// subscriber NACKs a packet again until it arrives.
const RESEND_SPACING_MS: u16 = 100;

/// Queue again the packets `lost` that `track`'s route to `sub` (connection `s`) sent, sealed
/// as they were first sent; how many were queued.
fn resend(
    track: &mut RoutedTrack,
    sub: PeerKey,
    s: &mut Peer,
    tx: &mut TxBatch,
    lost: &[u16],
    now: Instant,
) -> u64 {
    let (Some(sealer), Some(to)) = (s.sealer.as_mut(), s.remote) else {
        return 0;
    };
    let RoutedTrack {
        routes, history, ..
    } = track;
    let Some(r) = routes.iter_mut().find(|r| r.to == sub) else {
        return 0;
    };
    let Some(sealed) = r.sealed.as_mut() else {
        return 0;
    };
    let mut queued = 0;
    for &seq in lost {
        let slot = usize::from(seq) % RETRANSMIT_BUFFER;
        let sent = sealed.sent[slot];
        if !sent.used || sent.seq != seq {
            continue;
        }
        // A packet sent again lately is not sent again for a NACK that crossed it.
        let now_ms = now.saturating_duration_since(sealed.since).as_millis() as u16;
        if sent
            .resent
            .is_some_and(|t| now_ms.wrapping_sub(t) < RESEND_SPACING_MS)
        {
            continue;
        }
        let Some(original) = history
            .iter()
            .find_map(|h| h.get(sent.publisher_ssrc, sent.publisher_seq))
        else {
            continue;
        };
        let roc = sealed.rollover.roc_for(seq);
        let header = CopyHeader {
            from: &original.header,
            payload_type: r.payload_type,
            ssrc: r.ssrc,
            ext_map: &r.ext_map,
            seq,
            ts: sent.timestamp,
            extensions: &original.header.extensions,
            twcc: s.downlink.stamps().then(|| {
                let size = original.payload.len() + SEALED_OVERHEAD;
                (s.downlink.ext_id, s.downlink.stamp(size, now))
            }),
        };
        // Retransmissions within their share of the subscriber's estimate: on a full link,
        // answering every NACK would only lose more.
        if !s
            .downlink
            .retransmit_allowed(original.payload.len() + SEALED_OVERHEAD, now)
        {
            continue;
        }
        // The picture id and TL0PICIDX it had when first sent.
        let vp8 = r.vp8.as_ref().and_then(|_| {
            let d = vp8::Descriptor::parse(&original.payload)?;
            let (pid, tl0) = vp8::Vp8Map::map_again(&d, sent.vp8);
            (sent.vp8 != (0, 0)).then_some((d, pid, tl0))
        });
        if tx.push_with(to, |buf| {
            write_sealed(buf, &header, &original.payload, (sealer, vp8), roc)
        }) {
            queued += 1;
            sealed.sent[slot].resent = Some(now_ms);
        }
    }
    queued
}

/// Ask for a keyframe on each of `p`'s published video tracks (every layer).
pub(super) fn request_keyframes(p: &mut Peer, now: Instant) {
    let targets: Vec<_> = p
        .published
        .values()
        .filter(|t| t.kind == RtpCodecKind::Video)
        .flat_map(|t| t.layers.iter().map(|l| (t.receiver_id, l.ssrc)))
        .collect();
    for (rid, ssrc) in targets {
        send_pli(&mut p.pc, rid, ssrc, now);
    }
}

/// Ask a publisher for a keyframe on one of its tracks. False when the receiver is gone.
pub(super) fn send_pli(
    pc: &mut RTCPeerConnection,
    receiver: rtc::rtp_transceiver::RTCRtpReceiverId,
    media_ssrc: u32,
    now: Instant,
) -> bool {
    let Some(mut r) = pc.rtp_receiver(receiver) else {
        return false;
    };
    let pli = PictureLossIndication {
        sender_ssrc: 0,
        media_ssrc,
    };
    r.write_rtcp(now, vec![Box::new(pli)]).is_ok()
}
