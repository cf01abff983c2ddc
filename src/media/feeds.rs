//! A subscriber's feeds, the relay's outgoing tracks on its connection: opening one (an
//! outgoing track with the relay's own SSRC on a send-only m-section) with the route that
//! feeds it, resuming a parked one on a republished track, and mapping a route's payload type
//! and header extensions to what the subscriber negotiated.

use super::router::Source;
use super::*;

/// A feed of `source` waiting for its publisher to come back, with the same codec.
pub(super) fn parked_feed(s: &Peer, source: &Source) -> Option<FeedKey> {
    s.feeds
        .iter()
        .find(|(k, f)| {
            k.publisher == source.publisher
                && k.ty == source.ty
                && k.kind == source.kind
                && f.parked.is_some()
                && f.mime.eq_ignore_ascii_case(&source.codec.mime_type)
        })
        .map(|(k, _)| k.clone())
}

/// Bind the parked feed `key` of `s` to the republished track `bound`: its route, whose numbering
/// continues the old track's; timestamps advance by the time the subscriber saw nothing.
pub(super) fn resume_parked(
    s: &mut Peer,
    key: &FeedKey,
    bound: Option<(PeerKey, String)>,
    now: Instant,
) -> Route {
    let f = s.feeds.get_mut(key).expect("a parked feed");
    let (mut route, _) = f.parked.take().expect("a parked route");
    f.bound = bound;
    s.update_parked_deadline();
    let gap = route.last_sent.map_or(0, |t| {
        let secs = now.saturating_duration_since(t).as_secs_f64();
        (secs * f64::from(route.clock_rate)) as u32
    });
    route.munger.restart(gap);
    info!(user = %s.user_id, publisher = %key.publisher, ty = %key.ty, "relayed track continues on a republished track");
    route
}

/// A new feed on `s` (subscriber `sub`) for `source`: an outgoing track with our own SSRC, added
/// to its connection (renegotiated), and the route that feeds it.
pub(super) fn open_feed(
    s: &mut Peer,
    sub: PeerKey,
    source: Source,
    bound: Option<(PeerKey, String)>,
) -> Option<Route> {
    let Source {
        publisher,
        kind,
        codec,
        stream_id,
        ty,
        ..
    } = source;
    let mut key = FeedKey {
        publisher,
        ty,
        kind,
        n: 0,
    };
    // A feed key whose feed is still in use by another live track of this source and kind, or
    // waiting with another codec: take the next number.
    while s.feeds.contains_key(&key) {
        key.n += 1;
    }
    let ssrc: u32 = rand::random();
    let out_track_id = format!("{stream_id}~{}", random_token(6));
    let out_track = single_ssrc_track(
        stream_id.clone(),
        out_track_id.clone(),
        format!("{} {}", key.publisher, key.ty),
        kind,
        codec.clone(),
        ssrc,
    );
    let sender_id = match add_send_only_track(&mut s.pc, out_track) {
        Ok(id) => id,
        Err(e) => {
            warn!(user = %s.user_id, error = %e, "cannot add a relayed track");
            return None;
        }
    };
    let payload_type = sender_payload_type(&mut s.pc, sender_id, &codec.mime_type).unwrap_or(0);
    s.stream_meta.insert(
        stream_id.clone(),
        json!({ "userId": key.publisher, "type": key.ty }),
    );
    s.relayed_tracks.insert(out_track_id, key.clone());
    s.feeds.insert(
        key,
        Feed {
            sender_id,
            stream_id,
            mime: codec.mime_type.clone(),
            bound,
            parked: None,
        },
    );
    s.negotiation_needed = true;
    Some(Route {
        to: sub,
        sender_id,
        ssrc,
        payload_type,
        munger: Munger::default(),
        ext_map: Box::new([0; 256]),
        clock_rate: codec.clock_rate.max(1),
        last_sent: None,
        sealed: None,
        layer: None,
        quality: Quality::High,
        limit: LossLimit::default(),
        fit: s.downlink.starting_fit(),
        vp8: codec
            .mime_type
            .eq_ignore_ascii_case("video/VP8")
            .then(vp8::Vp8Map::default),
        temporal: u8::MAX,
    })
}

/// The payload type `pc` negotiated for `mime` on sender `id` (the subscriber may number the
/// codec its own way).
fn sender_payload_type(pc: &mut RTCPeerConnection, id: RTCRtpSenderId, mime: &str) -> Option<u8> {
    pc.rtp_sender(id).and_then(|mut snd| {
        snd.get_parameters()
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
            .map(|c| c.payload_type)
    })
}

/// Add one of the relay's outgoing tracks on an m-section that says `a=sendonly`: the relay
/// only sends on it. rtc's `add_track` reuses an m-section whose sender went (ours, left by a
/// dropped feed: it turns send-only again) or makes a `sendrecv` one; it would also take an
/// m-section the client publishes on, where the client's own direction (the SDK's are
/// send-only) would stop the relay's copy. Such a reuse is undone and a new m-section made.
fn add_send_only_track(
    pc: &mut RTCPeerConnection,
    track: MediaStreamTrack,
) -> rtc::shared::error::Result<RTCRtpSenderId> {
    use rtc::rtp_transceiver::{RTCRtpTransceiverDirection as Dir, RTCRtpTransceiverInit};
    let sender = pc.add_track(track.clone())?;
    let Some(mut t) = pc.rtp_transceiver(sender.into()) else {
        return Ok(sender);
    };
    match t.direction() {
        Dir::Sendonly => Ok(sender),
        _ if t.mid().is_none() => {
            t.set_direction(Dir::Sendonly);
            Ok(sender)
        }
        _ => {
            pc.remove_track(sender)?;
            let init = RTCRtpTransceiverInit {
                direction: Dir::Sendonly,
                streams: vec![],
                send_encodings: vec![],
            };
            Ok(pc.add_transceiver_from_track(track, Some(init))?.into())
        }
    }
}

/// The header extensions of `publisher`'s `track` that are forwarded, with its IDs.
pub(super) fn forwarded_extensions(
    peers: &mut Peers,
    publisher: PeerKey,
    track: &str,
) -> Vec<(String, u16)> {
    let Some(p) = peers.get_mut(&publisher) else {
        return Vec::new();
    };
    let Some(t) = p.published.get(track) else {
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
}

/// Set route `r`'s payload type and extension map from what its subscriber `s` negotiated:
/// the publisher's extension `from` IDs map to the subscriber's IDs for the same URIs.
pub(super) fn map_route(r: &mut Route, from: &[(String, u16)], s: &mut Peer) {
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
    for (uri, id) in from {
        if let Some((_, sid)) = sub_exts.iter().find(|(u, _)| u == uri)
            && let (Ok(from), Ok(to)) = (u8::try_from(*id), u8::try_from(*sid))
        {
            map[usize::from(from)] = to;
        }
    }
    *r.ext_map = map;
    // The relay stamps the subscriber's packets with transport-wide sequence numbers when it
    // negotiated transport-cc (its bandwidth estimate comes from the feedback).
    s.downlink.ext_id = sub_exts
        .iter()
        .find(|(u, _)| u == rtc::sdp::extmap::TRANSPORT_CC_URI)
        .and_then(|(_, id)| u8::try_from(*id).ok())
        .unwrap_or(0);
}
