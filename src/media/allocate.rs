//! A subscriber's downlink estimate ([`bwe`]) shared out among what it receives: audio first
//! (a fixed reserve per track: video never starves it), then every video route at its lowest
//! layer, then, screen shares before cameras, each route as high as the rest fits (up to what
//! its subscriber asked for). When a route is held below what it asked for, the relay probes for
//! room to move it up: padding on one of the subscriber's video streams.

use super::*;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;

/// Bits/s kept for each audio track a subscriber receives before video gets any.
const AUDIO_RESERVE: f64 = 64_000.0;
/// A layer whose rate is not known (it is paused, or not yet measured) is taken to be this
/// many times the one below it; a lowest layer, this many bits/s.
const UNKNOWN_STEP: f64 = 3.0;
const UNKNOWN_LOWEST: f64 = 150_000.0;
/// The most padding one packet carries (RTP padding length is one byte).
const MAX_PADDING: usize = 255;

impl MediaCore {
    /// Transport-cc feedback from subscriber `sub`: its estimate updated, its routes' layers
    /// fitted to it.
    pub(super) fn on_transport_feedback(
        &mut self,
        sub: PeerKey,
        fb: &TransportLayerCc,
        now: Instant,
    ) {
        let Some(p) = self.peers.get_mut(&sub) else {
            return;
        };
        if !p.downlink.stamps() {
            return;
        }
        let probed = p.downlink.on_feedback(fb, now);
        if let Some(room) = probed {
            let result = if room { "room" } else { "no_room" };
            self.metrics.bwe_probes.with_label_values(&[result]).inc();
        }
        if p.downlink.reallocate(probed.is_some(), now) {
            self.router.allocate(&mut self.peers, sub, now);
        }
    }

    /// A REMB from subscriber `sub`: where it sends no transport-cc feedback, its estimate, and
    /// its routes' layers fitted to it.
    pub(super) fn on_remb(&mut self, sub: PeerKey, bps: f32, now: Instant) {
        let Some(p) = self.peers.get_mut(&sub) else {
            return;
        };
        if p.downlink.on_remb(bps) && p.downlink.reallocate(false, now) {
            self.router.allocate(&mut self.peers, sub, now);
        }
    }

    /// Padding due on `sub`'s probe: sealed onto one of its video routes.
    pub(super) fn pad(&mut self, sub: PeerKey, now: Instant) {
        let Some(p) = self.peers.get_mut(&sub) else {
            return;
        };
        let due = p.downlink.padding_due(now);
        let (Some(sealer), Some(to)) = (p.sealer.as_mut(), p.remote) else {
            return;
        };
        if due == 0 {
            return;
        }
        let Some(r) = self.router.padding_route(sub) else {
            return;
        };
        let mut left = due;
        while left > 0 {
            let n = left.min(MAX_PADDING);
            if !seal_padding(&mut self.out.tx, r, (sealer, &mut p.downlink), to, n, now) {
                break;
            }
            left -= n;
        }
    }

    /// Once a second: each estimate into `ferry_downlink_estimate_bps`; the routes of a
    /// connection that sends no transport-cc feedback stop waiting for an estimate.
    pub(super) fn observe_estimates(&mut self, now: Instant) {
        let mut silent = Vec::new();
        for (key, p) in self.peers.iter_mut() {
            if let Some(bps) = p.downlink.estimate() {
                self.metrics.downlink_estimate.observe(bps as f64);
            }
            if p.downlink.silent(now) {
                silent.push(*key);
            }
        }
        for key in silent {
            self.router.clear_fits(key);
        }
    }
}

/// The highest temporal layer of a lowest layer of `rate` bits/s that fits `budget` (`u8::MAX`:
/// all of it), moving up only with [`bwe::UP_HEADROOM`] to spare; TID 0 at least.
fn temporal_fit(rate: f64, budget: f64, now: u8) -> u8 {
    let mut t = 0;
    for (tid, share) in TEMPORAL_SHARE.iter().enumerate().skip(1) {
        let cost = rate
            * share
            * if tid as u8 > now {
                bwe::UP_HEADROOM
            } else {
                1.0
            };
        if cost > budget {
            break;
        }
        t = tid as u8;
    }
    if t == 2 { u8::MAX } else { t }
}

/// One video route of a subscriber, as the allocation sees it.
#[derive(Clone, Copy)]
pub(super) struct Candidate {
    /// Its place in the walk over the subscriber's routes.
    index: usize,
    screen: bool,
    /// Bits/s of each layer up to the one asked for (`layers` of them).
    rates: [f64; 4],
    layers: usize,
    wanted: Option<u8>,
    current: Option<u8>,
    fit: Option<u8>,
    /// The highest temporal layer it takes now, and the one it is given.
    temporal_now: u8,
    temporal: u8,
    /// Its track's VP8 frames carry temporal layers.
    layered: bool,
}

/// The share of a layer's bitrate its temporal layers up to TID 0, 1 and 2 take (libwebrtc's split
/// of a three-layer VP8 stream).
const TEMPORAL_SHARE: [f64; 3] = [0.4, 0.6, 1.0];

impl Router {
    /// The subscriber's routes, in a fixed order (the tracks' maps are not changed between two
    /// walks of one allocation).
    fn routes_of(
        &self,
        sub: PeerKey,
    ) -> impl Iterator<Item = (PeerKey, &str, &RoutedTrack, &Route)> {
        self.tracks.iter().flat_map(move |(publisher, tracks)| {
            tracks.iter().filter_map(move |(track, t)| {
                let r = t.routes.iter().find(|r| r.to == sub)?;
                Some((*publisher, track.as_str(), t, r))
            })
        })
    }

    /// Share `sub`'s estimate among its routes (see the module's text): each video route's
    /// `fit`, and a probe when one is held below what it asked for. Nothing is allocated once
    /// the scratch list has grown to the subscriber's routes.
    pub(super) fn allocate(&mut self, peers: &mut Peers, sub: PeerKey, now: Instant) {
        let Some(estimate) = peers.get(&sub).and_then(|s| s.downlink.estimate()) else {
            return;
        };
        let mut budget = estimate as f64;
        let mut video = std::mem::take(&mut self.allocation);
        video.clear();
        for (index, (publisher, track, t, r)) in self.routes_of(sub).enumerate() {
            let Some(p) = peers.get(&publisher).and_then(|p| p.published.get(track)) else {
                continue;
            };
            if p.kind != RtpCodecKind::Video {
                budget -= AUDIO_RESERVE;
                continue;
            }
            let top = p.layers.len().clamp(1, 4) as u8 - 1;
            let wanted = r.quality.layer().map(|l| l.min(top));
            let mut c = Candidate {
                index,
                screen: p.ty == "screen",
                rates: [0.0; 4],
                layers: usize::from(wanted.unwrap_or(0)) + 1,
                wanted,
                current: r.layer,
                fit: None,
                temporal_now: r.temporal,
                temporal: u8::MAX,
                layered: t.temporal_layers && r.vp8.is_some(),
            };
            for l in 0..c.layers {
                let guess = if l == 0 {
                    UNKNOWN_LOWEST
                } else {
                    c.rates[l - 1] * UNKNOWN_STEP
                };
                c.rates[l] = t.rates.bps(l as u8).map_or(guess, |b| b as f64);
            }
            video.push(c);
        }
        // Screen shares first (stable: otherwise in the walk's order).
        video.sort_by_key(|c| !c.screen);
        for c in video.iter().filter(|c| c.wanted.is_some()) {
            budget -= c.rates[0];
        }
        let mut goal = None;
        for c in video.iter_mut() {
            let Some(wanted) = c.wanted else {
                continue;
            };
            let rates = &c.rates[..c.layers];
            let l = bwe::fit_layer(rates, budget + rates[0], c.current);
            // Not even the lowest layer fits: fewer of its frames (VP8 temporal layers, where
            // its frames have them).
            if c.layered {
                c.temporal = temporal_fit(rates[0], budget + rates[0], c.temporal_now);
            }
            budget -= rates[usize::from(l)] - rates[0];
            if l < wanted && goal.is_none() {
                goal = Some(rates[usize::from(l) + 1] * bwe::UP_HEADROOM - rates[usize::from(l)]);
            }
            c.fit = Some(l);
        }
        video.sort_by_key(|c| c.index);
        let mut fits = video.iter().peekable();
        let routes = self
            .tracks
            .values_mut()
            .flat_map(|t| t.values_mut())
            .filter_map(|t| t.routes.iter_mut().find(|r| r.to == sub));
        for (index, r) in routes.enumerate() {
            if let Some(c) = fits.next_if(|c| c.index == index) {
                // Off stays off; otherwise the layer the estimate fits.
                r.fit = Some(c.fit.unwrap_or(0));
                r.temporal = c.temporal;
            }
        }
        self.allocation = video;
        if let (Some(step), Some(s)) = (goal, peers.get_mut(&sub)) {
            let used = estimate as f64 - budget.max(0.0);
            s.downlink.want(used + step, now);
        }
    }

    /// `sub`'s routes follow its receiver reports ([`LossLimit`]): it has no estimate.
    pub(super) fn clear_fits(&mut self, sub: PeerKey) {
        for t in self.tracks.values_mut().flat_map(|t| t.values_mut()) {
            for r in t.routes.iter_mut().filter(|r| r.to == sub) {
                r.fit = None;
            }
        }
    }

    /// A video route to `sub` that padding can ride on: carrying a layer, sealed, its numbering
    /// started.
    pub(super) fn padding_route(&mut self, sub: PeerKey) -> Option<&mut Route> {
        self.tracks
            .values_mut()
            .flat_map(|t| t.values_mut())
            .flat_map(|t| t.routes.iter_mut())
            .find(|r| {
                r.to == sub && r.clock_rate == 90_000 && r.sealed.is_some() && r.munger.started()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowest_layer_that_does_not_fit_loses_its_upper_temporal_layers() {
        // 100 kbit/s lowest layer: TID 0 is 40 k, up to TID 1 60 k, all of it 100 k.
        assert_eq!(temporal_fit(100e3, 150e3, u8::MAX), u8::MAX);
        assert_eq!(temporal_fit(100e3, 99e3, u8::MAX), 1);
        assert_eq!(temporal_fit(100e3, 50e3, u8::MAX), 0);
        assert_eq!(temporal_fit(100e3, 10e3, u8::MAX), 0, "TID 0 always");
        // Up again only with headroom: 100 k fits all, but not all + 15 %.
        assert_eq!(temporal_fit(100e3, 100e3, 1), 1);
        assert_eq!(temporal_fit(100e3, 116e3, 1), u8::MAX);
    }
}
