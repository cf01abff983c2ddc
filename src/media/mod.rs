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

mod guard;
mod munger;
pub mod srtp;
use crate::net::udp::{MediaSocket, RX_BATCH, RxBatch, TxBatch};
use crate::net::{self, Kind, stun};
pub use munger::Munger;

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
    ssrc: u32,
    receiver_id: rtc::rtp_transceiver::RTCRtpReceiverId,
    /// 'cam' | 'screen'.
    ty: String,
    /// Stream id the subscribers see: `<publisher userId>~<cam|screen>`.
    stream_id: String,
    /// Its recent packets, to answer subscribers' NACKs on the own sealing path.
    history: History,
}

/// Packets kept per published track (and entries per route) to answer NACKs: ~2 s of
/// 2.5 Mbit/s video. One copy per published track serves every subscriber.
const RETRANSMIT_BUFFER: usize = 512;

/// Largest data channel message a relay connection takes or sends (its `a=max-message-size`).
pub const SCTP_MAX_MESSAGE_BYTES: u32 = 16 * 1024;
/// A relay connection's SCTP receive window (rtc's default is 1 MiB).
const SCTP_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024;

/// A published track's last [`RETRANSMIT_BUFFER`] packets, by sequence number.
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
    /// When each of this publisher's tracks last got a keyframe request (throttle).
    last_pli: HashMap<String, Instant>,
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

pub struct MediaCore {
    socket: MediaSocket,
    /// Datagrams produced by the current drain, sent in one batch at its end.
    tx: TxBatch,
    /// Receive times of the packets forwarded in the current drain (latency is observed once
    /// they are handed to the kernel).
    forwarded_rx: Vec<Instant>,
    /// Packet counters of the current drain, added to the shared metrics once at its end (the
    /// shards would otherwise contend on the same atomics for every packet).
    counts: PacketCounts,
    local_addr: SocketAddr,
    advertised: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    sink: Arc<dyn ClientSink>,
    next_key: PeerKey,
    peers: FxHashMap<PeerKey, Peer>,
    by_user: HashMap<String, PeerKey>,
    by_ufrag: HashMap<String, PeerKey>,
    by_addr: FxHashMap<SocketAddr, PeerKey>,
    /// Subscriber user id -> (publisher user id, source or every source) it wants through the
    /// relay. Kept while the subscriber is in the room, across its relay connections.
    interests: HashMap<String, HashSet<(String, Option<String>)>>,
    /// publisher -> its track id -> subscribers (nested so the packet path looks up by `&str`).
    routes: FxHashMap<PeerKey, FxHashMap<String, Vec<Route>>>,
    dirty: FxHashSet<PeerKey>,
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

/// rtc's default interceptors (NACK both ways, TWCC feedback to the publisher, sender and
/// receiver reports, simulcast header extensions), with the retransmission buffer sized for a
/// relay that keeps one per subscriber stream. The receiving ones (NACK generator, TWCC
/// receiver, receiver reports) are `receive_side`, in the NACK generator's slot.
fn relay_interceptors(
    registry: Registry,
    media_engine: &mut MediaEngine,
    receive_side: ReceiveSide,
) -> rtc::shared::error::Result<Registry> {
    use rtc::interceptor::NackResponderBuilder;
    use rtc::interceptor::SenderReportBuilder;
    use rtc::peer_connection::configuration::interceptor_registry::configure_simulcast_extension_headers;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCPFeedback, RTCRtpHeaderExtensionCapability, TYPE_RTCP_FB_NACK, TYPE_RTCP_FB_TRANSPORT_CC,
    };
    for parameter in ["", "pli"] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: TYPE_RTCP_FB_NACK.to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    let registry = registry
        .with(
            Slot::NackResponder,
            BindOnFirstWrite::new(
                NackResponderBuilder::new()
                    .with_size(RETRANSMIT_BUFFER as u16)
                    .build(),
            ),
        )
        .with(Slot::NackGenerator, receive_side);
    configure_simulcast_extension_headers(media_engine)?;
    // Transport-wide CC offered on both kinds (what rtc's `configure_twcc_receiver_only` does to
    // the media engine) and rtc's sender reports; the slots of the TWCC receiver and the receiver
    // reports pass everything on, since `receive_side` has them (filled once: a slot filled
    // twice is a warning per connection).
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: TYPE_RTCP_FB_TRANSPORT_CC.to_owned(),
                ..Default::default()
            },
            kind,
        );
        media_engine.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.to_owned(),
            },
            kind,
            None,
        )?;
    }
    let pass = || Tap::new(|_: &mut TaggedPacket| {}, |_: &TaggedPacket| {});
    Ok(registry
        .with(Slot::SenderReport, SenderReportBuilder::new().build())
        .with(Slot::TwccReceiver, pass())
        .with(Slot::ReceiverReport, pass()))
}

/// A connection's receiving interceptors (rtc's NACK generator, TWCC receiver and receiver
/// reports, in that order), shared: one handle sits in the connection's interceptor chain and
/// sees the packets rtc's pipeline opens, the other is fed by the relay's own packet-in path
/// ([`Peer::open_own`]). Their feedback leaves through the connection's chain either
/// way (its timers drive them). One task uses both handles: the lock is never contended.
#[derive(Clone)]
struct ReceiveSide(Arc<std::sync::Mutex<Stages>>);

/// Interceptors walked as rtc's chain walks its own (read forwards, write backwards, each one's
/// output the next one's input), without the terminal stage rtc's `Registry::build` adds: inbound
/// RTCP goes on to the rest of the connection's chain.
struct Stages {
    stages: Vec<Box<dyn Interceptor>>,
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
    /// The walk's queue between two stages, kept (no allocation per packet).
    belt: std::collections::VecDeque<TaggedPacket>,
}

impl Stages {
    fn walk(
        &mut self,
        first: Option<TaggedPacket>,
        read: bool,
    ) -> Result<(), rtc::shared::error::Error> {
        let Stages {
            stages,
            read: read_out,
            write: write_out,
            belt,
        } = self;
        let out = if read { read_out } else { write_out };
        belt.clear();
        belt.extend(first);
        let n = stages.len();
        for i in 0..n {
            let stage = &mut stages[if read { i } else { n - 1 - i }];
            while let Some(m) = belt.pop_front() {
                if read {
                    stage.handle_read(m)?;
                } else {
                    stage.handle_write(m)?;
                }
            }
            while let Some(m) = if read {
                stage.poll_read()
            } else {
                stage.poll_write()
            } {
                belt.push_back(m);
            }
        }
        out.extend(belt.drain(..));
        Ok(())
    }

    /// The next packet out on one side (read or write), walking the stages for more if none waits.
    fn next(&mut self, read: bool) -> Option<TaggedPacket> {
        let waiting = if read { &self.read } else { &self.write };
        if waiting.is_empty() {
            let _ = self.walk(None, read);
        }
        if read {
            self.read.pop_front()
        } else {
            self.write.pop_front()
        }
    }
}

impl ReceiveSide {
    fn new() -> ReceiveSide {
        use rtc::interceptor::{NackGeneratorBuilder, ReceiverReportBuilder, TwccReceiverBuilder};
        let stages: Vec<Box<dyn Interceptor>> = vec![
            Box::new(NackGeneratorBuilder::new().build()),
            Box::new(TwccReceiverBuilder::new().build()),
            Box::new(ReceiverReportBuilder::new().build()),
        ];
        ReceiveSide(Arc::new(std::sync::Mutex::new(Stages {
            stages,
            read: Default::default(),
            write: Default::default(),
            belt: Default::default(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stages> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The own path's packet through the stages (which only record it) and back, in one lock.
    fn pass_read(&self, msg: TaggedPacket) -> Result<rtc::rtp::Packet, rtc::shared::error::Error> {
        let mut s = self.lock();
        s.walk(Some(msg), true)?;
        let mut packet = None;
        while let Some(m) = s.read.pop_front() {
            if let Packet::Rtp(rtp) = m.message.packet {
                packet = Some(rtp);
            }
        }
        packet.ok_or(rtc::shared::error::Error::ErrShortPacket)
    }

    fn each(&self, mut f: impl FnMut(&mut dyn Interceptor)) {
        for stage in self.lock().stages.iter_mut() {
            f(stage.as_mut());
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for ReceiveSide {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.lock().walk(Some(msg), true)
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.lock().next(true)
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.lock().walk(Some(msg), false)
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.lock().next(false)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.lock()
            .stages
            .iter_mut()
            .try_for_each(|s| s.handle_timeout(now))
    }

    fn poll_timeout(&mut self) -> Option<Self::Time> {
        self.lock()
            .stages
            .iter_mut()
            .filter_map(|s| s.poll_timeout())
            .min()
    }
}

impl Interceptor for ReceiveSide {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.each(|s| s.bind_local_stream(info));
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.each(|s| s.unbind_local_stream(info));
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.each(|s| s.bind_remote_stream(info));
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.each(|s| s.unbind_remote_stream(info));
    }
}

/// Per-kind (audio, video) packet and byte counts not yet added to the metrics.
#[derive(Default)]
struct PacketCounts {
    rtp_in: [u64; 2],
    bytes_in: [u64; 2],
    rtp_out: [u64; 2],
    bytes_out: [u64; 2],
    /// Packets in opened by [relay, rtc].
    opened: [u64; 2],
}

impl PacketCounts {
    fn publish(&mut self, m: &Metrics) {
        let opened = [
            (self.opened[0], &m.srtp_opened_by_relay),
            (self.opened[1], &m.srtp_opened_by_rtc),
        ];
        let per_kind = (0..2).flat_map(|k| {
            [
                (self.rtp_in[k], &m.rtp_in[k]),
                (self.bytes_in[k], &m.bytes_in[k]),
                (self.rtp_out[k], &m.rtp_out[k]),
                (self.bytes_out[k], &m.bytes_out[k]),
            ]
        });
        for (n, c) in opened.into_iter().chain(per_kind) {
            if n > 0 {
                c.inc_by(n);
            }
        }
        *self = PacketCounts::default();
    }
}

/// How late the loop's own timer may wake after the earliest connection timer. Every wake-up runs
/// the timers that are due, so with media flowing (a paced publisher's packet every few
/// milliseconds) connection timers — RTCP reports, TWCC feedback, NACK scans, keyframe-request
/// throttles — ride on packet wake-ups instead of waking the thread themselves: at 1 -> 10 about
/// half the wake-ups were timers', and a wake-up costs ~20-30 µs of kernel and hypervisor time
/// here (docs/performance.md, "Where the time goes"). Timers fire late by at most this, never early (rtc
/// stamps what it sends with the time it is given).
const TIMER_SLACK: Duration = Duration::from_millis(4);

/// Received datagrams handled before what they produced is sent. Larger batches give longer GSO
/// runs per subscriber; smaller ones send the first copies sooner. Measured with `ferry loadgen`,
/// 1 -> 100 (server CPU per forwarded packet): 1: 12.5 us, 4: 8.7 us, 8: 7.7 us, 32: 7.4 us.
const FLUSH_EVERY: usize = 8;

fn random_token(len: usize) -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut r = rand::rng();
    (0..len)
        .map(|_| A[r.random_range(0..A.len())] as char)
        .collect()
}

impl MediaCore {
    /// The DTLS-SRTP profiles new connections accept (default [`srtp::PROFILES`]); each is
    /// sealed by the relay itself.
    pub fn set_srtp_profiles(
        &mut self,
        profiles: Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>,
    ) {
        if !profiles.is_empty() {
            self.srtp_profiles = profiles;
        }
    }

    /// Offer a passive TCP candidate on `port` (ICE-TCP) in every new connection's answer.
    pub fn set_tcp_port(&mut self, port: u16) {
        self.tcp_port = Some(port);
    }

    /// Takes over the media port's `socket` (registered with the current tokio runtime).
    pub fn new(
        socket: std::net::UdpSocket,
        advertised: Vec<SocketAddr>,
        metrics: Arc<Metrics>,
        sink: Arc<dyn ClientSink>,
    ) -> std::io::Result<MediaCore> {
        let local_addr = socket.local_addr()?;
        Ok(MediaCore {
            socket: MediaSocket::new(socket)?,
            tx: TxBatch::default(),
            forwarded_rx: Vec::new(),
            counts: PacketCounts::default(),
            local_addr,
            advertised,
            metrics,
            sink,
            next_key: 1,
            peers: FxHashMap::default(),
            by_user: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: FxHashMap::default(),
            interests: HashMap::new(),
            routes: FxHashMap::default(),
            dirty: FxHashSet::default(),
            timers: Default::default(),
            deadlines: FxHashMap::default(),
            rx_at: Instant::now(),
            scratch_keys: Vec::new(),
            crypto: srtp::KeyCapture::new(),
            srtp_profiles: srtp::PROFILES.to_vec(),
            stun_limiter: guard::SourceLimiter::new(
                guard::STUN_PER_SOURCE_RATE,
                guard::STUN_PER_SOURCE_BURST,
            ),
            scratch: Vec::new(),
            left: HashMap::new(),
            next_consent_sweep: Instant::now() + Duration::from_secs(1),
            tcp_port: None,
            tcp: FxHashMap::default(),
            rx_tcp: false,
        })
    }

    /// Run until `shutdown`: datagrams, commands and timers in; transmits and events out.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut control: mpsc::UnboundedReceiver<Command>,
        mut tcp: Option<mpsc::Receiver<net::tcp::TcpEvent>>,
        shutdown: CancellationToken,
    ) {
        info!(addr = %self.local_addr, "media port (UDP) listening: STUN and relay");
        let mut rx = RxBatch::new(&self.socket);
        info!(
            gso_segments = self.socket.max_gso_segments(),
            "media port batching: up to {RX_BATCH} receive buffers per syscall"
        );
        // One timer for the loop, moved when the next deadline changes (a new one every turn
        // would be registered in and removed from tokio's timer wheel at every wake-up).
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
            self.next_deadline() + TIMER_SLACK,
        ));
        tokio::pin!(sleep);
        loop {
            // Timers are due whatever woke us: a busy socket must not starve them.
            self.handle_timeouts(Instant::now());
            self.flush();
            // Every command sent before the `Leave`s seen so far has been handled.
            if !self.left.is_empty() && commands.is_empty() {
                self.left.clear();
            }
            let deadline = tokio::time::Instant::from_std(self.next_deadline() + TIMER_SLACK);
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(c) = control.recv() => self.handle_command(c, Instant::now()),
                Some(ev) = async {
                    match tcp.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.handle_tcp(ev, Instant::now()),
                c = commands.recv() => match c {
                    Some(c) => self.handle_command(c, Instant::now()),
                    None => break,
                },
                r = self.socket.readable() => match r.and_then(|()| self.socket.try_recv(&mut rx)) {
                    Ok(_) => {
                        let now = Instant::now();
                        for (i, (datagram, from, to)) in rx.received().enumerate() {
                            self.handle_datagram(datagram, from, to, now);
                            if (i + 1) % FLUSH_EVERY == 0 {
                                self.flush();
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "media port receive error"),
                },
                _ = &mut sleep => {}
            }
        }
        for p in self.peers.values_mut() {
            let _ = p.pc.close();
        }
    }

    /// The earliest timer of any peer (or a second from now).
    fn next_deadline(&self) -> Instant {
        self.timers
            .first()
            .map(|(t, _)| *t)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
    }

    /// Re-read one peer's next timer after it was driven (only peers that did something change).
    fn refresh_timer(&mut self, key: PeerKey) {
        if let Some(old) = self.deadlines.remove(&key) {
            self.timers.remove(&(old, key));
        }
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let next = [
            p.pc.poll_timeout(),
            p.pli_at.iter().min().copied(),
            p.parked_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(t) = next {
            self.deadlines.insert(key, t);
            self.timers.insert((t, key));
        }
    }

    /// Fire the timers that are due (only those peers: no scan of every peer).
    fn handle_timeouts(&mut self, now: Instant) {
        if now >= self.next_consent_sweep {
            self.next_consent_sweep = now + Duration::from_secs(1);
            self.expire_consent(now);
        }
        while let Some(&(t, k)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            self.deadlines.remove(&k);
            let Some(p) = self.peers.get_mut(&k) else {
                continue;
            };
            if p.pc.poll_timeout().is_some_and(|t| t <= now) {
                let _ = p.pc.handle_timeout(now);
                take_srtp_keys(p, &self.metrics);
            }
            if p.pli_at.iter().any(|t| *t <= now) {
                p.pli_at.retain(|t| *t > now);
                request_keyframes(p, now);
                self.metrics.keyframe_requests_new_subscriber.inc();
            }
            if p.parked_deadline.is_some_and(|t| t <= now) {
                let expired: Vec<FeedKey> = p
                    .feeds
                    .iter()
                    .filter(|(_, f)| f.parked.as_ref().is_some_and(|(_, t)| *t <= now))
                    .map(|(k, _)| k.clone())
                    .collect();
                for f in expired {
                    self.drop_feed(k, &f);
                }
            }
            // Draining it re-reads its next timer.
            self.dirty.insert(k);
        }
    }

    /// Forget the addresses no authenticated check came from within [`CONSENT_TIMEOUT`].
    fn expire_consent(&mut self, now: Instant) {
        for (k, p) in self.peers.iter_mut() {
            p.addrs.retain(|(a, t)| {
                let fresh = now.saturating_duration_since(*t) < CONSENT_TIMEOUT;
                if !fresh && self.by_addr.get(a) == Some(k) {
                    debug!(user = %p.user_id, addr = %a, "address lost ICE consent");
                    self.by_addr.remove(a);
                    self.socket.forget_source(a);
                }
                fresh
            });
        }
    }

    /// The local address a datagram that arrived at `to` was sent to, as the connections know
    /// it: on a socket bound to one address, that address; on a wildcard socket, the advertised
    /// candidate with that IP, or (behind a 1:1 NAT, `announce` set) the advertised one of the
    /// same family; what rtc's ICE agent checks against its local candidates.
    fn local_for(&self, to: Option<IpAddr>, from: &SocketAddr, tcp: bool) -> SocketAddr {
        if !tcp && !self.socket.is_wildcard() {
            return self.local_addr;
        }
        let port = match (tcp, self.tcp_port) {
            (true, Some(p)) => p,
            _ => self.local_addr.port(),
        };
        let same_ip = to.and_then(|ip| self.advertised.iter().find(|a| a.ip() == ip));
        let same_family = || {
            self.advertised
                .iter()
                .find(|a| a.is_ipv4() == from.is_ipv4())
        };
        let ip = same_ip
            .or_else(same_family)
            .map(|a| a.ip())
            .or(to)
            .unwrap_or(self.local_addr.ip());
        SocketAddr::new(ip, port)
    }

    /// What a client connected over TCP did (see [`net::tcp`]).
    fn handle_tcp(&mut self, ev: net::tcp::TcpEvent, now: Instant) {
        match ev {
            net::tcp::TcpEvent::Opened { peer, writer, .. } => {
                self.tcp.insert(peer, writer);
            }
            net::tcp::TcpEvent::Frame { peer, local, data } => {
                self.rx_tcp = true;
                self.handle_datagram(&data, peer, Some(local.ip()), now);
                self.rx_tcp = false;
            }
            net::tcp::TcpEvent::Closed { peer } => {
                self.tcp.remove(&peer);
                if let Some(k) = self.by_addr.remove(&peer)
                    && let Some(p) = self.peers.get_mut(&k)
                {
                    p.addrs.retain(|(a, _)| *a != peer);
                }
            }
        }
        self.flush();
    }

    /// Queue `datagram` for the client connected over TCP from `to`; false when `to` is not one.
    fn send_tcp(
        tcp: &FxHashMap<SocketAddr, mpsc::Sender<bytes::Bytes>>,
        metrics: &Metrics,
        to: SocketAddr,
        datagram: &[u8],
    ) -> bool {
        let Some(w) = tcp.get(&to) else {
            return false;
        };
        let sent = net::tcp::frame(datagram).is_some_and(|f| w.try_send(f).is_ok());
        if !sent {
            metrics
                .media_dropped
                .with_label_values(&["tcp_overflow"])
                .inc();
        }
        true
    }

    fn handle_datagram(&mut self, buf: &[u8], from: SocketAddr, to: Option<IpAddr>, now: Instant) {
        self.rx_at = now;
        let drop = |m: &Metrics, reason: &str| m.media_dropped.with_label_values(&[reason]).inc();
        let kind = net::classify(buf);
        let key = match kind {
            Kind::Stun => {
                // Requests cost a parse and a reply or an HMAC: each source address gets its
                // share, counted before anything is parsed (a flood then costs a hash per
                // datagram). An address a connection already uses is not counted: a flood from
                // its IP (the same NAT) must not cut its consent checks.
                if stun::is_request(buf)
                    && !self.by_addr.contains_key(&from)
                    && !self.stun_limiter.allow(from.ip(), now)
                {
                    return drop(&self.metrics, "rate_limited");
                }
                match stun::handle(buf, from) {
                    stun::StunAction::Reply(bytes) => {
                        self.metrics.stun_bindings.inc();
                        if self.rx_tcp {
                            Self::send_tcp(&self.tcp, &self.metrics, from, &bytes);
                        } else if self.socket.try_send_one_from(from, to, &bytes).is_err() {
                            drop(&self.metrics, "send_buffer_full");
                        }
                        return;
                    }
                    stun::StunAction::Peer(ufrag) => match self.by_ufrag.get(&ufrag) {
                        Some(&k) => {
                            let Some(p) = self.peers.get_mut(&k) else {
                                return drop(&self.metrics, "unknown_peer");
                            };
                            // The ufrag is in every check in the clear: only a check signed
                            // with our password shows that the sender has the SDP.
                            if !stun::authentic(buf, &p.pwd) {
                                return drop(&self.metrics, "unauthenticated");
                            }
                            learn_address(p, &mut self.by_addr, k, from, now);
                            if let Some(local) = to {
                                self.socket.set_source(from, local);
                            }
                            k
                        }
                        None => return drop(&self.metrics, "unknown_peer"),
                    },
                    stun::StunAction::ByAddress => match self.by_addr.get(&from) {
                        Some(k) => *k,
                        None => return drop(&self.metrics, "unexpected_stun"),
                    },
                    stun::StunAction::Drop(reason) => return drop(&self.metrics, reason),
                }
            }
            Kind::Dtls | Kind::RtpRtcp => match self.by_addr.get(&from) {
                Some(k) => *k,
                None => return drop(&self.metrics, "unknown_peer"),
            },
            Kind::Unknown => return drop(&self.metrics, "malformed"),
        };
        let local_addr = self.local_for(to, &from, self.rx_tcp);
        let Some(p) = self.peers.get_mut(&key) else {
            return drop(&self.metrics, "unknown_peer");
        };
        let transport = TransportContext {
            local_addr,
            peer_addr: from,
            ecn: None,
            transport_protocol: if self.rx_tcp {
                TransportProtocol::TCP
            } else {
                TransportProtocol::UDP
            },
        };
        // A media packet of a stream the own path opens (see `Peer::inbound`).
        if let Some(rtp @ (_, ssrc, _)) = srtp::rtp_header(buf)
            && let Some(i) = p.inbound.iter().position(|(s, _)| *s == ssrc)
        {
            let track = p.inbound[i].1.clone();
            match p.open_own(buf, rtp, transport, now) {
                Ok(packet) => {
                    self.counts.opened[0] += 1;
                    self.forward(key, &track, packet, now);
                }
                Err(reason) => drop(&self.metrics, reason),
            }
            return;
        }
        // SRTP or SRTCP for rtc: only of SSRCs whose first packet authenticated (rtc would make
        // a context for any SSRC it is shown, before checking the tag).
        if kind == Kind::RtpRtcp
            && let Err(reason) = p.admission.admit(buf, p.opener.as_mut(), &mut self.scratch)
        {
            if let Some(n) = p.refusals.note(now) {
                warn!(user = %p.user_id, %from, reason, refused = n,
                      "media packets refused before the connection (not authentic, or too many SSRCs)");
            }
            return drop(&self.metrics, reason);
        }
        let msg = TaggedBytesMut {
            now,
            transport,
            message: BytesMut::from(buf),
        };
        if let Err(e) = p.pc.handle_read(msg) {
            debug!(user = %p.user_id, error = %e, "datagram refused by the connection");
            drop(&self.metrics, "undecryptable");
        }
        take_srtp_keys(p, &self.metrics);
        self.dirty.insert(key);
    }

    /// Drain every connection that may have output: transmits, events, received media.
    fn flush(&mut self) {
        // The key list is reused: no allocation per datagram.
        let mut keys = std::mem::take(&mut self.scratch_keys);
        while !self.dirty.is_empty() {
            keys.extend(self.dirty.drain());
            for k in keys.drain(..) {
                self.drain_peer(k);
            }
        }
        self.scratch_keys = keys;
        self.send_batch();
    }

    /// Hand this drain's datagrams to the kernel. Never waits on the socket: what a full send
    /// buffer does not take is dropped (counted) rather than stalling every other peer.
    fn send_batch(&mut self) {
        if !self.tcp.is_empty() && !self.tx.is_empty() {
            let (tcp, metrics) = (&self.tcp, &self.metrics);
            self.tx
                .take_matching(|to, d| Self::send_tcp(tcp, metrics, to, d));
        }
        if !self.tx.is_empty() {
            let out = self.socket.send(&mut self.tx);
            if out.would_block > 0 {
                self.metrics
                    .media_dropped
                    .with_label_values(&["send_buffer_full"])
                    .inc_by(out.would_block as u64);
            }
            if let Some(e) = out.last_error {
                debug!(error = %e, datagrams = out.failed, "media send failed");
            }
        }
        self.counts.publish(&self.metrics);
        if !self.forwarded_rx.is_empty() {
            let sent = Instant::now();
            for rx_at in self.forwarded_rx.drain(..) {
                self.metrics
                    .forward_latency
                    .observe(sent.saturating_duration_since(rx_at).as_secs_f64());
            }
        }
    }

    fn drain_peer(&mut self, key: PeerKey) {
        let now = Instant::now();
        // Events first: they may add tracks and routes.
        loop {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            let Some(ev) = p.pc.poll_event() else { break };
            self.handle_event(key, ev, now);
        }
        // Media in: route to subscribers.
        loop {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            let Some(TaggedRTCMessage { message, .. }) = p.pc.poll_read() else {
                break;
            };
            match message {
                RTCMessage::RtpPacket(_, _) if !p.may_publish => {
                    self.metrics
                        .media_dropped
                        .with_label_values(&["not_publisher"])
                        .inc();
                }
                RTCMessage::RtpPacket(track_id, packet) => {
                    self.counts.opened[1] += 1;
                    learn_inbound(p, &track_id, &packet.header);
                    self.forward(key, &track_id, packet, now)
                }
                RTCMessage::RtcpPacket(track_id, packets) => {
                    let lost: Vec<u16> = packets
                        .iter()
                        .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
                        .flat_map(|n| n.nacks.iter().flat_map(|pair| pair.into_iter()))
                        .collect();
                    if !lost.is_empty() {
                        self.retransmit(key, &track_id, &lost);
                    }
                    if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                        self.relay_keyframe_request(key, &track_id, now);
                    }
                }
                _ => {}
            }
        }
        // Transmits out.
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        // Queued, sent with everything else of this drain at its end (see `send_batch`).
        while let Some(t) = p.pc.poll_write() {
            // Not STUN (first byte 0-3): DTLS or SRTP, sent on the selected candidate pair.
            if t.message.first().is_some_and(|b| *b > 3) {
                p.remote = Some(t.transport.peer_addr);
            }
            self.tx.push(t.transport.peer_addr, &t.message);
        }
        if p.negotiation_needed
            && p.pc.pending_local_description().is_none()
            && p.pc.pending_remote_description().is_none()
        {
            self.negotiate(key);
        }
        self.refresh_timer(key);
    }

    fn forward(
        &mut self,
        from: PeerKey,
        track_id: &str,
        mut packet: rtc::rtp::Packet,
        now: Instant,
    ) {
        let kind = self
            .peers
            .get(&from)
            .and_then(|p| p.published.get(track_id))
            .map_or(0, |t| usize::from(t.kind == RtpCodecKind::Video));
        let bytes = packet.payload.len() as u64;
        self.counts.rtp_in[kind] += 1;
        self.counts.bytes_in[kind] += bytes;
        let Some(routes) = self.routes.get_mut(&from).and_then(|t| t.get_mut(track_id)) else {
            return;
        };
        // The publisher's extensions are taken out once (the per-subscriber clone then copies no
        // extension list) and each subscriber gets those it negotiated, under its own IDs. The
        // payload is shared.
        let extensions = std::mem::take(&mut packet.header.extensions);
        let (extension, extension_profile) =
            (packet.header.extension, packet.header.extension_profile);
        packet.header.extension = false;
        packet.header.extension_profile = 0;
        for r in routes.iter_mut() {
            let Some(sub) = self.peers.get_mut(&r.to) else {
                continue;
            };
            // The own path: header written and the packet sealed straight into the send batch,
            // from the moment the DTLS handshake gave the keys (and the address it ran on),
            // which can be a few packets before rtc reports the connection connected.
            if let (Some(sealer), Some(to)) = (sub.sealer.as_mut(), sub.remote) {
                let copy = SealedCopy::mapped(&mut r.munger, &packet, &extensions);
                let Some(report_due) = seal_copy(&mut self.tx, r, sealer, to, copy, now) else {
                    r.munger.dropped(packet.header.sequence_number);
                    self.metrics
                        .media_dropped
                        .with_label_values(&["sender_refused"])
                        .inc();
                    continue;
                };
                if report_due && let Some(sealed) = r.sealed.as_ref() {
                    let report = sender_report(r.ssrc, r.clock_rate, sealed, now);
                    if let Some(mut s) = sub.pc.rtp_sender(r.sender_id) {
                        let _ = s.write_rtcp(now, vec![Box::new(report)]);
                        self.dirty.insert(r.to);
                    }
                }
                self.counts.rtp_out[kind] += 1;
                self.counts.bytes_out[kind] += bytes;
                continue;
            }
            // No SRTP keys yet (its DTLS handshake has not finished): nothing could send it.
            // rtc's pipeline would take the packet through its interceptors (the NACK
            // responder's send buffer would be made for it) only to refuse it at SRTP.
            // (Nothing mapped: the subscriber's numbering starts at the first packet it gets.)
            if !sub.connected && sub.sealer.is_none() {
                self.metrics
                    .media_dropped
                    .with_label_values(&["not_connected"])
                    .inc();
                continue;
            }
            let (seq, ts) = r.munger.map(
                packet.header.ssrc,
                packet.header.sequence_number,
                packet.header.timestamp,
            );
            let mut out = packet.clone();
            out.header.ssrc = r.ssrc;
            out.header.payload_type = r.payload_type;
            out.header.sequence_number = seq;
            out.header.timestamp = ts;
            remap_extensions(&extensions, &r.ext_map, &mut out.header);
            // Once the subscriber's connection is up, the packet goes straight into its pipeline:
            // `RTCRtpSender::write_rtp` would rebuild the sender's parameters (allocating) per
            // packet only to check what the route already guarantees (our SSRC, a payload type
            // and extension IDs taken from this sender's negotiated parameters). Before that,
            // the checked path.
            let written = if sub.connected {
                sub.pc
                    .handle_write(TaggedRTCMessage {
                        now,
                        message: RTCMessage::RtpPacket(String::new(), out),
                    })
                    .map(Some)
            } else {
                sub.pc
                    .rtp_sender(r.sender_id)
                    .map(|mut s| s.write_rtp(now, out))
                    .transpose()
            };
            match written {
                Ok(Some(())) => {
                    r.last_sent = Some(now);
                    self.counts.rtp_out[kind] += 1;
                    self.counts.bytes_out[kind] += bytes;
                }
                Err(e) => {
                    debug!(error = %e, "write_rtp refused");
                    r.munger.dropped(packet.header.sequence_number);
                    self.metrics
                        .media_dropped
                        .with_label_values(&["sender_refused"])
                        .inc();
                }
                Ok(None) => {
                    r.munger.dropped(packet.header.sequence_number);
                    self.metrics
                        .media_dropped
                        .with_label_values(&["no_sender"])
                        .inc();
                }
            }
            self.dirty.insert(r.to);
        }
        self.forwarded_rx.push(self.rx_at);
        // Kept (extensions and all) for the subscribers' NACKs: moved, not copied.
        packet.header.extensions = extensions;
        packet.header.extension = extension;
        packet.header.extension_profile = extension_profile;
        if let Some(t) = self
            .peers
            .get_mut(&from)
            .and_then(|p| p.published.get_mut(track_id))
        {
            t.history.store(packet);
        }
    }

    /// A subscriber on the own sealing path lost packets of one of our tracks: send them again
    /// from the publisher's history (rtc's NACK responder answers for the other connections).
    fn retransmit(&mut self, sub: PeerKey, track_id: &str, lost: &[u16]) {
        let Some((publisher, ptrack)) = self.peers.get(&sub).and_then(|s| {
            s.sealer.as_ref()?;
            let feed = s.relayed_tracks.get(track_id)?;
            s.feeds.get(feed)?.bound.clone()
        }) else {
            return;
        };
        if publisher == sub {
            return;
        }
        let Some(r) = self
            .routes
            .get_mut(&publisher)
            .and_then(|t| t.get_mut(&ptrack))
            .and_then(|routes| routes.iter_mut().find(|r| r.to == sub))
        else {
            return;
        };
        // The publisher's history and the subscriber's sealer at once (two different peers).
        let [Some(p), Some(s)] = self.peers.get_disjoint_mut([&publisher, &sub]) else {
            return;
        };
        let (Some(track), Some(sealer), Some(to)) =
            (p.published.get(&ptrack), s.sealer.as_mut(), s.remote)
        else {
            return;
        };
        // Taken out while its route is read for the header, put back below.
        let Some(mut sealed) = r.sealed.take() else {
            return;
        };
        for &seq in lost {
            let sent = sealed.sent[usize::from(seq) % RETRANSMIT_BUFFER];
            if !sent.used || sent.seq != seq {
                continue;
            }
            let Some(original) = track.history.get(sent.publisher_ssrc, sent.publisher_seq) else {
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
            };
            if self.tx.push_with(to, |buf| {
                write_sealed(buf, &header, &original.payload, sealer, roc)
            }) {
                self.metrics.retransmits.inc();
            }
        }
        r.sealed = Some(sealed);
    }

    /// A subscriber asked for a keyframe on one of the tracks we send it: ask its publisher.
    fn relay_keyframe_request(&mut self, sub: PeerKey, track_id: &str, now: Instant) {
        let Some((publisher, ptrack)) = self.peers.get(&sub).and_then(|s| {
            let feed = s.relayed_tracks.get(track_id)?;
            s.feeds.get(feed)?.bound.clone()
        }) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        if p.last_pli
            .get(&ptrack)
            .is_some_and(|t| now.saturating_duration_since(*t) < PLI_THROTTLE)
        {
            return;
        }
        p.last_pli.insert(ptrack.clone(), now);
        let Some(t) = p.published.get(&ptrack) else {
            return;
        };
        let (rid, ssrc) = (t.receiver_id, t.ssrc);
        if send_pli(&mut p.pc, rid, ssrc, now) {
            self.metrics.keyframe_requests_relayed.inc();
        }
        self.dirty.insert(publisher);
    }

    fn handle_event(&mut self, key: PeerKey, ev: RTCPeerConnectionEvent, _now: Instant) {
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

    /// Whether `sub` asked for `publisher`'s `ty` source.
    fn wants(&self, sub: &str, publisher: &str, ty: &str) -> bool {
        self.interests.get(sub).is_some_and(|i| {
            i.contains(&(publisher.to_string(), None))
                || i.contains(&(publisher.to_string(), Some(ty.to_string())))
        })
    }

    /// Give subscriber `sub` a copy of `publisher`'s track: on the feed this source had if it is
    /// waiting for a republished track, else on a new one.
    fn attach(&mut self, sub: PeerKey, publisher: PeerKey, track_id: &str) {
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
    fn unpublish(&mut self, publisher: PeerKey, track_id: &str, now: Instant) {
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
    fn drop_feed(&mut self, sub: PeerKey, key: &FeedKey) {
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

    /// Recompute the header-extension maps of every route from or to `key` (after a
    /// negotiation: IDs are known, and stay as they are, once negotiated).
    fn refresh_ext_maps(&mut self, key: PeerKey) {
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

    fn negotiate(&mut self, key: PeerKey) {
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
    fn has_left(&self, user_id: &str, join: u64) -> bool {
        self.left.get(user_id).is_some_and(|l| join <= *l)
    }

    fn subscribe(
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

    fn unsubscribe(&mut self, user_id: &str, publisher: &str, stream_type: Option<&str>) {
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

    fn handle_offer(
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

    fn new_peer(
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

    fn remove_peer(&mut self, user_id: &str, now: Instant) {
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

/// `sdp` without component-2 (RTCP) candidates: rtc lists each candidate for both components,
/// but the relay requires rtcp-mux (RTP and RTCP on one transport), so the second is noise a
/// client could try to pair.
fn without_rtcp_candidates(sdp: &str) -> String {
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

fn kind_name(kind: RtpCodecKind) -> &'static str {
    if kind == RtpCodecKind::Video {
        "video"
    } else {
        "audio"
    }
}

/// Give `out` the extensions of `from` this subscriber negotiated, under its IDs (`map`).
fn remap_extensions(
    from: &[rtc::rtp::header::Extension],
    map: &[u8; 256],
    out: &mut rtc::rtp::header::Header,
) {
    out.extensions.clear();
    // The publisher's padding belongs to its own extension block.
    out.extensions_padding = 0;
    for e in from {
        let id = map[usize::from(e.id)];
        if id != 0 {
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

/// A published stream's packet that rtc's pipeline opened: from now on the own packet-in path
/// opens that SSRC's packets ([`Peer::open_own`]), continuing after this one. This is
/// the stream's first packet rtc delivered, so its rollover counter is still 0 (streams start
/// after DTLS, which is when the opener is made).
/// An address an authenticated ICE check came from: datagrams from it go to `p` (key `k`) until
/// its consent expires ([`CONSENT_TIMEOUT`]).
fn learn_address(
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

fn learn_inbound(p: &mut Peer, track_id: &str, h: &rtc::rtp::header::Header) {
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
fn take_srtp_keys(p: &mut Peer, metrics: &Metrics) {
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

/// One subscriber's header for a publisher's packet, as an rtc `Header` (the reference
/// [`write_header`] is tested against).
#[cfg(test)]
fn rewrite_header(
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
struct SealedCopy<'a> {
    from: &'a rtc::rtp::header::Header,
    payload: &'a [u8],
    extensions: &'a [rtc::rtp::header::Extension],
    seq: u16,
    ts: u32,
}

impl<'a> SealedCopy<'a> {
    /// The route's copy of `packet` (whose extensions were taken out into `extensions`), its
    /// sequence number and timestamp from the route's munger.
    fn mapped(
        munger: &mut Munger,
        packet: &'a rtc::rtp::Packet,
        extensions: &'a [rtc::rtp::header::Extension],
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
        }
    }
}

/// The own path's work for one subscriber's copy: header written and the packet sealed into the
/// send batch, recorded for NACKs and sender reports. `None`: the sealer refused it (nothing
/// queued). `Some(true)`: the route's sender report is due (see [`sender_report`]).
fn seal_copy(
    tx: &mut TxBatch,
    r: &mut Route,
    sealer: &mut srtp::Sealer,
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
    } = copy;
    let header = CopyHeader {
        from,
        payload_type: r.payload_type,
        ssrc: r.ssrc,
        ext_map: &r.ext_map,
        seq,
        ts,
        extensions,
    };
    let sealed = r.sealed.get_or_insert_with(|| Sealed {
        rollover: Default::default(),
        sent: Box::new([Sent::default(); RETRANSMIT_BUFFER]),
        packets: 0,
        octets: 0,
        last_ts: (ts, now),
        next_report: now,
    });
    let roc = sealed.rollover.roc_for(seq);
    if !tx.push_with(to, |buf| write_sealed(buf, &header, payload, sealer, roc)) {
        return None;
    }
    sealed.sent[usize::from(seq) % RETRANSMIT_BUFFER] = Sent {
        seq,
        publisher_seq: from.sequence_number,
        publisher_ssrc: from.ssrc,
        timestamp: ts,
        used: true,
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

/// What a copy's RTP header carries: the publisher's packet's marker, padding and CSRCs, the
/// route's payload type, SSRC, sequence number and timestamp, and the publisher's extensions this
/// subscriber negotiated, under its IDs.
struct CopyHeader<'a> {
    from: &'a rtc::rtp::header::Header,
    payload_type: u8,
    ssrc: u32,
    ext_map: &'a [u8; 256],
    seq: u16,
    ts: u32,
    extensions: &'a [rtc::rtp::header::Extension],
}

/// Appends a copy's RTP header to `buf` (RFC 3550 5.1; extensions RFC 8285, one-byte form when
/// every one fits it, else two-byte), byte for byte as rtc marshals the same header; its length.
/// Nothing is allocated: the publisher's extension payloads are copied straight in.
fn write_header(buf: &mut Vec<u8>, c: &CopyHeader<'_>) -> usize {
    let start = buf.len();
    let csrc = &c.from.csrc[..c.from.csrc.len().min(15)];
    let forwarded = || {
        c.extensions.iter().filter_map(|e| {
            let id = c.ext_map[usize::from(e.id)];
            (id != 0 && e.payload.len() <= 255).then_some((id, &e.payload[..]))
        })
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

/// Appends header, payload (and padding, as rtc writes it) to `buf` and seals them in place.
fn write_sealed(
    buf: &mut Vec<u8>,
    c: &CopyHeader<'_>,
    payload: &[u8],
    sealer: &mut srtp::Sealer,
    roc: u32,
) -> bool {
    let start = buf.len();
    let header_len = write_header(buf, c);
    buf.extend_from_slice(payload);
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
fn sender_report(
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

fn request_keyframes(p: &mut Peer, now: Instant) {
    let targets: Vec<_> = p
        .published
        .values()
        .filter(|t| t.kind == RtpCodecKind::Video)
        .map(|t| (t.receiver_id, t.ssrc))
        .collect();
    for (rid, ssrc) in targets {
        send_pli(&mut p.pc, rid, ssrc, now);
    }
}

/// Ask a publisher for a keyframe on one of its tracks. False when the receiver is gone.
fn send_pli(
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

/// A pass-through interceptor that sees every packet on its way: `on_read` may mark an inbound one
/// (e.g. for delivery to the application), `on_write` looks at an outbound one. Everything goes on
/// unchanged otherwise, in order.
pub struct Tap<R, W> {
    on_read: R,
    on_write: W,
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

impl<R, W> Tap<R, W>
where
    R: FnMut(&mut TaggedPacket) + Send + Sync,
    W: FnMut(&TaggedPacket) + Send + Sync,
{
    pub fn new(on_read: R, on_write: W) -> Self {
        Tap {
            on_read,
            on_write,
            read: Default::default(),
            write: Default::default(),
        }
    }
}

impl<R, W> Protocol<TaggedPacket, TaggedPacket, ()> for Tap<R, W>
where
    R: FnMut(&mut TaggedPacket) + Send + Sync,
    W: FnMut(&TaggedPacket) + Send + Sync,
{
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        (self.on_read)(&mut msg);
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        (self.on_write)(&msg);
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Self::Time> {
        None
    }
}

impl<R, W> Interceptor for Tap<R, W>
where
    R: FnMut(&mut TaggedPacket) + Send + Sync,
    W: FnMut(&TaggedPacket) + Send + Sync,
{
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// An interceptor whose local streams are bound when rtc first writes a packet of theirs, not
/// when they are negotiated. For rtc's NACK responder: its 512-packet send buffer per stream
/// (~28 kB, allocated at bind) is only ever filled by packets that go through rtc's pipeline,
/// and a connection on the own sealing path sends none (the relay answers its NACKs from the
/// publisher's history), so binding eagerly cost every subscriber ~57 kB for nothing.
pub struct BindOnFirstWrite<I> {
    inner: I,
    /// Negotiated local streams not bound yet, by SSRC.
    pending: FxHashMap<u32, StreamInfo>,
}

impl<I> BindOnFirstWrite<I> {
    pub fn new(inner: I) -> Self {
        Self {
            inner,
            pending: FxHashMap::default(),
        }
    }
}

impl<I: Interceptor> Protocol<TaggedPacket, TaggedPacket, ()> for BindOnFirstWrite<I> {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.inner.handle_read(msg)
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.inner.poll_read()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if !self.pending.is_empty()
            && let Packet::Rtp(p) = &msg.message.packet
            && let Some(info) = self.pending.remove(&p.header.ssrc)
        {
            self.inner.bind_local_stream(&info);
        }
        self.inner.handle_write(msg)
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.inner.poll_write()
    }

    fn handle_event(&mut self, evt: ()) -> Result<(), Self::Error> {
        self.inner.handle_event(evt)
    }

    fn poll_event(&mut self) -> Option<Self::Eout> {
        self.inner.poll_event()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.inner.handle_timeout(now)
    }

    fn poll_timeout(&mut self) -> Option<Self::Time> {
        self.inner.poll_timeout()
    }

    fn close(&mut self) -> Result<(), Self::Error> {
        self.inner.close()
    }
}

impl<I: Interceptor> Interceptor for BindOnFirstWrite<I> {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.pending.insert(info.ssrc, info.clone());
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        if self.pending.remove(&info.ssrc).is_none() {
            self.inner.unbind_local_stream(info);
        }
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.inner.bind_remote_stream(info);
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.inner.unbind_remote_stream(info);
    }
}

/// NACK messages in a compound RTCP packet.
fn count_nacks(packets: &[Box<dyn rtc::rtcp::Packet>]) -> u64 {
    packets
        .iter()
        .filter(|p| {
            p.as_any()
                .is::<rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack>()
        })
        .count() as u64
}

/// Counts NACKs and retransmissions for the metrics. It sits between the pacer (3_000) and rtc's
/// NACK responder (4_000): on the write walk it sees the responder's retransmissions (tagged
/// `Attribute::Retransmission`) and the NACK generator's requests to the publisher; on the read
/// walk, subscribers' NACKs before the responder acts on them. Counter clones are lock-free.
fn count_feedback(metrics: &Metrics) -> impl Interceptor + use<> {
    let received = metrics.nacks_received.clone();
    let (sent, retransmits) = (metrics.nacks_sent.clone(), metrics.retransmits.clone());
    Tap::new(
        move |msg: &mut TaggedPacket| {
            if let Packet::Rtcp(packets) = &msg.message.packet {
                received.inc_by(count_nacks(packets));
            }
        },
        move |msg: &TaggedPacket| match &msg.message.packet {
            Packet::Rtp(_) if msg.message.has(&Attribute::Retransmission) => retransmits.inc(),
            Packet::Rtcp(packets) => sent.inc_by(count_nacks(packets)),
            _ => {}
        },
    )
}

/// A PLI or FIR.
fn is_keyframe_request(p: &dyn rtc::rtcp::Packet) -> bool {
    p.as_any().is::<PictureLossIndication>() || p.as_any().is::<FullIntraRequest>()
}

/// Marks inbound RTCP for delivery to the application (`RTCMessage::RtcpPacket`); everything passes
/// on to rtc's own interceptors either way. The relay uses it for subscribers' keyframe requests
/// and NACKs.
pub struct DeliverRtcp;

impl DeliverRtcp {
    /// PLI, FIR and NACK (the relay answers NACKs itself on its own sealing path).
    pub fn relay_feedback() -> impl Interceptor {
        Self::when(|p| is_keyframe_request(p) || p.as_any().is::<TransportLayerNack>())
    }

    /// PLI and FIR only.
    pub fn keyframe_requests() -> impl Interceptor {
        Self::when(is_keyframe_request)
    }

    /// Compound packets with at least one packet that `wanted` picks.
    fn when(wanted: fn(&dyn rtc::rtcp::Packet) -> bool) -> impl Interceptor {
        Tap::new(
            move |msg: &mut TaggedPacket| {
                if let Packet::Rtcp(packets) = &msg.message.packet
                    && packets.iter().any(|p| wanted(p.as_ref()))
                {
                    msg.message.add(Attribute::DeliverToApplication);
                }
            },
            |_: &TaggedPacket| {},
        )
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

    /// rtc's NACK responder behind `BindOnFirstWrite`: nothing bound (so no send buffer) until
    /// rtc writes a packet of the stream, then it answers NACKs for what was written.
    #[test]
    fn the_nack_responder_binds_a_stream_at_its_first_written_packet() {
        use rtc::interceptor::{AttributedPacket, NackResponderBuilder, RTCPFeedback};
        use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
            TransportLayerNack, nack_pairs_from_sequence_numbers,
        };
        let info = StreamInfo {
            ssrc: 1111,
            payload_type: 96,
            rtcp_feedback: vec![RTCPFeedback {
                typ: "nack".into(),
                parameter: String::new(),
            }],
            ..Default::default()
        };
        let now = Instant::now();
        let tagged = |packet| TaggedPacket {
            now,
            transport: Default::default(),
            message: AttributedPacket::new(packet),
        };
        let rtp = |ssrc, seq| {
            Packet::Rtp(rtc::rtp::Packet {
                header: Header {
                    version: 2,
                    ssrc,
                    sequence_number: seq,
                    payload_type: 96,
                    ..Default::default()
                },
                payload: Bytes::from(vec![seq as u8; 100]),
            })
        };
        let nack = |seqs: &[u16]| {
            Packet::Rtcp(vec![Box::new(TransportLayerNack {
                sender_ssrc: 1,
                media_ssrc: 1111,
                nacks: nack_pairs_from_sequence_numbers(seqs),
            })])
        };
        let mut i = BindOnFirstWrite::new(NackResponderBuilder::new().with_size(512).build());
        i.bind_local_stream(&info);
        assert_eq!(i.pending.len(), 1, "negotiated, not bound");

        // Another stream's packet binds nothing; a NACK before anything was written finds nothing.
        i.handle_write(tagged(rtp(2222, 1))).unwrap();
        assert!(i.poll_write().is_some());
        assert_eq!(i.pending.len(), 1);
        i.handle_read(tagged(nack(&[5]))).unwrap();
        assert!(i.poll_read().is_some(), "the NACK goes on up the chain");
        assert!(i.poll_write().is_none(), "nothing to retransmit");

        // The stream's first packets bind it; a NACK for one of them is answered with it.
        for seq in 5..8 {
            i.handle_write(tagged(rtp(1111, seq))).unwrap();
            assert!(i.poll_write().is_some());
        }
        assert!(i.pending.is_empty(), "bound");
        i.handle_read(tagged(nack(&[6]))).unwrap();
        assert!(i.poll_read().is_some());
        let again = i.poll_write().expect("a retransmission");
        let Packet::Rtp(p) = again.message.packet else {
            panic!("not RTP");
        };
        assert_eq!((p.header.ssrc, p.header.sequence_number), (1111, 6));
        assert_eq!(p.payload, Bytes::from(vec![6u8; 100]));
        assert!(i.poll_write().is_none());

        // Unbinding a bound stream reaches the responder (its history is gone with it).
        i.unbind_local_stream(&info);
        i.handle_read(tagged(nack(&[6]))).unwrap();
        assert!(i.poll_write().is_none());
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
        let route = Route {
            to: 1,
            sender_id: RTCRtpSenderId::default(),
            ssrc: 0x0102_0304,
            payload_type: 111,
            munger: Munger::default(),
            ext_map,
            clock_rate: 90_000,
            last_sent: None,
            sealed: None,
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
        for (extensions, csrc, marker, padding) in cases {
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
                    extensions: &extensions,
                },
            );
            assert_eq!(n, got.len() - 3);
            assert_eq!(&got[3..], &expected[..], "{extensions:?}");
        }
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
        peers: HashMap<PeerKey, (srtp::Sealer, SocketAddr)>,
        routes: Vec<Route>,
        tx: TxBatch,
    }

    impl Fanout {
        /// `transform` with keys made up per subscriber; subscriber `i` gets the publisher's
        /// extension id 2 as its id 3 and nothing for the others.
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
                peers.insert(key, (sealer, addr));
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
                let Some((sealer, to)) = self.peers.get_mut(&r.to) else {
                    continue;
                };
                let copy = SealedCopy::mapped(&mut r.munger, packet, &extensions);
                if seal_copy(&mut self.tx, r, sealer, *to, copy, now).is_some() {
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
