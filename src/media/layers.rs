//! Simulcast at the relay: a published video track may arrive as several encodings (RFC 8853
//! rid layers, lowest first), and each subscriber's route receives one of them. A route moves to
//! the layer it wants only at a keyframe of that layer, so that its subscriber's decoder never
//! sees a frame that refers to one it did not get; the munger keeps its numbering continuous.

use super::*;

/// The rids the SDK publishes, lowest first (quarter, half, full resolution). Other rids rank
/// after these, in the order they first arrive.
pub const SIMULCAST_RIDS: [&str; 3] = ["q", "h", "f"];

/// What a subscriber asked to receive of a publisher's video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quality {
    Low,
    Medium,
    High,
    /// No video at all.
    Off,
}

impl Quality {
    /// The layer index asked for (clamped to the layers a track has when used), `None` for off.
    pub(super) fn layer(self) -> Option<u8> {
        match self {
            Quality::Low => Some(0),
            Quality::Medium => Some(1),
            Quality::High => Some(2),
            Quality::Off => None,
        }
    }
}

/// One encoding of a published track.
#[derive(Clone, Debug)]
pub(super) struct Layer {
    /// Its rid (empty without simulcast).
    pub(super) rid: String,
    pub(super) ssrc: u32,
}

/// Add or update the layer `rid` (SSRC `ssrc`) of a track's `layers`, kept lowest first.
pub(super) fn learn_layer(layers: &mut Vec<Layer>, rid: &str, ssrc: u32) {
    if let Some(l) = layers.iter_mut().find(|l| l.rid == rid) {
        l.ssrc = ssrc;
        return;
    }
    layers.push(Layer {
        rid: rid.to_string(),
        ssrc,
    });
    let rank = |rid: &str| {
        SIMULCAST_RIDS
            .iter()
            .position(|r| *r == rid)
            .unwrap_or(SIMULCAST_RIDS.len())
    };
    // Stable: rids of unknown rank keep their arrival order.
    layers.sort_by_key(|l| rank(&l.rid));
}

/// Which of `layers` a packet of SSRC `ssrc` belongs to (a track with one layer: that one).
pub(super) fn layer_of(layers: &[Layer], ssrc: u32) -> Option<u8> {
    if layers.len() <= 1 {
        return Some(0);
    }
    layers
        .iter()
        .position(|l| l.ssrc == ssrc)
        .and_then(|i| u8::try_from(i).ok())
}

/// The codecs whose keyframes the relay recognizes (to switch layers on them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Keyframes {
    Vp8,
    H264,
    /// Not recognized: a route of such a track switches layers at any packet.
    #[default]
    Unknown,
}

impl Keyframes {
    pub(super) fn of(mime: &str) -> Keyframes {
        if mime.eq_ignore_ascii_case("video/VP8") {
            Keyframes::Vp8
        } else if mime.eq_ignore_ascii_case("video/H264") {
            Keyframes::H264
        } else {
            Keyframes::Unknown
        }
    }

    /// Whether `payload` starts a keyframe.
    pub(super) fn starts_keyframe(self, payload: &[u8]) -> bool {
        match self {
            Keyframes::Vp8 => vp8_keyframe(payload),
            Keyframes::H264 => h264_keyframe(payload),
            Keyframes::Unknown => false,
        }
    }
}

/// RFC 7741: the payload descriptor, then (at the start of partition 0) the VP8 frame header,
/// whose first bit is 0 for a key frame.
fn vp8_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let (extended, start, partition) = (b0 & 0x80 != 0, b0 & 0x10 != 0, b0 & 0x07);
    if !start || partition != 0 {
        return false;
    }
    let mut i = 1;
    if extended {
        let Some(&x) = p.get(1) else {
            return false;
        };
        i = 2;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let Some(&m) = p.get(i) else {
                return false;
            };
            i += if m & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID / KEYIDX
        }
    }
    p.get(i).is_some_and(|h| h & 0x01 == 0)
}

/// RFC 6184: an IDR slice (NAL type 5) or a sequence parameter set (7, sent before an IDR),
/// alone, in a STAP-A (24) or at the start of a FU-A (28).
fn h264_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let key = |t: u8| t == 5 || t == 7;
    match b0 & 0x1f {
        24 => {
            let mut i = 1;
            while i + 2 < p.len() {
                let len = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
                if key(p[i + 2] & 0x1f) {
                    return true;
                }
                i += 2 + len;
            }
            false
        }
        28 => p.get(1).is_some_and(|h| h & 0x80 != 0 && key(h & 0x1f)),
        t => key(t),
    }
}

/// The bitrate each layer of a track arrives at, measured over about a second.
#[derive(Default)]
pub(super) struct LayerRates {
    bytes: [u64; 4],
    since: Option<Instant>,
    bps: [u64; 4],
    /// When a packet of each layer last came.
    last: [Option<Instant>; 4],
}

/// A layer none of whose packets came for this long is not flowing (the publisher stopped it:
/// its own bandwidth or CPU): routes on it move to the highest that is.
const LAYER_GONE: Duration = Duration::from_millis(500);

impl LayerRates {
    pub(super) fn add(&mut self, layer: u8, bytes: usize, now: Instant) {
        let since = *self.since.get_or_insert(now);
        self.bytes[usize::from(layer.min(3))] += bytes as u64;
        self.last[usize::from(layer.min(3))] = Some(now);
        let secs = now.saturating_duration_since(since).as_secs_f64();
        if secs >= 1.0 {
            for (b, r) in self.bytes.iter_mut().zip(self.bps.iter_mut()) {
                *r = (*b as f64 * 8.0 / secs) as u64;
                *b = 0;
            }
            self.since = Some(now);
        }
    }

    /// The highest layer whose packets are coming.
    pub(super) fn live_top(&self, now: Instant) -> Option<u8> {
        (0..4u8).rev().find(|l| {
            self.last[usize::from(*l)]
                .is_some_and(|t| now.saturating_duration_since(t) < LAYER_GONE)
        })
    }

    /// The bitrate of `layer`, once measured.
    pub(super) fn bps(&self, layer: u8) -> Option<u64> {
        self.bps.get(usize::from(layer)).copied().filter(|b| *b > 0)
    }
}

impl Route {
    /// The layer this route should carry of a track whose highest is `top`: what its subscriber
    /// asked for, under what its link takes (`None`: no video).
    pub(super) fn wanted_layer(&self, top: u8) -> Option<u8> {
        let link = self.fit.unwrap_or(self.limit.ceiling);
        self.quality.layer().map(|l| l.min(link).min(top))
    }
}

/// What one route does with a packet of `layer`: `want` is the layer its subscriber should get
/// (clamped to the track's layers), `None` for none.
pub(super) fn route_takes(r: &mut Route, layer: u8, keyframe: bool, want: Option<u8>) -> Take {
    let Some(want) = want else {
        r.layer = None;
        return Take::Skip;
    };
    if r.layer == Some(layer) {
        if want != layer {
            return Take::ForwardWantingKeyframe;
        }
        return Take::Forward;
    }
    if layer != want {
        return Take::Skip;
    }
    if !keyframe {
        return Take::SkipWantingKeyframe;
    }
    let up = r.layer.is_none_or(|l| layer > l);
    r.layer = Some(layer);
    Take::Switched { up }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Take {
    Forward,
    /// Forward (the route's current layer), and ask for a keyframe on the layer it wants.
    ForwardWantingKeyframe,
    Skip,
    /// Not this packet; a keyframe of its layer would let the route switch to it.
    SkipWantingKeyframe,
    /// The route moved to this packet's layer (`up`: a higher one, or its first): forward it.
    Switched {
        up: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_ranked_lowest_first_whatever_their_arrival() {
        let mut layers = Vec::new();
        learn_layer(&mut layers, "f", 3);
        learn_layer(&mut layers, "q", 1);
        learn_layer(&mut layers, "h", 2);
        let rids: Vec<&str> = layers.iter().map(|l| l.rid.as_str()).collect();
        assert_eq!(rids, ["q", "h", "f"]);
        learn_layer(&mut layers, "h", 22);
        assert_eq!(layer_of(&layers, 22), Some(1));
        assert_eq!(layer_of(&layers, 99), None);
        assert_eq!(
            layer_of(&layers[..1], 99),
            Some(0),
            "one layer takes any SSRC"
        );
    }

    #[test]
    fn keyframes_are_recognized_in_vp8_and_h264_payloads() {
        // VP8: X=1 S=1 PID=0, I=1 M=1 (15-bit picture id), then the frame header.
        assert!(Keyframes::Vp8.starts_keyframe(&[0x90, 0x80, 0x80, 0x01, 0x10]));
        assert!(!Keyframes::Vp8.starts_keyframe(&[0x90, 0x80, 0x80, 0x01, 0x11]));
        // Not the start of a partition.
        assert!(!Keyframes::Vp8.starts_keyframe(&[0x80, 0x80, 0x80, 0x01, 0x10]));
        // Short descriptor.
        assert!(Keyframes::Vp8.starts_keyframe(&[0x10, 0x9c]));
        assert!(!Keyframes::Vp8.starts_keyframe(&[0x10, 0x9d]));
        // H264: an IDR slice, a STAP-A with SPS, the first FU-A of an IDR; a P slice.
        assert!(Keyframes::H264.starts_keyframe(&[0x65, 0x88]));
        assert!(Keyframes::H264.starts_keyframe(&[0x78, 0x00, 0x02, 0x67, 0x42]));
        assert!(Keyframes::H264.starts_keyframe(&[0x7c, 0x85, 0x88]));
        assert!(!Keyframes::H264.starts_keyframe(&[0x41, 0x9a]));
        assert!(!Keyframes::H264.starts_keyframe(&[0x7c, 0x05, 0x88]));
        assert!(!Keyframes::Unknown.starts_keyframe(&[0x10, 0x00]));
    }

    #[test]
    fn a_route_switches_only_at_a_keyframe_of_the_layer_it_wants() {
        let mut r = test_route();
        // The first packet of the wanted layer that is a keyframe starts it.
        assert_eq!(
            route_takes(&mut r, 2, false, Some(2)),
            Take::SkipWantingKeyframe
        );
        assert_eq!(route_takes(&mut r, 0, true, Some(2)), Take::Skip);
        assert_eq!(
            route_takes(&mut r, 2, true, Some(2)),
            Take::Switched { up: true }
        );
        assert_eq!(route_takes(&mut r, 2, false, Some(2)), Take::Forward);
        // It wants the lowest now: the highest goes on until the lowest has a keyframe.
        assert_eq!(
            route_takes(&mut r, 2, false, Some(0)),
            Take::ForwardWantingKeyframe
        );
        assert_eq!(
            route_takes(&mut r, 0, false, Some(0)),
            Take::SkipWantingKeyframe
        );
        assert_eq!(
            route_takes(&mut r, 0, true, Some(0)),
            Take::Switched { up: false }
        );
        assert_eq!(route_takes(&mut r, 2, true, Some(0)), Take::Skip);
        // Off: nothing, and the next start needs a keyframe again.
        assert_eq!(route_takes(&mut r, 0, true, None), Take::Skip);
        assert_eq!(
            route_takes(&mut r, 0, false, Some(0)),
            Take::SkipWantingKeyframe
        );
    }

    fn test_route() -> Route {
        Route {
            to: 1,
            sender_id: RTCRtpSenderId::default(),
            ssrc: 1,
            payload_type: 96,
            munger: Munger::default(),
            ext_map: Box::new([0; 256]),
            clock_rate: 90_000,
            last_sent: None,
            sealed: None,
            layer: None,
            quality: Quality::High,
            limit: LossLimit::default(),
            fit: None,
            vp8: None,
            temporal: u8::MAX,
        }
    }
}

/// Loss a subscriber reports (RTCP fraction lost, of 256) at or above which its route steps down a
/// layer: about 10 %.
const LOSS_DOWN: u8 = 26;
/// Loss below which a report counts as clean: about 2 %.
const LOSS_CLEAN: u8 = 5;
/// The least time between two steps down (a report about the old layer may still come); none
/// after a step up.
const DOWN_SPACING: Duration = Duration::from_secs(2);
/// Clean reports for this long before a step up; doubled (to [`UP_WAIT_MAX`]) when a step up is
/// followed by a step down within [`FAILED_UP`], so a link at the edge does not flap.
const UP_WAIT: Duration = Duration::from_secs(8);
const UP_WAIT_MAX: Duration = Duration::from_secs(64);
const FAILED_UP: Duration = Duration::from_secs(10);

/// A route's own limit on its layer, from what its subscriber's receiver reports say of the loss
/// on its link (the relay has no bandwidth estimate per subscriber yet): too much loss, a layer
/// down; clean for a while, a layer up.
#[derive(Clone, Debug)]
pub(super) struct LossLimit {
    /// The highest layer the route may take.
    pub(super) ceiling: u8,
    changed: Option<(Instant, bool)>,
    clean_since: Option<Instant>,
    up_wait: Duration,
    /// Packets sent, and packets the subscriber NACKed, since the last report: NACKs tell of
    /// loss within a round trip, a receiver report only every second or so.
    sent: u32,
    nacked: u32,
    /// Bytes sent since `since` (the last report).
    bytes: u64,
    since: Option<Instant>,
    /// What the link delivered while it was losing (bits/s), and when: a layer above it is not
    /// tried again until this is [`CAPACITY_MEMORY`] old.
    capacity: Option<(u64, Instant)>,
}

/// How long a link's measured capacity keeps a route from trying a layer above it.
const CAPACITY_MEMORY: Duration = Duration::from_secs(30);

impl Default for LossLimit {
    fn default() -> Self {
        LossLimit {
            ceiling: u8::MAX,
            changed: None,
            clean_since: None,
            up_wait: UP_WAIT,
            sent: 0,
            nacked: 0,
            bytes: 0,
            since: None,
            capacity: None,
        }
    }
}

impl LossLimit {
    /// A reception report for the route: `fraction_lost` (of 256) since the last one; `current`
    /// is the layer it takes, `top` the highest the track has, `next_bps` the bitrate of the
    /// layer above it (when known). `Some(up)` when the ceiling moved.
    pub(super) fn on_report(
        &mut self,
        fraction_lost: u8,
        (current, top, next_bps): (Option<u8>, u8, Option<u64>),
        now: Instant,
    ) -> Option<bool> {
        let interval = self
            .since
            .map(|t| now.saturating_duration_since(t).as_secs_f64());
        if fraction_lost >= LOSS_DOWN
            && let Some(secs) = interval.filter(|s| *s >= 0.2)
        {
            // Saturated: what got through is about what the link carries.
            let delivered =
                self.bytes as f64 * 8.0 / secs * (1.0 - f64::from(fraction_lost) / 256.0);
            self.capacity = Some((delivered as u64, now));
        }
        (self.sent, self.nacked, self.bytes, self.since) = (0, 0, 0, Some(now));
        let since = |t: Option<(Instant, bool)>| t.map(|(t, _)| now.saturating_duration_since(t));
        if fraction_lost >= LOSS_DOWN {
            self.clean_since = None;
            let layer = current?.min(self.ceiling);
            // Steps down are spaced (a report may still be about the layer before); a step up
            // that does not fit is undone at once.
            let last_down = self.changed.filter(|(_, up)| !up);
            if layer == 0 || since(last_down).is_some_and(|d| d < DOWN_SPACING) {
                return None;
            }
            if let Some((t, true)) = self.changed
                && now.saturating_duration_since(t) < FAILED_UP
            {
                self.up_wait = (self.up_wait * 2).min(UP_WAIT_MAX);
            }
            self.ceiling = layer - 1;
            self.changed = Some((now, false));
            return Some(false);
        }
        if fraction_lost >= LOSS_CLEAN {
            self.clean_since = None;
            return None;
        }
        let clean = *self.clean_since.get_or_insert(now);
        if self.ceiling >= top || now.saturating_duration_since(clean) < self.up_wait {
            return None;
        }
        // A layer the link was measured too thin for, lately, is not tried.
        if let (Some((capacity, at)), Some(next)) = (self.capacity, next_bps)
            && now.saturating_duration_since(at) < CAPACITY_MEMORY
            && next > capacity * 9 / 10
        {
            return None;
        }
        self.ceiling += 1;
        self.changed = Some((now, true));
        self.clean_since = Some(now);
        Some(true)
    }

    /// A packet of the route (`bytes` of payload) went out.
    pub(super) fn on_sent(&mut self, bytes: u64) {
        self.sent = self.sent.saturating_add(1);
        self.bytes += bytes;
    }

    /// The subscriber NACKed `n` packets of the route: once at least [`NACK_WINDOW`] were sent,
    /// NACKs for as many as [`LOSS_DOWN`] would report count as that loss, without waiting for
    /// the next receiver report (a step up that does not fit is undone within a round trip or
    /// two instead of a second or more of frozen picture).
    pub(super) fn on_nacks(
        &mut self,
        n: usize,
        layers: (Option<u8>, u8, Option<u64>),
        now: Instant,
    ) -> Option<bool> {
        self.nacked = self.nacked.saturating_add(n as u32);
        if self.sent < NACK_WINDOW {
            return None;
        }
        let fraction = (u64::from(self.nacked) * 256 / u64::from(self.sent)).min(255) as u8;
        if fraction < LOSS_DOWN {
            return None;
        }
        self.on_report(fraction, layers, now)
    }
}

/// Packets sent before NACKs alone can step a route down.
const NACK_WINDOW: u32 = 20;

#[cfg(test)]
mod loss_tests {
    use super::*;

    #[test]
    fn loss_steps_down_clean_reports_step_up_and_a_failed_step_up_waits_longer() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = LossLimit::default();
        // Heavy loss on the top layer: down one, and not again within 2 s.
        assert_eq!(l.on_report(80, (Some(2), 2, None), at(0)), Some(false));
        assert_eq!(l.ceiling, 1);
        assert_eq!(l.on_report(80, (Some(2), 2, None), at(1)), None);
        assert_eq!(l.on_report(80, (Some(1), 2, None), at(3)), Some(false));
        assert_eq!(l.ceiling, 0);
        assert_eq!(
            l.on_report(80, (Some(0), 2, None), at(6)),
            None,
            "nothing below 0"
        );
        // Clean for 8 s: up one.
        assert_eq!(l.on_report(0, (Some(0), 2, None), at(7)), None);
        assert_eq!(l.on_report(0, (Some(0), 2, None), at(15)), Some(true));
        assert_eq!(l.ceiling, 1);
        // Loss right after the step up: down, and the next step up waits twice as long.
        assert_eq!(l.on_report(80, (Some(1), 2, None), at(17)), Some(false));
        assert_eq!(l.on_report(0, (Some(0), 2, None), at(18)), None);
        assert_eq!(
            l.on_report(0, (Some(0), 2, None), at(26)),
            None,
            "8 s is no longer enough"
        );
        assert_eq!(l.on_report(0, (Some(0), 2, None), at(34)), Some(true));
        // NACKs for 10 % of what was sent step down at once (past the spacing).
        for _ in 0..30 {
            l.on_sent(1000);
        }
        assert_eq!(
            l.on_nacks(2, (Some(1), 2, None), at(36)),
            None,
            "under 10 %"
        );
        assert_eq!(l.on_nacks(2, (Some(1), 2, None), at(36)), Some(false));
        assert_eq!(l.ceiling, 0);
        l.ceiling = 1;
        // Moderate loss holds the ceiling and restarts the clean period.
        assert_eq!(l.on_report(10, (Some(1), 2, None), at(35)), None);
        assert_eq!(l.ceiling, 1);
    }

    #[test]
    fn a_layer_above_what_the_link_delivered_under_loss_is_not_tried() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = LossLimit::default();
        assert_eq!(l.on_report(0, (Some(2), 2, None), at(0)), None);
        // One second at the top layer, 125 kB sent (1 Mbit/s), half of it lost: the link
        // carries about 500 kbit/s.
        for _ in 0..125 {
            l.on_sent(1000);
        }
        assert_eq!(l.on_report(128, (Some(2), 2, None), at(1000)), Some(false));
        // Clean for long on layer 1: layer 2 at 1 Mbit/s is not tried while that is known...
        for s in 2..30 {
            let next = Some(1_000_000);
            assert_eq!(
                l.on_report(0, (Some(1), 2, next), at(s * 1000)),
                None,
                "{s}"
            );
        }
        // ...a layer that fits would be, and 30 s later the link is tried again.
        let mut later = l.clone();
        assert_eq!(
            l.on_report(0, (Some(1), 2, Some(300_000)), at(29_500)),
            Some(true)
        );
        let next = Some(1_000_000);
        assert_eq!(
            later.on_report(0, (Some(1), 2, next), at(31_500)),
            Some(true)
        );
    }

    #[test]
    fn loss_reports_hold_on_moderate_loss() {
        let t0 = Instant::now();
        let mut l = LossLimit {
            ceiling: 1,
            ..LossLimit::default()
        };
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(l.on_report(10, (Some(1), 2, None), at(35)), None);
        assert_eq!(l.ceiling, 1);
    }
}
