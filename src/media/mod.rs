//! The relay (SFU) media plane: one task owns the UDP media port and one server-side
//! `rtc::RTCPeerConnection` per relayed client (ICE-lite, DTLS server, one BUNDLE transport).
//!
//! Datagrams are matched to their peer by STUN USERNAME (our ICE ufrag), then by remote address.
//! A publisher's RTP comes out of its connection decrypted; the router hands it to every other
//! relayed member of the room, rewriting only the header (SSRC, payload type, sequence number and
//! timestamp of that subscriber's sender, header extensions under its IDs). Once a subscriber's
//! DTLS handshake has given the relay its SRTP keys ([`srtp`]), each copy is written and sealed
//! straight into the send batch; before that (or without keys) it goes through the subscriber's
//! connection. The payload is shared until it is copied into the send batch.
//!
//! Negotiation: the client offers first (its connection to the server opens with a data channel);
//! when tracks come or go the server offers. The server is the impolite side: an offer from the
//! client that crosses one of ours is ignored and the client rolls back (perfect negotiation).
//!
//! Subscriptions are explicit (`subscribe` / `unsubscribe`, per publisher and source): a relayed
//! member receives what it asked for, so that only the pairs that need the relay use it.

use std::collections::{BTreeMap, HashMap, HashSet};

// The maps the packet path reads (by peer key, address, track id): Fx hashing, several times
// cheaper than SipHash for these keys (SipHash was ~11 % of the relay's instructions per packet).
// Their keys are ours (peer keys), addresses of authenticated peers, or the few track ids of one
// connection: no map an outsider can fill with colliding keys.
use rustc_hash::{FxHashMap, FxHashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::{
    SctpMaxMessageSize, SettingEngineBuilder,
};
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{RTCDtlsRole, RTCIceCandidateInit};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

mod allocate;
mod bwe;
mod connection;
mod feedback;
mod feeds;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod guard;
mod interceptors;
mod layers;
mod munger;
mod peers;
mod router;
mod shard;
pub mod srtp;
mod stats;
mod vp8;

use crate::net::udp::{MediaSocket, RX_BATCH, RxBatch, TxBatch};
use crate::net::{self, Kind, stun};
use connection::*;
use feedback::*;
use forward::*;
use interceptors::*;
pub use interceptors::{BindOnFirstWrite, DeliverRtcp, Tap};
pub use layers::Quality;
use layers::*;
pub use munger::Munger;
use peers::Peers;
use router::*;
use stats::*;

/// The `to`/`from` id that names the server in signaling.
pub const SERVER_ID: &str = "server";

/// Signaling from a client to its server-side connection.
#[derive(Debug)]
pub enum Command {
    Offer {
        user_id: String,
        room_id: String,
        sdp: String,
        meta: Option<Value>,
        /// Which of the member's joins this belongs to (see [`Command::Leave`]).
        join: u64,
        /// The member's token grants `publish`: without it nothing it sends is routed.
        publish: bool,
    },
    Answer {
        user_id: String,
        sdp: String,
    },
    Candidate {
        user_id: String,
        candidate: Value,
    },
    /// Receive `publisher`'s tracks (of one source, or all) through the relay, now and later.
    Subscribe {
        user_id: String,
        room_id: String,
        publisher: String,
        stream_type: Option<String>,
        join: u64,
    },
    Unsubscribe {
        user_id: String,
        publisher: String,
        stream_type: Option<String>,
    },
    /// What `user_id` receives of `publisher`'s video (its simulcast layer, or none), now and
    /// for the tracks it publishes later.
    SetQuality {
        user_id: String,
        publisher: String,
        quality: Quality,
    },
    /// The client closed its relay connection (`bye` to the server): drop the connection and its
    /// tracks; its subscriptions stay (it may open a fresh connection).
    Close {
        user_id: String,
    },
    /// The client left its room or disconnected: drop its connection, its tracks and every
    /// subscription from or to it. Sent on the shard's control queue, which cannot be full (see
    /// [`MediaControl`]), and handled before the commands still queued: an `Offer` or `Subscribe`
    /// of the same join (`join`) that comes after it is ignored.
    Leave {
        user_id: String,
        join: u64,
    },
}

/// A media shard's queues: `commands`, bounded, for what clients ask (a flood of them is refused
/// with `media_unavailable`), and `control`, unbounded, for what must always arrive: a member's
/// `Leave` (one per join, so its length is bounded by the sessions).
pub struct MediaControl {
    pub commands: mpsc::Sender<Command>,
    pub control: mpsc::UnboundedSender<Command>,
}

/// A relay connection's learned addresses lose consent (RFC 7675) this long after the last
/// authenticated ICE check from them; the client's agent sends one every few seconds.
pub const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Addresses one relay connection may be reached at, at once (the oldest makes room).
const MAX_ADDRESSES_PER_CONNECTION: usize = 8;

/// Where the media task sends messages for clients (the signaling hub).
pub trait ClientSink: Send + Sync + 'static {
    fn send_to(&self, user_id: &str, message: Value);
    /// To every member of a room but `except`.
    fn send_to_room(&self, room_id: &str, except: &str, message: Value);
}

type PeerKey = u64;

/// A track a client publishes to the server.
struct Published {
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    /// Its encodings, lowest first: one, or its simulcast layers (see [`layers`]).
    layers: Vec<Layer>,
    receiver_id: rtc::rtp_transceiver::RTCRtpReceiverId,
    /// 'cam' | 'screen'.
    ty: String,
    /// Stream id the subscribers see: `<publisher userId>~<cam|screen>`.
    stream_id: String,
    /// Its layers the publisher was asked to pause (by index, as `layers`).
    paused: Vec<bool>,
}

impl Published {
    /// Sent as simulcast layers (rid-identified), however many have arrived yet.
    fn simulcast(&self) -> bool {
        self.layers.first().is_some_and(|l| !l.rid.is_empty())
    }
}

/// Packets kept per published track (and entries per route) to answer NACKs: ~2 s of
/// 2.5 Mbit/s video. One copy per published track serves every subscriber.
const RETRANSMIT_BUFFER: usize = 512;

/// Largest data channel message a relay connection takes or sends (its `a=max-message-size`).
pub const SCTP_MAX_MESSAGE_BYTES: u32 = 16 * 1024;
/// A relay connection's SCTP receive window (rtc's default is 1 MiB).
const SCTP_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024;

/// A published track's last [`RETRANSMIT_BUFFER`] packets, by sequence number (to answer
/// subscribers' NACKs on the own sealing path).
#[derive(Default)]
struct History {
    slots: Vec<Option<rtc::rtp::Packet>>,
}

impl History {
    fn store(&mut self, packet: rtc::rtp::Packet) {
        if self.slots.is_empty() {
            self.slots.resize_with(RETRANSMIT_BUFFER, || None);
        }
        let i = usize::from(packet.header.sequence_number) % RETRANSMIT_BUFFER;
        self.slots[i] = Some(packet);
    }

    fn get(&self, ssrc: u32, seq: u16) -> Option<&rtc::rtp::Packet> {
        self.slots
            .get(usize::from(seq) % RETRANSMIT_BUFFER)?
            .as_ref()
            .filter(|p| p.header.sequence_number == seq && p.header.ssrc == ssrc)
    }
}

/// What a route sent under one of its sequence numbers (to find it again for a NACK).
#[derive(Clone, Copy, Default)]
struct Sent {
    seq: u16,
    publisher_seq: u16,
    publisher_ssrc: u32,
    timestamp: u32,
    used: bool,
    /// The VP8 picture-id and TL0PICIDX shift it went out under (see [`vp8::Vp8Map`]).
    vp8: (u16, u8),
    /// When it was last sent again (ms since the route's first sealed packet, wrapping).
    resent: Option<u16>,
}

/// A route's state on the own sealing path ([`srtp::Sealer`]): rollover counter, what it sent
/// (for NACKs) and the sender-report counters.
struct Sealed {
    rollover: srtp::Rollover,
    sent: Box<[Sent; RETRANSMIT_BUFFER]>,
    packets: u32,
    octets: u32,
    /// The last timestamp sent and when (the sender report's RTP/NTP mapping).
    last_ts: (u32, Instant),
    next_report: Instant,
    /// Its first sealed packet (`Sent::resent` counts from it).
    since: Instant,
}

/// How often a sealed route sends a sender report (rtc's report interval).
const SENDER_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// What one subscriber receives of one publisher: keyed by the publisher's user id (not its
/// connection), source and kind, so that a publisher that republishes or reconnects within
/// [`REPUBLISH_GRACE`] continues on the same subscriber track, SSRC and sequence numbering.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FeedKey {
    publisher: String,
    ty: String,
    kind: RtpCodecKind,
    /// Tells apart two live tracks of the same source and kind (rare).
    n: u8,
}

/// A subscriber's outgoing track for one [`FeedKey`].
struct Feed {
    sender_id: RTCRtpSenderId,
    stream_id: String,
    mime: String,
    /// The publisher's track it carries now.
    bound: Option<(PeerKey, String)>,
    /// Its route while no publisher track is bound, and when it is dropped if none comes back.
    parked: Option<(Route, Instant)>,
}

/// One subscriber's copy of a published track (the per-packet state of the forwarder).
struct Route {
    to: PeerKey,
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    payload_type: u8,
    munger: Munger,
    /// Publisher's header-extension id -> this subscriber's id for the same URI (0: not sent).
    ext_map: Box<[u8; 256]>,
    clock_rate: u32,
    last_sent: Option<Instant>,
    /// Set once the subscriber's packets are sealed by the relay itself.
    sealed: Option<Sealed>,
    /// The layer of the publisher's track it carries now (`None`: none yet, or off).
    layer: Option<u8>,
    /// What its subscriber asked for.
    quality: Quality,
    /// The highest layer its subscriber's link takes (from its reception reports), where the
    /// subscriber sends no transport-cc feedback.
    limit: LossLimit,
    /// The highest layer its subscriber's bandwidth estimate fits (see [`bwe`]): when set, it
    /// replaces `limit`.
    fit: Option<u8>,
    /// VP8: its picture ids and TL0PICIDX, continuous across layer switches.
    vp8: Option<vp8::Vp8Map>,
    /// The highest VP8 temporal layer (TID) it takes (`u8::MAX`: all): fewer frames of its lowest
    /// layer when even that does not fit its subscriber's estimate.
    temporal: u8,
}

/// How long a subscriber keeps a track whose publisher stopped sending it, waiting for the same
/// source to come back (republish, reconnect), before removing it.
pub const REPUBLISH_GRACE: Duration = Duration::from_secs(3);

/// Header extensions forwarded end to end (their IDs remapped per subscriber). The others belong
/// to one leg and are not forwarded: transport-cc and abs-send-time (the relay's own congestion
/// feedback), mid / rid / repaired-rid (each connection's own BUNDLE demux).
pub const FORWARDED_EXTENSIONS: [(&str, RtpCodecKind); 7] = [
    (
        "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        RtpCodecKind::Audio,
    ),
    ("urn:3gpp:video-orientation", RtpCodecKind::Video),
    (
        "http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time",
        RtpCodecKind::Audio,
    ),
    (
        "http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time",
        RtpCodecKind::Video,
    ),
    (
        "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
        RtpCodecKind::Video,
    ),
    (
        "http://www.webrtc.org/experiments/rtp-hdrext/video-content-type",
        RtpCodecKind::Video,
    ),
    (
        "http://www.webrtc.org/experiments/rtp-hdrext/color-space",
        RtpCodecKind::Video,
    ),
];

struct Peer {
    user_id: String,
    room_id: String,
    pc: RTCPeerConnection,
    ufrag: String,
    /// Client stream id -> 'cam' | 'screen' (from the `meta` of its offers).
    stream_types: HashMap<String, String>,
    /// Track id (in this connection) -> what it publishes.
    published: FxHashMap<String, Published>,
    /// What it receives through the relay.
    feeds: HashMap<FeedKey, Feed>,
    /// Stream id -> (publisher userId, type), for the client to map streams to members.
    stream_meta: BTreeMap<String, Value>,
    negotiation_needed: bool,
    /// Keyframe requests to send to this publisher at these times (a new subscriber joined).
    pli_at: Vec<Instant>,
    /// Our outgoing track id -> the feed it carries, to send a subscriber's keyframe requests
    /// upstream.
    relayed_tracks: HashMap<String, FeedKey>,
    /// Connection state, as its metric label.
    state: String,
    /// When each of this publisher's streams (by SSRC) last got a keyframe request (throttle).
    last_pli: HashMap<u32, Instant>,
    /// ICE failed (so a failed connection failed at ICE, not at DTLS).
    ice_failed: bool,
    /// The connection is up (DTLS done): relayed packets skip `write_rtp`'s checks.
    connected: bool,
    /// The earliest time a parked feed expires: kept here because the timer is re-read after
    /// every packet, and a scan of every feed there would be per-packet work.
    parked_deadline: Option<Instant>,
    /// Seals its relayed packets (AES-GCM profiles; set when DTLS completes, see [`srtp`]).
    sealer: Option<srtp::Sealer>,
    /// Where its connection sends (the last address rtc sent DTLS or SRTP to).
    remote: Option<SocketAddr>,
    /// Connected without a [`srtp::Sealer`]: rtc seals its relayed packets (counted once).
    sealed_by_rtc: bool,
    /// Opens its media packets on the relay's own packet-in path (set when DTLS completes).
    opener: Option<srtp::Opener>,
    /// The SSRCs it publishes that the own path opens, and their track ids: each learned from
    /// the first packet rtc's pipeline delivered for it.
    inbound: Vec<(u32, Arc<str>)>,
    /// Its NACK generator, TWCC feedback and receiver reports: fed by rtc's chain and by the
    /// own path alike.
    receive_side: ReceiveSide,
    /// Our ICE password: checks must carry MESSAGE-INTEGRITY made with it.
    pwd: String,
    /// The addresses learned from its authenticated checks, and when each last sent one.
    addrs: Vec<(SocketAddr, Instant)>,
    /// The SSRCs rtc may see packets of.
    admission: guard::Admission,
    refusals: guard::RefusalLog,
    /// Its token grants `publish`.
    may_publish: bool,
    /// Its downlink's transport-cc stamping, feedback, bandwidth estimate and probing.
    downlink: bwe::Downlink,
}

impl Peer {
    /// The own packet-in path: a media packet of a stream learned from rtc's pipeline (see
    /// [`Peer::inbound`]) opened here and shown to the connection's receiving interceptors (NACKs,
    /// TWCC feedback, receiver reports), ready to forward, without rtc's pipeline (its handlers,
    /// queues and copies were about 40 % of the relay's instructions per packet in). What does
    /// not open is dropped (the reason, a `ferry_media_dropped_total` label): such a stream's
    /// packets are never handed to rtc, whose replay window stopped where the own path took over.
    fn open_own(
        &mut self,
        buf: &[u8],
        (header_len, ssrc, seq): (usize, u32, u16),
        transport: TransportContext,
        now: Instant,
    ) -> Result<rtc::rtp::Packet, &'static str> {
        let opener = self.opener.as_mut().ok_or("undecryptable")?;
        let mut data = BytesMut::from(buf);
        let range = opener.open(&mut data, header_len, ssrc, seq).map_err(|e| {
            debug!(user = %self.user_id, ssrc, seq, error = %e, "media packet refused");
            "undecryptable"
        })?;
        // rtc's own parse (padding dropped as it does), over shared bytes: the payload and the
        // header extensions are slices of `data`, not copies.
        let mut opened = data.freeze().slice(..range.end);
        let packet = <rtc::rtp::Packet as rtc::shared::marshal::Unmarshal>::unmarshal(&mut opened)
            .map_err(|e| {
                debug!(user = %self.user_id, error = %e, "malformed media packet");
                "malformed"
            })?;
        let msg = TaggedPacket {
            now,
            transport,
            message: rtc::interceptor::AttributedPacket::new(Packet::Rtp(packet)),
        };
        // Through the receiving interceptors (they only record it) and back.
        self.receive_side.pass_read(msg).map_err(|e| {
            debug!(user = %self.user_id, error = %e, "receiving interceptors refused a packet");
            "undecryptable"
        })
    }

    /// Re-read [`Peer::parked_deadline`] after a feed was parked, resumed or dropped.
    fn update_parked_deadline(&mut self) {
        self.parked_deadline = self
            .feeds
            .values()
            .filter_map(|f| f.parked.as_ref().map(|(_, t)| *t))
            .min();
    }
}

/// Keyframe requests from one subscriber reach the publisher at most this often per track.
const PLI_THROTTLE: Duration = Duration::from_millis(500);

/// One shard's relay: its connections, its router, its timers, and what they produce. The
/// shard's loop (`shard.rs`) feeds it datagrams, commands and timeouts and sends its [`Outbox`];
/// the parts it owns are separate fields so that each step borrows only what it touches.
pub struct MediaCore {
    socket: MediaSocket,
    /// What this drain produced, sent at its end.
    out: Outbox,
    local_addr: SocketAddr,
    advertised: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    sink: Arc<dyn ClientSink>,
    /// The relayed connections and their indexes.
    peers: Peers,
    /// Who receives which published track, and the copies' state.
    router: Router,
    /// Every peer's next timer, ordered, and the entry each peer has in it.
    timers: std::collections::BTreeSet<(Instant, PeerKey)>,
    deadlines: FxHashMap<PeerKey, Instant>,
    /// When the datagram being processed arrived (forwarding latency is measured from here).
    rx_at: Instant,
    scratch_keys: Vec<PeerKey>,
    /// The crypto provider of every connection (ring, plus SRTP key capture).
    crypto: Arc<srtp::KeyCapture>,
    /// The DTLS-SRTP profiles offered to every connection (`srtp_profiles`).
    srtp_profiles: Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>,
    /// STUN requests per source address.
    stun_limiter: guard::SourceLimiter,
    /// A decrypted copy of a packet being authenticated.
    scratch: Vec<u8>,
    /// Members whose `Leave` came (on the control queue): their latest join that left. Commands
    /// of that join still in the command queue are ignored; cleared once that queue was empty.
    left: HashMap<String, u64>,
    /// When learned addresses are next checked for consent.
    next_consent_sweep: Instant,
    /// The datagram being handled came over TCP.
    rx_tcp: bool,
    /// The ICE-TCP port (see [`crate::net::tcp`]), when the relay takes media over TCP.
    tcp_port: Option<u16>,
    /// Clients connected over TCP, by address: where their framed datagrams go.
    tcp: FxHashMap<SocketAddr, mpsc::Sender<bytes::Bytes>>,
    /// The table sizes last added into `ferry_table_entries` (see `report_tables`).
    reported_tables: [i64; crate::metrics::MEDIA_TABLES.len()],
    /// `max_handshakes_per_ip`.
    max_handshakes_per_ip: usize,
}

impl MediaCore {
    /// A command from signaling (see [`Command`]).
    pub fn handle_command(&mut self, c: Command, now: Instant) {
        let (peers, out) = (&mut self.peers, &mut self.out);
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
                self.handle_offer((user_id, room_id), sdp, meta, publish, now)
            }
            Command::Answer { user_id, sdp } => self.apply_answer(&user_id, sdp, now),
            Command::Candidate { user_id, candidate } => {
                let Some(k) = peers.key_of(&user_id) else {
                    return;
                };
                let p = peers.get_mut(&k).expect("indexed peer exists");
                if let Ok(c) = serde_json::from_value::<RTCIceCandidateInit>(candidate)
                    && !c.candidate.is_empty()
                {
                    let _ = p.pc.add_remote_candidate(c);
                }
                out.needs_poll.insert(k);
            }
            Command::Subscribe {
                user_id,
                room_id,
                publisher,
                stream_type,
                join,
            } => {
                if !self.has_left(&user_id, join) {
                    self.router.subscribe(
                        &mut self.peers,
                        &mut self.out,
                        (user_id, room_id),
                        (publisher, stream_type),
                        now,
                    )
                }
            }
            Command::Unsubscribe {
                user_id,
                publisher,
                stream_type,
            } => self
                .router
                .unsubscribe(peers, out, &user_id, &publisher, stream_type.as_deref()),
            Command::SetQuality {
                user_id,
                publisher,
                quality,
            } => self
                .router
                .set_quality(peers, &user_id, &publisher, quality),
            Command::Close { user_id } => self.remove_peer(&user_id, now),
            Command::Leave { user_id, join } => {
                let latest = self.left.entry(user_id.clone()).or_insert(join);
                *latest = (*latest).max(join);
                self.remove_peer(&user_id, now);
                self.router
                    .forget_member(&mut self.peers, &mut self.out, &user_id);
            }
        }
    }

    /// A command of `user_id`'s join `join`, which has left already.
    fn has_left(&self, user_id: &str, join: u64) -> bool {
        self.left.get(user_id).is_some_and(|l| join <= *l)
    }
}

/// A track sent as one encoding, in `codec`, with our own `ssrc` (the relay's outgoing tracks, and
/// the load generator's and tests' synthetic ones).
pub fn single_ssrc_track(
    stream_id: String,
    track_id: String,
    label: String,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    ssrc: u32,
) -> MediaStreamTrack {
    MediaStreamTrack::new(
        stream_id,
        track_id,
        label,
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    )
}

fn kind_name(kind: RtpCodecKind) -> &'static str {
    if kind == RtpCodecKind::Video {
        "video"
    } else {
        "audio"
    }
}

/// The relay's per-subscriber forwarding work outside a running server, for the routing
/// benchmark (`benches/routing.rs`): the same [`seal_copy`] the forwarder runs for every
/// connected subscriber whose packets the relay seals (sequence/timestamp munging, header
/// rewrite with extension remapping, SRTP sealing into the send batch, the NACK record), over
/// routes and sealers built from fixed keys, and the send batch's grouping per destination.
#[doc(hidden)]
pub mod bench {
    use super::*;

    /// One publisher track fanned out to `n` subscribers, each with its own connection's sealer.
    pub struct Fanout {
        peers: HashMap<PeerKey, (srtp::Sealer, SocketAddr, bwe::Downlink)>,
        routes: Vec<Route>,
        tx: TxBatch,
    }

    impl Fanout {
        /// `transform` with keys made up per subscriber; subscriber `i` gets the publisher's
        /// extension id 2 as its id 3 and nothing for the others, and a transport-cc
        /// sequence number under id 5 (as a Chromium subscriber negotiates).
        pub fn new(n: usize, transform: srtp::Transform) -> Fanout {
            let mut peers = HashMap::new();
            let mut routes = Vec::new();
            for i in 0..n {
                let key_len = match transform {
                    srtp::Transform::Gcm(rtc::crypto::AeadAlgorithm::Aes256Gcm) => 32,
                    _ => 16,
                };
                let keys = srtp::SrtpKeys {
                    transform,
                    session_key: vec![i as u8; key_len],
                    session_salt: vec![0x5a; 14],
                    auth_key: vec![0x3c; 20],
                    rtcp: None,
                };
                let sealer = srtp::Sealer::new(&keys).expect("sealer");
                let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16));
                let key = i as PeerKey * 7 + 1;
                let downlink = bwe::Downlink::new(5);
                peers.insert(key, (sealer, addr, downlink));
                let mut ext_map = Box::new([0u8; 256]);
                ext_map[2] = 3;
                routes.push(Route {
                    to: key,
                    sender_id: RTCRtpSenderId::default(),
                    ssrc: 0x1000_0000 + i as u32,
                    payload_type: 96 + (i % 4) as u8,
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
                });
            }
            Fanout {
                peers,
                routes,
                tx: TxBatch::default(),
            }
        }

        /// Forwards one packet to every subscriber (the packet's extensions taken out first, as
        /// the forwarder does once per packet); the number of copies queued.
        pub fn forward(&mut self, packet: &mut rtc::rtp::Packet, now: Instant) -> usize {
            let extensions = std::mem::take(&mut packet.header.extensions);
            packet.header.extension = false;
            let mut queued = 0;
            for r in self.routes.iter_mut() {
                let Some((sealer, to, downlink)) = self.peers.get_mut(&r.to) else {
                    continue;
                };
                let copy = SealedCopy::mapped(&mut r.munger, packet, &extensions, None);
                if seal_copy(&mut self.tx, r, (sealer, downlink), *to, copy, now).is_some() {
                    queued += 1;
                }
            }
            packet.header.extension = !extensions.is_empty();
            packet.header.extensions = extensions;
            queued
        }

        /// Groups the queued datagrams per destination into GSO runs (as the send does before
        /// its syscalls) and empties the batch: the bytes queued.
        pub fn drain(&mut self, max_segments: usize) -> usize {
            let mut bytes = 0;
            self.tx
                .drain_runs(max_segments, |t, _| bytes += t.contents.len());
            bytes
        }
    }
}
