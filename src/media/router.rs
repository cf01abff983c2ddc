//! The router: who receives what. It owns the subscriptions (kept across a member's relay
//! connections) and, per published track, its routes (one per subscriber: the copy's SSRC,
//! numbering and extension map) and the history that answers their NACKs. It attaches a published
//! track to a subscriber's feed, parks the feed across a republish, and drops it. The feeds
//! themselves (the subscriber's outgoing tracks) belong to the subscriber's connection, which the
//! router is lent with the connection table.

use super::feeds::{forwarded_extensions, map_route, open_feed, parked_feed, resume_parked};
use super::*;

/// Sources a member asked for: (publisher, one source or every source).
type Wanted = HashSet<(String, Option<String>)>;

#[derive(Default)]
pub(super) struct Router {
    /// Subscriber user id -> what it wants through the relay. Kept while the subscriber is in the
    /// room, across its relay connections.
    subscriptions: HashMap<String, Wanted>,
    /// Publisher -> its track id -> the track's routes (nested so the packet path looks up by
    /// `&str`). Made at a track's first attach, so history is kept only for routed tracks.
    pub(super) tracks: FxHashMap<PeerKey, FxHashMap<String, RoutedTrack>>,
    /// (subscriber, publisher) user ids -> the video quality the subscriber asked for (absent:
    /// the highest).
    qualities: HashMap<(String, String), Quality>,
    /// Scratch for [`Router::allocate`], kept (no allocation per feedback).
    pub(super) allocation: Vec<super::allocate::Candidate>,
}

/// A published track with at least one subscriber: its copies, and its recent packets (per
/// layer).
#[derive(Default)]
pub(super) struct RoutedTrack {
    pub(super) routes: Vec<Route>,
    pub(super) history: Vec<History>,
    /// How its keyframes are recognized (for layer switches).
    pub(super) keyframes: Keyframes,
    /// The bitrate of each of its layers.
    pub(super) rates: LayerRates,
    /// Its VP8 frames carry temporal layers (a TID in their payload descriptors).
    pub(super) temporal_layers: bool,
}

/// What a subscriber's new feed is made from: one published track.
pub(super) struct Source {
    pub(super) publisher: String,
    /// It is sent as simulcast layers.
    pub(super) simulcast: bool,
    pub(super) kind: RtpCodecKind,
    pub(super) codec: RTCRtpCodec,
    pub(super) stream_id: String,
    pub(super) ty: String,
}

impl Router {
    /// `paused` layers of `publisher`'s `track` (dynacast): no route takes them, so their
    /// retransmission histories are let go.
    pub(super) fn forget_paused(&mut self, publisher: PeerKey, track: &str, paused: &[bool]) {
        let Some(t) = self.track_mut(publisher, track) else {
            return;
        };
        for (h, _) in t.history.iter_mut().zip(paused).filter(|(_, p)| **p) {
            *h = History::default();
        }
    }

    /// Members with subscriptions kept (for `ferry_table_entries`).
    pub(super) fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// (subscriber, publisher) qualities kept.
    pub(super) fn quality_count(&self) -> usize {
        self.qualities.len()
    }

    /// Whether `sub` asked for `publisher`'s `ty` source.
    pub(super) fn wants(&self, sub: &str, publisher: &str, ty: &str) -> bool {
        self.subscriptions.get(sub).is_some_and(|i| {
            i.contains(&(publisher.to_string(), None))
                || i.contains(&(publisher.to_string(), Some(ty.to_string())))
        })
    }

    /// The routes of `publisher`'s `track_id`, if anyone receives it.
    pub(super) fn track_mut(
        &mut self,
        publisher: PeerKey,
        track_id: &str,
    ) -> Option<&mut RoutedTrack> {
        self.tracks.get_mut(&publisher)?.get_mut(track_id)
    }

    /// Give subscriber `sub` a copy of `publisher`'s track: on the feed this source had if it is
    /// waiting for a republished track, else on a new one. The publisher is asked for keyframes.
    pub(super) fn attach(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        (sub, publisher): (PeerKey, PeerKey),
        track_id: &str,
        now: Instant,
    ) {
        let Some(source) = peers.get(&publisher).and_then(|p| {
            let t = p.published.get(track_id)?;
            Some(Source {
                publisher: p.user_id.clone(),
                simulcast: t.simulcast(),
                kind: t.kind,
                codec: t.codec.clone(),
                stream_id: t.stream_id.clone(),
                ty: t.ty.clone(),
            })
        }) else {
            return;
        };
        let Some(s) = peers.get_mut(&sub) else {
            return;
        };
        let bound = Some((publisher, track_id.to_string()));
        if s.feeds.values().any(|f| f.bound == bound) {
            return;
        }
        let quality = self.quality(&s.user_id, &source.publisher);
        let keyframes = Keyframes::of(&source.codec.mime_type);
        let simulcast = source.simulcast;
        let mut route = match parked_feed(s, &source) {
            Some(key) => resume_parked(s, &key, bound, now),
            None => {
                let Some(route) = open_feed(s, sub, source, bound) else {
                    return;
                };
                out.needs_poll.insert(sub);
                route
            }
        };
        route.quality = quality;
        // A simulcast route starts at a keyframe of the layer it wants; a single encoding
        // goes out from its next packet.
        route.layer = (!simulcast).then_some(0);
        let track = self
            .tracks
            .entry(publisher)
            .or_default()
            .entry(track_id.to_string())
            .or_default();
        track.keyframes = keyframes;
        track.routes.push(route);
        self.refresh_ext_maps(peers, sub);
        // A new subscriber needs a keyframe: ask now and again shortly (its DTLS may still be
        // coming up).
        if let Some(p) = peers.get_mut(&publisher) {
            out.needs_poll.insert(publisher);
            p.pli_at.extend([
                now,
                now + Duration::from_millis(500),
                now + Duration::from_millis(1500),
            ]);
        }
    }

    /// A track was published on `publisher`'s connection: every member of its room who wants it
    /// gets a copy.
    pub(super) fn attach_to_subscribers(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        publisher: PeerKey,
        track_id: &str,
        now: Instant,
    ) {
        let Some(p) = peers.get(&publisher) else {
            return;
        };
        let Some(ty) = p.published.get(track_id).map(|t| &t.ty) else {
            return;
        };
        let subs: Vec<PeerKey> = peers
            .iter()
            .filter(|(k, q)| {
                **k != publisher && q.room_id == p.room_id && self.wants(&q.user_id, &p.user_id, ty)
            })
            .map(|(k, _)| *k)
            .collect();
        for s in subs {
            self.attach(peers, out, (s, publisher), track_id, now);
        }
    }

    /// A new relay connection (`sub`) receives what its member subscribed to.
    pub(super) fn attach_existing(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        sub: PeerKey,
        now: Instant,
    ) {
        let Some(s) = peers.get(&sub) else {
            return;
        };
        let existing: Vec<(PeerKey, String)> = peers
            .iter()
            .filter(|(k, q)| **k != sub && q.room_id == s.room_id)
            .flat_map(|(k, q)| {
                q.published
                    .iter()
                    .filter(|(_, t)| self.wants(&s.user_id, &q.user_id, &t.ty))
                    .map(move |(t, _)| (*k, t.clone()))
            })
            .collect();
        for (publisher, track) in existing {
            self.attach(peers, out, (sub, publisher), &track, now);
        }
    }

    /// A publisher's track went: its subscribers' feeds wait [`REPUBLISH_GRACE`] for the same
    /// source to come back before their tracks are removed.
    pub(super) fn unpublish(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        publisher: PeerKey,
        track_id: &str,
        now: Instant,
    ) {
        let Some(track) = self
            .tracks
            .get_mut(&publisher)
            .and_then(|t| t.remove(track_id))
        else {
            return;
        };
        let bound = Some((publisher, track_id.to_string()));
        for r in track.routes {
            let to = r.to;
            let Some(s) = peers.get_mut(&to) else {
                continue;
            };
            if let Some(f) = s.feeds.values_mut().find(|f| f.bound == bound) {
                f.bound = None;
                f.parked = Some((r, now + REPUBLISH_GRACE));
                s.update_parked_deadline();
            }
            // Its next timer is re-read when it is drained.
            out.needs_poll.insert(to);
        }
    }

    /// Remove one of `sub`'s feeds: its route, its track (renegotiated).
    pub(super) fn drop_feed(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        sub: PeerKey,
        key: &FeedKey,
    ) {
        let Some(s) = peers.get_mut(&sub) else {
            return;
        };
        let Some(f) = s.feeds.remove(key) else {
            return;
        };
        s.update_parked_deadline();
        if let Some((publisher, track)) = &f.bound
            && let Some(t) = self.track_mut(*publisher, track)
        {
            t.routes.retain(|r| r.to != sub);
        }
        s.relayed_tracks.retain(|_, k| k != key);
        if !s.feeds.values().any(|g| g.stream_id == f.stream_id) {
            s.stream_meta.remove(&f.stream_id);
        }
        let _ = s.pc.remove_track(f.sender_id);
        s.negotiation_needed = true;
        out.needs_poll.insert(sub);
    }

    /// Drop `sub`'s feeds whose publisher did not come back within [`REPUBLISH_GRACE`].
    pub(super) fn expire_parked(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        sub: PeerKey,
        now: Instant,
    ) {
        let expired: Vec<FeedKey> = peers
            .get(&sub)
            .map(|p| {
                p.feeds
                    .iter()
                    .filter(|(_, f)| f.parked.as_ref().is_some_and(|(_, t)| *t <= now))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for f in expired {
            self.drop_feed(peers, out, sub, &f);
        }
    }

    /// `user_id` subscribes to `publisher`'s `stream_type` (or every source): kept, and attached
    /// now if both have relay connections in `room_id`.
    pub(super) fn subscribe(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        (user_id, room_id): (String, String),
        (publisher, stream_type): (String, Option<String>),
        now: Instant,
    ) {
        debug!(user = %user_id, %publisher, ?stream_type, "subscribe");
        self.subscriptions
            .entry(user_id.clone())
            .or_default()
            .insert((publisher.clone(), stream_type));
        let Some(sub) = peers.key_of(&user_id) else {
            // Attached when its relay connection comes.
            return;
        };
        if peers.get(&sub).is_none_or(|p| p.room_id != room_id) {
            return;
        }
        let Some(publ) = peers.key_of(&publisher) else {
            return;
        };
        let tracks: Vec<String> = match peers.get(&publ) {
            Some(p) if p.room_id == room_id => p
                .published
                .iter()
                .filter(|(_, t)| self.wants(&user_id, &publisher, &t.ty))
                .map(|(id, _)| id.clone())
                .collect(),
            _ => return,
        };
        for t in tracks {
            self.attach(peers, out, (sub, publ), &t, now);
        }
    }

    pub(super) fn unsubscribe(
        &mut self,
        peers: &mut Peers,
        out: &mut Outbox,
        user_id: &str,
        publisher: &str,
        stream_type: Option<&str>,
    ) {
        debug!(user = %user_id, %publisher, ?stream_type, "unsubscribe");
        if let Some(i) = self.subscriptions.get_mut(user_id) {
            match stream_type {
                None => i.retain(|(p, _)| p != publisher),
                Some(ty) => {
                    i.remove(&(publisher.to_string(), Some(ty.to_string())));
                    // "Everything but this source" remains.
                    if i.remove(&(publisher.to_string(), None)) {
                        let other = if ty == "cam" { "screen" } else { "cam" };
                        i.insert((publisher.to_string(), Some(other.to_string())));
                    }
                }
            }
        }
        let Some(sub) = peers.key_of(user_id) else {
            return;
        };
        let gone: Vec<FeedKey> = peers
            .get(&sub)
            .map(|p| {
                p.feeds
                    .keys()
                    .filter(|f| f.publisher == publisher && !self.wants(user_id, publisher, &f.ty))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for f in gone {
            self.drop_feed(peers, out, sub, &f);
        }
    }

    /// `sub`'s reception report for its outgoing stream `ssrc`: `fraction_lost` (of 256) on its
    /// link moves the limit on that route's simulcast layer (see [`LossLimit`]).
    pub(super) fn on_reception_report(
        &mut self,
        peers: &Peers,
        sub: PeerKey,
        ssrc: u32,
        fraction_lost: u8,
        now: Instant,
    ) {
        for (publisher, tracks) in self.tracks.iter_mut() {
            for (track, t) in tracks.iter_mut() {
                let Some(r) = t.routes.iter_mut().find(|r| r.to == sub && r.ssrc == ssrc) else {
                    continue;
                };
                let Some(layers) = peers
                    .get(publisher)
                    .and_then(|p| p.published.get(track))
                    .filter(|p| p.simulcast())
                    .map(|p| p.layers.len())
                else {
                    return;
                };
                let top = layers.saturating_sub(1) as u8;
                let next = r.layer.and_then(|l| t.rates.bps(l + 1));
                if let Some(up) = r.limit.on_report(fraction_lost, (r.layer, top, next), now) {
                    debug!(
                        sub,
                        ssrc,
                        fraction_lost,
                        up,
                        ceiling = r.limit.ceiling,
                        "simulcast layer limit from the subscriber's loss"
                    );
                }
                return;
            }
        }
    }

    /// Which of the `layers` layers of `publisher`'s `track` some route takes, fits or was asked
    /// for (the lowest always counts, so that a new subscriber starts at once).
    pub(super) fn layers_needed(
        &self,
        publisher: PeerKey,
        track: &str,
        layers: usize,
    ) -> Vec<bool> {
        let mut needed = vec![false; layers];
        if let Some(n) = needed.first_mut() {
            *n = true;
        }
        let top = layers.saturating_sub(1) as u8;
        let routes = self
            .tracks
            .get(&publisher)
            .and_then(|t| t.get(track))
            .map_or(&[][..], |t| &t.routes[..]);
        // What a route receives, what its link fits now, and the most its subscriber asked for:
        // a layer above what the link fits stays on (its estimate may climb to it; a paused
        // layer would first have to be resumed and wait for a keyframe).
        for r in routes {
            let asked = r.quality.layer().map(|l| l.min(top));
            for l in [r.layer, r.wanted_layer(top), asked].into_iter().flatten() {
                if let Some(n) = needed.get_mut(usize::from(l)) {
                    *n = true;
                }
            }
        }
        needed
    }

    /// What `sub` receives of `publisher`'s video.
    fn quality(&self, sub: &str, publisher: &str) -> Quality {
        self.qualities
            .get(&(sub.to_string(), publisher.to_string()))
            .copied()
            .unwrap_or(Quality::High)
    }

    /// `user_id` wants `quality` of `publisher`'s video: kept for its later tracks, applied to
    /// the routes it has now (each moves at the next keyframe of its new layer).
    pub(super) fn set_quality(
        &mut self,
        peers: &Peers,
        user_id: &str,
        publisher: &str,
        quality: Quality,
    ) {
        debug!(user = %user_id, %publisher, ?quality, "video quality");
        let key = (user_id.to_string(), publisher.to_string());
        if quality == Quality::High {
            self.qualities.remove(&key);
        } else {
            self.qualities.insert(key, quality);
        }
        let (Some(sub), Some(publ)) = (peers.key_of(user_id), peers.key_of(publisher)) else {
            return;
        };
        for t in self
            .tracks
            .get_mut(&publ)
            .into_iter()
            .flat_map(|t| t.values_mut())
        {
            for r in t.routes.iter_mut().filter(|r| r.to == sub) {
                r.quality = quality;
            }
        }
    }

    /// `user_id` left its room: its subscriptions, the others' subscriptions to it and their
    /// feeds of it go at once (it is not coming back).
    pub(super) fn forget_member(&mut self, peers: &mut Peers, out: &mut Outbox, user_id: &str) {
        self.qualities
            .retain(|(s, p), _| s != user_id && p != user_id);
        self.subscriptions.remove(user_id);
        for i in self.subscriptions.values_mut() {
            i.retain(|(p, _)| *p != user_id);
        }
        let gone: Vec<(PeerKey, FeedKey)> = peers
            .iter()
            .flat_map(|(k, p)| {
                p.feeds
                    .keys()
                    .filter(|f| f.publisher == user_id)
                    .map(move |f| (*k, f.clone()))
            })
            .collect();
        for (k, f) in gone {
            self.drop_feed(peers, out, k, &f);
        }
    }

    /// `key`'s connection closed: its tracks' routes (after [`Router::unpublish`]) and its copies
    /// of others' tracks go.
    pub(super) fn remove_connection(&mut self, key: PeerKey) {
        self.tracks.remove(&key);
        for tracks in self.tracks.values_mut() {
            for t in tracks.values_mut() {
                t.routes.retain(|r| r.to != key);
            }
        }
    }

    /// Recompute the payload types and header-extension maps of every route from or to `key`
    /// (after a negotiation: IDs are known, and stay as they are, once negotiated).
    pub(super) fn refresh_ext_maps(&mut self, peers: &mut Peers, key: PeerKey) {
        let mut publisher_exts: HashMap<(PeerKey, &str), Vec<(String, u16)>> = HashMap::new();
        for (publisher, tracks) in self.tracks.iter_mut() {
            for (track, t) in tracks.iter_mut() {
                for r in t.routes.iter_mut() {
                    if *publisher != key && r.to != key {
                        continue;
                    }
                    let from = publisher_exts
                        .entry((*publisher, track.as_str()))
                        .or_insert_with(|| forwarded_extensions(peers, *publisher, track));
                    if let Some(s) = peers.get_mut(&r.to) {
                        map_route(r, from, s);
                    }
                }
            }
        }
    }
}
