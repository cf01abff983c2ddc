//! A real WebRTC peer for in-process media tests: webrtc-rs `rtc` (sans-I/O) with its own UDP
//! socket on 127.0.0.1, signaling through Ferry's WebSocket protocol to the relay ("server").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry::media::{DeliverRtcp, Tap};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::interceptor::{Packet, Registry, Slot, TaggedPacket};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodecParameters, RtpCodecKind};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::json;
use tokio::net::UdpSocket;

use super::Client;

pub use ferry::loadgen::vp8;
use ferry::media::single_ssrc_track;

/// A member of a relayed room with a connection to Ferry's relay.
/// What a [`MediaClient`] publishes on its relay connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    No,
    /// One video encoding.
    Yes,
    /// Three simulcast encodings (rids q, h, f).
    Simulcast,
}

impl From<bool> for Publish {
    fn from(yes: bool) -> Publish {
        if yes { Publish::Yes } else { Publish::No }
    }
}

thread_local! {
    /// Whether the clients this thread makes from now on negotiate transport-cc (the default,
    /// as browsers do). Per thread: a test's body runs on its own thread, so one test's choice
    /// does not reach the others of its binary.
    static TRANSPORT_CC: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// The clients this thread makes from now on negotiate no transport-cc: no transport-wide
/// numbers on what they send, no feedback on what they receive (so the relay has no estimate of
/// their links but what they send as REMB).
#[allow(dead_code)]
pub fn without_transport_cc() {
    TRANSPORT_CC.with(|t| t.set(false));
}

pub struct MediaClient {
    pub ws: Client,
    pub pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    pub connected: bool,
    /// RTP received, in arrival order: (track id, packet).
    pub received: Vec<(String, rtc::rtp::Packet)>,
    /// Stream ids of the tracks the server opened to us.
    pub tracks: HashMap<String, Vec<String>>,
    /// Tracks the server closed.
    pub closed_tracks: Vec<String>,
    /// Keyframe requests (PLI/FIR) received from the server.
    pub keyframe_requests: usize,
    pub sender: Option<(RTCRtpSenderId, u32)>,
    /// Drop every n-th incoming RTP datagram before decryption (induced loss), 0 = none.
    pub drop_every: usize,
    rtp_seen: usize,
    pub dropped: usize,
    /// Drop every n-th outgoing RTP datagram after encryption (loss on our uplink), 0 = none.
    /// Only first transmissions: retransmissions (a sequence number seen before) pass.
    pub drop_sent_every: usize,
    sent_seqs: std::collections::HashSet<u16>,
    rtp_sent: usize,
    pub dropped_sent: usize,
    pending_answer: Option<String>,
    /// The server's offers, in order.
    pub server_offers: Vec<String>,
    /// Header extensions sent on every packet: (negotiated id on our leg, payload).
    pub send_extensions: Vec<(u8, Bytes)>,
    /// Sender reports received: (SSRC, packet count, RTP time).
    pub sender_reports: Arc<Mutex<Vec<(u32, u32, u32)>>>,
    /// Feedback on what we publish, as received: reception reports (SSRC, extended highest
    /// sequence number, cumulative loss) and transport-wide CC feedback (packet status counts).
    pub reception_reports: Arc<Mutex<Vec<(u32, u32, u32)>>>,
    pub twcc_feedback: Arc<Mutex<Vec<u16>>>,
    /// Every SRTP packet we sent (as sent), and where to.
    pub sent_rtp: Vec<Vec<u8>>,
    relay: Option<SocketAddr>,
    /// Data channels that opened on this connection.
    pub data_channels_open: usize,
    /// Every address a datagram came from.
    pub heard_from: std::collections::HashSet<SocketAddr>,
}

/// Extensions the test peers register when asked to (before rtc's defaults, so that their IDs
/// differ from the relay's): abs-capture-time and video-orientation, both forwarded by Ferry.
pub const TEST_EXTENSIONS: [&str; 2] = [
    "http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time",
    "urn:3gpp:video-orientation",
];

/// The id an SDP gives `uri` in `a=extmap`, if any.
pub fn extmap_id(sdp: &str, uri: &str) -> Option<u8> {
    sdp.lines()
        .filter_map(|l| l.strip_prefix("a=extmap:"))
        .find(|l| l.split_whitespace().nth(1) == Some(uri))
        .and_then(|l| l.split(['/', ' ']).next()?.parse().ok())
}

impl MediaClient {
    /// `ws` must be in the room already. Publishes one VP8 track when `publish` is set, else
    /// opens with a data channel only.
    pub async fn connect(ws: Client, publish: bool) -> MediaClient {
        MediaClient::connect_with(ws, publish, 0x0bad_cafe, false).await
    }

    /// As [`MediaClient::connect`], publishing with `ssrc`, and registering [`TEST_EXTENSIONS`]
    /// when `extensions` is set.
    pub async fn connect_with(
        ws: Client,
        publish: bool,
        ssrc: u32,
        extensions: bool,
    ) -> MediaClient {
        MediaClient::connect_offering(ws, publish, ssrc, extensions, Vec::new()).await
    }

    /// As [`MediaClient::connect_with`], offering only these DTLS-SRTP protection profiles
    /// (empty: rtc's defaults).
    pub async fn connect_offering(
        ws: Client,
        publish: bool,
        ssrc: u32,
        extensions: bool,
        srtp_profiles: Vec<SrtpProtectionProfile>,
    ) -> MediaClient {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        MediaClient::connect_full(ws, publish, ssrc, extensions, srtp_profiles, None, socket).await
    }

    /// As [`MediaClient::connect`], on `socket` (bound elsewhere: another address, another
    /// network namespace).
    pub async fn connect_on(ws: Client, publish: bool, socket: std::net::UdpSocket) -> MediaClient {
        MediaClient::connect_full(ws, publish, 0x0bad_cafe, false, Vec::new(), None, socket).await
    }

    /// As [`MediaClient::connect`], but the offer is handed to `deliver` instead of being sent
    /// over signaling (a test that puts it into the relay some other way).
    pub async fn connect_delivering(
        ws: Client,
        publish: bool,
        deliver: Box<dyn FnOnce(String) + Send>,
    ) -> MediaClient {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        MediaClient::connect_full(
            ws,
            publish,
            0x0bad_cafe,
            false,
            Vec::new(),
            Some(deliver),
            socket,
        )
        .await
    }

    /// The most general way in: `deliver` the offer some other way than signaling when given,
    /// and use `socket` (bound anywhere).
    pub async fn connect_full(
        mut ws: Client,
        publish: impl Into<Publish>,
        ssrc: u32,
        extensions: bool,
        srtp_profiles: Vec<SrtpProtectionProfile>,
        deliver: Option<Box<dyn FnOnce(String) + Send>>,
        socket: std::net::UdpSocket,
    ) -> MediaClient {
        let publish = publish.into();
        socket.set_nonblocking(true).unwrap();
        let socket = UdpSocket::from_std(socket).unwrap();
        let local = socket.local_addr().unwrap();
        let mut media_engine = MediaEngine::default();
        if publish == Publish::Simulcast {
            rtc::peer_connection::configuration::interceptor_registry::configure_simulcast_extension_headers(
                &mut media_engine,
            )
            .unwrap();
        }
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8(),
                    payload_type: 96,
                },
                RtpCodecKind::Video,
            )
            .unwrap();
        if extensions {
            for uri in TEST_EXTENSIONS {
                media_engine
                    .register_header_extension(
                        rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability {
                            uri: uri.to_string(),
                        },
                        RtpCodecKind::Video,
                        None,
                    )
                    .unwrap();
            }
        }
        let sender_reports = Arc::new(Mutex::new(Vec::new()));
        let reception_reports = Arc::new(Mutex::new(Vec::new()));
        let twcc_feedback = Arc::new(Mutex::new(Vec::new()));
        let reports = sender_reports.clone();
        let (receptions, twcc) = (reception_reports.clone(), twcc_feedback.clone());
        let count_reports = Tap::new(
            move |msg: &mut TaggedPacket| {
                if let Packet::Rtcp(packets) = &msg.message.packet {
                    for p in packets {
                        let p = p.as_any();
                        if let Some(sr) = p.downcast_ref::<rtc::rtcp::sender_report::SenderReport>()
                        {
                            reports
                                .lock()
                                .unwrap()
                                .push((sr.ssrc, sr.packet_count, sr.rtp_time));
                        }
                        if let Some(rr) =
                            p.downcast_ref::<rtc::rtcp::receiver_report::ReceiverReport>()
                        {
                            for r in &rr.reports {
                                receptions.lock().unwrap().push((
                                    r.ssrc,
                                    r.last_sequence_number,
                                    r.total_lost,
                                ));
                            }
                        }
                        if let Some(cc) = p.downcast_ref::<rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc>() {
                            twcc.lock().unwrap().push(cc.packet_status_count);
                        }
                    }
                }
            },
            |_: &TaggedPacket| {},
        );
        let registry = Registry::new()
            .with(Slot::from(14_000), DeliverRtcp::keyframe_requests())
            .with(Slot::from(14_001), count_reports);
        let registry = if TRANSPORT_CC.with(|t| t.get()) {
            let registry = register_default_interceptors(registry, &mut media_engine).unwrap();
            // Transport-wide sequence numbers on what we send, as browsers do (rtc's defaults
            // only give feedback on what they receive).
            registry.with(
                Slot::TwccSender,
                rtc::interceptor::TwccSenderBuilder::new().build(),
            )
        } else {
            use rtc::peer_connection::configuration::interceptor_registry as ir;
            let registry = ir::configure_nack(registry, &mut media_engine);
            ir::configure_simulcast_extension_headers(&mut media_engine).unwrap();
            ir::configure_rtcp_reports(registry)
        };
        let mut settings = SettingEngineBuilder::new();
        if !srtp_profiles.is_empty() {
            settings = settings.with_srtp_protection_profiles(srtp_profiles);
        }
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings.build())
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .unwrap();
        let mut sender = None;
        if publish == Publish::Simulcast {
            // Three encodings (rids q, h, f: SSRCs ssrc, ssrc + 1, ssrc + 2), as the SDK sends a
            // relayed camera.
            let encodings = ["q", "h", "f"]
                .iter()
                .enumerate()
                .map(
                    |(i, rid)| rtc::rtp_transceiver::rtp_sender::RTCRtpEncodingParameters {
                        rtp_coding_parameters:
                            rtc::rtp_transceiver::rtp_sender::RTCRtpCodingParameters {
                                rid: rid.to_string(),
                                ssrc: Some(ssrc + i as u32),
                                ..Default::default()
                            },
                        codec: vp8(),
                        ..Default::default()
                    },
                )
                .collect();
            let track = rtc::media_stream::MediaStreamTrack::new(
                "pub-stream".into(),
                "pub-video".into(),
                "synthetic".into(),
                RtpCodecKind::Video,
                encodings,
            );
            sender = Some((pc.add_track(track).unwrap(), ssrc));
        } else if publish == Publish::Yes {
            let track = single_ssrc_track(
                "pub-stream".into(),
                "pub-video".into(),
                "synthetic".into(),
                RtpCodecKind::Video,
                vp8(),
                ssrc,
            );
            sender = Some((pc.add_track(track).unwrap(), ssrc));
        } else {
            pc.create_data_channel("ferry", None).unwrap();
        }
        pc.add_local_candidate(ferry::net::host_candidate(local).unwrap())
            .unwrap();
        let offer = pc.create_offer(None).unwrap();
        pc.set_local_description(Instant::now(), offer).unwrap();
        let sdp = pc.local_description().unwrap().sdp;
        match deliver {
            Some(deliver) => deliver(sdp),
            None => {
                ws.request(
                    "offer",
                    json!({"to": "server", "sdp": sdp, "meta": {"streams": {"pub-stream": "cam"}}}),
                )
                .await
                .expect("relay offer accepted");
            }
        }
        MediaClient {
            ws,
            pc,
            socket,
            local,
            connected: false,
            received: Vec::new(),
            tracks: HashMap::new(),
            closed_tracks: Vec::new(),
            keyframe_requests: 0,
            sender,
            drop_every: 0,
            drop_sent_every: 0,
            rtp_sent: 0,
            sent_seqs: Default::default(),
            dropped_sent: 0,
            rtp_seen: 0,
            dropped: 0,
            pending_answer: None,
            server_offers: Vec::new(),
            send_extensions: Vec::new(),
            sender_reports,
            reception_reports,
            twcc_feedback,
            sent_rtp: Vec::new(),
            relay: None,
            data_channels_open: 0,
            heard_from: Default::default(),
        }
    }

    /// Send one RTP packet on our published track.
    pub fn send(&mut self, seq: u16, payload: Bytes) {
        let (_, ssrc) = self.sender.expect("a publisher");
        let extensions = self.send_extensions.clone();
        self.write(ssrc, seq, extensions, payload);
    }

    /// Send a REMB saying our downlink takes `bps` bits/s, for every stream we receive (as a
    /// receiver that negotiated `goog-remb` and no transport-cc does); nothing before we
    /// receive a track.
    #[allow(dead_code)]
    pub fn send_remb(&mut self, bps: f32) {
        let receivers: Vec<_> = self.pc.get_receivers().collect();
        let ssrcs: Vec<u32> = self
            .received
            .iter()
            .map(|(_, p)| p.header.ssrc)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let remb = rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: bps,
            ssrcs,
        };
        // Nothing to say before the relay opened a track to us.
        let Some(id) = receivers.first() else {
            return;
        };
        self.pc
            .rtp_receiver(*id)
            .expect("receiver")
            .write_rtcp(Instant::now(), vec![Box::new(remb)])
            .expect("write_rtcp");
    }

    /// Send one RTP packet of simulcast layer `layer` (0 = q, 1 = h, 2 = f) of our published
    /// track, with the mid and rid header extensions a browser puts on them.
    pub fn send_layer(&mut self, layer: u32, seq: u16, payload: Bytes) {
        let (sid, ssrc) = self.sender.expect("a publisher");
        let mut s = self.pc.rtp_sender(sid).expect("sender");
        let params = s.get_parameters().rtp_parameters.header_extensions.clone();
        let id = |uri: &str| {
            params
                .iter()
                .find(|h| h.uri == uri)
                .map(|h| h.id as u8)
                .expect("negotiated extension")
        };
        let mid = self
            .pc
            .rtp_transceiver(sid.into())
            .and_then(|t| t.mid().clone())
            .expect("a mid");
        let rid = ["q", "h", "f"][layer as usize];
        let extensions = vec![
            (id("urn:ietf:params:rtp-hdrext:sdes:mid"), Bytes::from(mid)),
            (
                id("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"),
                Bytes::from_static(rid.as_bytes()),
            ),
        ];
        self.write(ssrc + layer, seq, extensions, payload);
    }

    /// One RTP packet of SSRC `ssrc` (a timestamp in step with `seq`) through our sender.
    fn write(&mut self, ssrc: u32, seq: u16, extensions: Vec<(u8, Bytes)>, payload: Bytes) {
        let (sid, _) = self.sender.expect("a publisher");
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker: true,
                payload_type: 96,
                sequence_number: seq,
                timestamp: u32::from(seq) * 3000,
                ssrc,
                extension: !extensions.is_empty(),
                extension_profile: if extensions.is_empty() { 0 } else { 0xBEDE },
                extensions: extensions
                    .into_iter()
                    .map(|(id, payload)| rtc::rtp::header::Extension { id, payload })
                    .collect(),
                ..Default::default()
            },
            payload,
        };
        let mut s = self.pc.rtp_sender(sid).expect("sender");
        s.write_rtp(Instant::now(), packet).expect("write_rtp");
    }

    /// Run the connection (socket, signaling, timers) for `dur`.
    pub async fn pump(&mut self, dur: Duration) {
        let end = tokio::time::Instant::now() + dur;
        let mut buf = vec![0u8; 2048];
        while let Some(m) = self.ws.queued() {
            self.on_signal(m);
        }
        loop {
            self.drain().await;
            let next = self
                .pc
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or(end)
                .min(end);
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => {
                    let (n, from) = r.unwrap();
                    self.heard_from.insert(from);
                    if (128..192).contains(&buf[0]) && buf.get(1).is_some_and(|pt| !(192..224).contains(pt)) {
                        self.rtp_seen += 1;
                        if self.drop_every > 0 && self.rtp_seen.is_multiple_of(self.drop_every) {
                            self.dropped += 1;
                            continue;
                        }
                    }
                    let _ = self.pc.handle_read(TaggedBytesMut {
                        now: Instant::now(),
                        transport: TransportContext {
                            local_addr: self.local,
                            peer_addr: from,
                            ecn: None,
                            transport_protocol: TransportProtocol::UDP,
                        },
                        message: BytesMut::from(&buf[..n]),
                    });
                }
                m = tokio::time::timeout_at(next, self.ws.recv()) => {
                    if let Ok(Some(m)) = m {
                        self.on_signal(m);
                    }
                }
            }
            let _ = self.pc.handle_timeout(Instant::now());
            if tokio::time::Instant::now() >= end {
                self.drain().await;
                return;
            }
        }
    }

    /// Send a datagram of our own making to the relay, on the connection's address.
    pub async fn send_raw(&mut self, datagram: &[u8]) {
        let to = self.relay.expect("media sent to the relay before");
        self.socket.send_to(datagram, to).await.unwrap();
    }

    /// Where this connection's media goes to (the relay's address it was answered with), once
    /// it sent some.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay
    }

    /// Hand back the signaling client (after a `bye` to the server, to connect afresh).
    pub fn into_ws(self) -> Client {
        self.ws
    }

    fn on_signal(&mut self, m: serde_json::Value) {
        if m["from"] != "server" {
            return;
        }
        let sdp = m["sdp"].as_str().unwrap_or_default().to_string();
        match m["type"].as_str() {
            Some("answer") => {
                let d = RTCSessionDescription::answer(sdp).unwrap();
                self.pc.set_remote_description(Instant::now(), d).unwrap();
            }
            Some("offer") => {
                self.server_offers.push(sdp.clone());
                let d = RTCSessionDescription::offer(sdp).unwrap();
                self.pc.set_remote_description(Instant::now(), d).unwrap();
                let a = self.pc.create_answer(None).unwrap();
                self.pc.set_local_description(Instant::now(), a).unwrap();
                let sdp = self.pc.local_description().unwrap().sdp;
                // Sent without waiting for the response; it is skipped when read.
                let msg =
                    json!({"id": "auto-answer", "type": "answer", "to": "server", "sdp": sdp});
                self.pending_answer = Some(msg.to_string());
            }
            _ => {}
        }
    }

    async fn drain(&mut self) {
        if let Some(text) = self.pending_answer.take() {
            self.ws.send_raw(&text).await;
        }
        while let Some(ev) = self.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => {
                    self.connected = s == RTCPeerConnectionState::Connected;
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    self.tracks
                        .insert(init.track_id.clone(), init.stream_ids.clone());
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(id)) => {
                    self.closed_tracks.push(id);
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(_)) => {
                    self.data_channels_open += 1;
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { message, .. }) = self.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(track, p) => self.received.push((track, p)),
                RTCMessage::RtcpPacket(_, _) => self.keyframe_requests += 1,
                _ => {}
            }
        }
        while let Some(t) = self.pc.poll_write() {
            let b = &t.message;
            let rtp = b.len() > 12 && (128..192).contains(&b[0]) && !(192..224).contains(&b[1]);
            if rtp {
                self.sent_rtp.push(b.to_vec());
                self.relay = Some(t.transport.peer_addr);
            }
            if rtp && self.sent_seqs.insert(u16::from_be_bytes([b[2], b[3]])) {
                self.rtp_sent += 1;
                if self.drop_sent_every > 0 && self.rtp_sent.is_multiple_of(self.drop_sent_every) {
                    self.dropped_sent += 1;
                    continue;
                }
            }
            let _ = self.socket.send_to(&t.message, t.transport.peer_addr).await;
        }
    }
}

/// Sockets for the two members of [`relay_room_on`] (`None`: 127.0.0.1).
pub struct RoomSockets {
    pub publisher: Option<std::net::UdpSocket>,
    pub subscriber: Option<std::net::UdpSocket>,
}

/// A relayed room on the server at `addr`: a publisher (one VP8 track, SSRC 0x0badcafe) and a
/// second member (subscribed to the publisher before connecting when `subscribed`), both
/// connected to the relay, offering `profiles` (empty: rtc's defaults) and the test extensions
/// when `extensions`. Returns them and the room's id.
pub async fn relay_room_on(
    addr: SocketAddr,
    subscribed: bool,
    extensions: bool,
    profiles: Vec<SrtpProtectionProfile>,
    sockets: RoomSockets,
) -> (MediaClient, MediaClient, String) {
    let mut a = Client::joined_hello(addr, "publisher").await;
    let room = a.create_room(json!({"mode": "relay"})).await;
    a.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut b = Client::joined_hello(addr, "subscriber").await;
    b.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    if subscribed {
        b.request("subscribe", json!({"userId": a.user_id}))
            .await
            .unwrap();
    }
    let local = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let publisher = sockets.publisher.unwrap_or_else(local);
    let subscriber = sockets.subscriber.unwrap_or_else(local);
    let mut publ = MediaClient::connect_full(
        a,
        true,
        0x0bad_cafe,
        extensions,
        profiles.clone(),
        None,
        publisher,
    )
    .await;
    let mut sub =
        MediaClient::connect_full(b, false, 1, extensions, profiles, None, subscriber).await;
    let slice = Duration::from_millis(5);
    for _ in 0..1000 {
        publ.pump(slice).await;
        sub.pump(slice).await;
        if publ.connected && sub.connected {
            return (publ, sub, room);
        }
    }
    panic!(
        "relay connections did not come up (publisher {}, subscriber {})",
        publ.connected, sub.connected
    );
}
