//! The router: who receives what. Subscriptions (kept across relay connections), the feeds a
//! subscriber's connection carries, attaching a published track to them and parking it across a
//! republish; the commands from signaling.

use super::*;

impl MediaCore {
    /// Whether `sub` asked for `publisher`'s `ty` source.
    pub(super) fn wants(&self, sub: &str, publisher: &str, ty: &str) -> bool {
        self.interests.get(sub).is_some_and(|i| {
            i.contains(&(publisher.to_string(), None))
                || i.contains(&(publisher.to_string(), Some(ty.to_string())))
        })
    }

    /// Give subscriber `sub` a copy of `publisher`'s track: on the feed this source had if it is
    /// waiting for a republished track, else on a new one.
    pub(super) fn attach(&mut self, sub: PeerKey, publisher: PeerKey, track_id: &str) {
        let Some(pubp) = self.peers.get(&publisher) else {
            return;
        };
        let Some(t) = pubp.published.get(track_id) else {
            return;
        };
        let (kind, codec, stream_id, ty) =
            (t.kind, t.codec.clone(), t.stream_id.clone(), t.ty.clone());
        let publisher_user = pubp.user_id.clone();
        let bound = Some((publisher, track_id.to_string()));
        let Some(s) = self.peers.get_mut(&sub) else {
            return;
        };
        if s.feeds.values().any(|f| f.bound == bound) {
            return;
        }
        let base = FeedKey {
            publisher: publisher_user.clone(),
            ty: ty.clone(),
            kind,
            n: 0,
        };
        let now = Instant::now();
        // A feed of this source waiting for its publisher to come back, with the same codec.
        let waiting = s
            .feeds
            .iter()
            .find(|(k, f)| {
                k.publisher == base.publisher
                    && k.ty == base.ty
                    && k.kind == base.kind
                    && f.parked.is_some()
                    && f.mime.eq_ignore_ascii_case(&codec.mime_type)
            })
            .map(|(k, _)| k.clone());
        if let Some(fk) = waiting {
            let f = s.feeds.get_mut(&fk).expect("feed found above");
            let (mut route, _) = f.parked.take().expect("a parked route");
            f.bound = bound;
            s.update_parked_deadline();
            // The new track's numbering continues the old one's; its timestamps advance by the
            // time the subscriber saw nothing.
            let gap = route.last_sent.map_or(0, |t| {
                let secs = now.saturating_duration_since(t).as_secs_f64();
                (secs * f64::from(route.clock_rate)) as u32
            });
            route.munger.restart(gap);
            info!(user = %s.user_id, publisher = %publisher_user, %ty, "relayed track continues on a republished track");
            self.routes
                .entry(publisher)
                .or_default()
                .entry(track_id.to_string())
                .or_default()
                .push(route);
            self.refresh_ext_maps(sub);
        } else {
            let mut key = base;
            // A feed key whose feed is still in use by another live track of this source and
            // kind, or waiting with another codec: take the next number.
            while s.feeds.contains_key(&key) {
                key.n += 1;
            }
            let ssrc: u32 = rand::random();
            let out_track_id = format!("{stream_id}~{}", random_token(6));
            let out_track = single_ssrc_track(
                stream_id.clone(),
                out_track_id.clone(),
                format!("{publisher_user} {ty}"),
                kind,
                codec.clone(),
                ssrc,
            );
            let sender_id = match s.pc.add_track(out_track) {
                Ok(id) => id,
                Err(e) => {
                    warn!(user = %s.user_id, error = %e, "cannot add a relayed track");
                    return;
                }
            };
            let payload_type =
                s.pc.rtp_sender(sender_id)
                    .and_then(|mut snd| {
                        snd.get_parameters()
                            .rtp_parameters
                            .codecs
                            .iter()
                            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&codec.mime_type))
                            .map(|c| c.payload_type)
                    })
                    .unwrap_or(0);
            s.relayed_tracks.insert(out_track_id, key.clone());
            s.feeds.insert(
                key,
                Feed {
                    sender_id,
                    stream_id: stream_id.clone(),
                    mime: codec.mime_type.clone(),
                    bound,
                    parked: None,
                },
            );
            s.stream_meta
                .insert(stream_id, json!({ "userId": publisher_user, "type": ty }));
            s.negotiation_needed = true;
            self.dirty.insert(sub);
            self.routes
                .entry(publisher)
                .or_default()
                .entry(track_id.to_string())
                .or_default()
                .push(Route {
                    to: sub,
                    sender_id,
                    ssrc,
                    payload_type,
                    munger: Munger::default(),
                    ext_map: Box::new([0; 256]),
                    clock_rate: codec.clock_rate.max(1),
                    last_sent: None,
                    sealed: None,
                });
            self.refresh_ext_maps(sub);
        }
        // A new subscriber needs a keyframe: ask now and again shortly (its DTLS may still be
        // coming up).
        if let Some(p) = self.peers.get_mut(&publisher) {
            self.dirty.insert(publisher);
            p.pli_at.extend([
                now,
                now + Duration::from_millis(500),
                now + Duration::from_millis(1500),
            ]);
        }
    }

    /// A publisher's track went: its subscribers' feeds wait [`REPUBLISH_GRACE`] for the same
    /// source to come back before their tracks are removed.
    pub(super) fn unpublish(&mut self, publisher: PeerKey, track_id: &str, now: Instant) {
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        let Some(t) = p.published.remove(track_id) else {
            return;
        };
        let (room, user) = (p.room_id.clone(), p.user_id.clone());
        self.sink.send_to_room(
            &room,
            &user,
            json!({"type": "track", "event": "unpublished", "userId": user,
                   "streamType": t.ty, "kind": kind_name(t.kind)}),
        );
        let Some(routes) = self
            .routes
            .get_mut(&publisher)
            .and_then(|t| t.remove(track_id))
        else {
            return;
        };
        let bound = Some((publisher, track_id.to_string()));
        for r in routes {
            let to = r.to;
            let Some(s) = self.peers.get_mut(&to) else {
                continue;
            };
            if let Some(f) = s.feeds.values_mut().find(|f| f.bound == bound) {
                f.bound = None;
                f.parked = Some((r, now + REPUBLISH_GRACE));
                s.update_parked_deadline();
            }
            self.refresh_timer(to);
        }
    }

    /// Remove one of `sub`'s feeds: its route, its track (renegotiated).
    pub(super) fn drop_feed(&mut self, sub: PeerKey, key: &FeedKey) {
        let Some(s) = self.peers.get_mut(&sub) else {
            return;
        };
        let Some(f) = s.feeds.remove(key) else {
            return;
        };
        s.update_parked_deadline();
        if let Some((publisher, track)) = &f.bound
            && let Some(rs) = self
                .routes
                .get_mut(publisher)
                .and_then(|t| t.get_mut(track))
        {
            rs.retain(|r| r.to != sub);
        }
        s.relayed_tracks.retain(|_, k| k != key);
        if !s.feeds.values().any(|g| g.stream_id == f.stream_id) {
            s.stream_meta.remove(&f.stream_id);
        }
        let _ = s.pc.remove_track(f.sender_id);
        s.negotiation_needed = true;
        self.dirty.insert(sub);
    }

    pub fn handle_command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Offer {
                user_id,
                room_id,
                sdp,
                meta,
                join,
                publish,
            } => {
                if self.has_left(&user_id, join) {
                    debug!(user = %user_id, "offer of a member who left: ignored");
                    return;
                }
                self.handle_offer(user_id, room_id, sdp, meta, publish, now)
            }
            Command::Answer { user_id, sdp } => {
                let Some(&k) = self.by_user.get(&user_id) else {
                    return;
                };
                let p = self.peers.get_mut(&k).expect("indexed peer exists");
                let res = RTCSessionDescription::answer(sdp)
                    .and_then(|d| p.pc.set_remote_description(now, d));
                if let Err(e) = res {
                    warn!(user = %user_id, error = %e, "client answer refused");
                }
                self.dirty.insert(k);
                self.refresh_ext_maps(k);
            }
            Command::Candidate { user_id, candidate } => {
                let Some(&k) = self.by_user.get(&user_id) else {
                    return;
                };
                let p = self.peers.get_mut(&k).expect("indexed peer exists");
                if let Ok(c) = serde_json::from_value::<RTCIceCandidateInit>(candidate)
                    && !c.candidate.is_empty()
                {
                    let _ = p.pc.add_remote_candidate(c);
                }
                self.dirty.insert(k);
            }
            Command::Subscribe {
                user_id,
                room_id,
                publisher,
                stream_type,
                join,
            } => {
                if !self.has_left(&user_id, join) {
                    self.subscribe(user_id, room_id, publisher, stream_type)
                }
            }
            Command::Unsubscribe {
                user_id,
                publisher,
                stream_type,
            } => self.unsubscribe(&user_id, &publisher, stream_type.as_deref()),
            Command::Close { user_id } => self.remove_peer(&user_id, now),
            Command::Leave { user_id, join } => {
                let latest = self.left.entry(user_id.clone()).or_insert(join);
                *latest = (*latest).max(join);
                self.remove_peer(&user_id, now);
                self.interests.remove(&user_id);
                for i in self.interests.values_mut() {
                    i.retain(|(p, _)| *p != user_id);
                }
                // Feeds of this member at the others go at once: it is not coming back.
                let gone: Vec<(PeerKey, FeedKey)> = self
                    .peers
                    .iter()
                    .flat_map(|(k, p)| {
                        p.feeds
                            .keys()
                            .filter(|f| f.publisher == user_id)
                            .map(move |f| (*k, f.clone()))
                    })
                    .collect();
                for (k, f) in gone {
                    self.drop_feed(k, &f);
                }
            }
        }
    }

    /// A command of `user_id`'s join `join`, which has left already.
    pub(super) fn has_left(&self, user_id: &str, join: u64) -> bool {
        self.left.get(user_id).is_some_and(|l| join <= *l)
    }

    pub(super) fn subscribe(
        &mut self,
        user_id: String,
        room_id: String,
        publisher: String,
        stream_type: Option<String>,
    ) {
        debug!(user = %user_id, %publisher, ?stream_type, "subscribe");
        self.interests
            .entry(user_id.clone())
            .or_default()
            .insert((publisher.clone(), stream_type));
        let Some(&sub) = self.by_user.get(&user_id) else {
            // Attached when its relay connection comes.
            return;
        };
        if self.peers.get(&sub).is_none_or(|p| p.room_id != room_id) {
            return;
        }
        let Some(&publ) = self.by_user.get(&publisher) else {
            return;
        };
        let tracks: Vec<String> = match self.peers.get(&publ) {
            Some(p) if p.room_id == room_id => p
                .published
                .iter()
                .filter(|(_, t)| self.wants(&user_id, &publisher, &t.ty))
                .map(|(id, _)| id.clone())
                .collect(),
            _ => return,
        };
        for t in tracks {
            self.attach(sub, publ, &t);
        }
    }

    pub(super) fn unsubscribe(
        &mut self,
        user_id: &str,
        publisher: &str,
        stream_type: Option<&str>,
    ) {
        debug!(user = %user_id, %publisher, ?stream_type, "unsubscribe");
        if let Some(i) = self.interests.get_mut(user_id) {
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
        let Some(&sub) = self.by_user.get(user_id) else {
            return;
        };
        let gone: Vec<FeedKey> = self
            .peers
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
            self.drop_feed(sub, &f);
        }
    }
}
