//! One load-generator client's media side: a webrtc-rs (`rtc`, sans-I/O) peer connection to the
//! server with its own UDP socket on a local address, driven here whatever the server; and
//! [`Signal`], what a server's signaling does for it (Ferry's in `ferry.rs`, Janus's in
//! `janus.rs`, both over a [`JsonWs`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::Value;

use super::measure::{Shared, StreamLoss};
use super::ws::JsonWs;
use crate::media::{DeliverRtcp, single_ssrc_track, srtp};
use crate::net::udp::{MediaSocket, RxBatch};

/// Bytes at the start of every synthetic payload: send time (µs since the run's epoch, u64),
/// the stream's own packet counter (u32), the stream index (u32).
pub const STAMP: usize = 16;

fn err(e: rtc::shared::error::Error) -> String {
    e.to_string()
}

pub fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

pub fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// What a publisher sends.
#[derive(Clone, Copy)]
pub struct Source {
    pub video_bps: u64,
    pub packet_bytes: usize,
    pub fps: u32,
    pub audio: bool,
    /// Video packets go out paced at this multiple of `video_bps` (0: a frame at once).
    pub pacing_factor: f64,
    /// Video as three simulcast layers ([`LAYERS`]).
    pub simulcast: bool,
}

/// A simulcast publisher's layers: rid and share of the video bitrate (quarter, half and full
/// resolution: about 1/16 and 1/4 of the full layer's pixels).
pub const LAYERS: [(&str, f64); 3] = [("q", 1.0 / 16.0), ("h", 0.25), ("f", 1.0)];

impl Source {
    /// The time between two packets of a paced frame.
    pub fn packet_gap(&self) -> Option<std::time::Duration> {
        (self.pacing_factor > 0.0 && self.video_bps > 0).then(|| {
            std::time::Duration::from_secs_f64(
                (self.packet_bytes * 8) as f64 / (self.pacing_factor * self.video_bps as f64),
            )
        })
    }
}

struct Outgoing {
    sender: RTCRtpSenderId,
    /// Its rid ("" without simulcast) and share of the video bitrate.
    rid: &'static str,
    share: f64,
    ssrc: u32,
    seq: u16,
    counter: u32,
    stream: u32,
    clock_rate: u32,
    /// A simulcast layer the relay said nobody receives (dynacast): not sent.
    paused: bool,
}

/// A frame being sent: its size, packets, timestamp and (paced) which packet goes next and when.
struct Frame {
    /// Of which of the video layers (0 for audio).
    layer: usize,
    keyframe: bool,
    bytes: usize,
    packet_bytes: usize,
    packets: usize,
    next: usize,
    ts: u32,
    next_at: Instant,
    gap: std::time::Duration,
}

pub struct Peer {
    pc: RTCPeerConnection,
    /// Received with `recvmmsg` (and GRO unless turned off), as the relay receives.
    socket: MediaSocket,
    /// Taken out while its datagrams are handled.
    rx: Option<RxBatch>,
    local: SocketAddr,
    /// Its ICE-TCP side (`--tcp`), instead of UDP.
    tcp: Option<TcpSide>,
    pub connected: bool,
    /// Its video: one encoding, or simulcast layers (lowest first).
    video: Vec<Outgoing>,
    audio: Option<Outgoing>,
    /// The video frames (one per layer) being sent paced.
    frames: Vec<Frame>,
    /// A simulcast publisher's mid and rid extension ids and its mid, once connected.
    simulcast_ext: Option<(u8, u8, bytes::Bytes)>,
    /// A subscriber's emulated downlink (`--downlinks`).
    downlink: Option<Bucket>,
    /// A keyframe was asked for: the next video frame is a large one.
    keyframe_wanted: bool,
    /// Per received stream (publisher's stream index): counters for loss.
    pub loss: HashMap<u32, StreamLoss>,
    pub first_media_at: Option<Instant>,
    shared: Arc<Shared>,
    /// A light subscriber's receiving SRTP keys, once its DTLS handshake derived them.
    opener: Option<srtp::Opener>,
    /// Receives light (`--light-subscribers`, and publishes nothing).
    light: bool,
    /// A received datagram, opened in place.
    scratch: Vec<u8>,
}

impl Peer {
    /// A peer connection with a UDP socket on `local_ip`, publishing (video, and audio when asked)
    /// as stream `publish.1`, or with no media of its own; not negotiated yet.
    pub async fn new(
        local_ip: IpAddr,
        publish: Option<(Source, u32)>,
        shared: Arc<Shared>,
    ) -> Result<Peer, String> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(local_ip, 0))
            .map_err(|e| format!("UDP socket on {local_ip}: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        let socket =
            MediaSocket::new(socket).map_err(|e| format!("UDP socket on {local_ip}: {e}"))?;
        if !shared.gro {
            socket
                .disable_gro()
                .map_err(|e| format!("UDP GRO off on {local_ip}: {e}"))?;
        }
        // One buffer (a GRO chain of up to 64 datagrams): a thousand clients hold 128 MiB.
        let rx = RxBatch::with_buffers(&socket, 1);
        let mut media_engine = MediaEngine::default();
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8(),
                    payload_type: 96,
                },
                RtpCodecKind::Video,
            )
            .map_err(err)?;
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus(),
                    payload_type: 111,
                },
                RtpCodecKind::Audio,
            )
            .map_err(err)?;
        let registry = Registry::new().with(Slot::from(14_000), DeliverRtcp::keyframe_requests());
        let registry = register_default_interceptors(registry, &mut media_engine).map_err(err)?;
        let light = shared.light && publish.is_none();
        if publish.is_some_and(|(src, _)| src.simulcast) {
            rtc::peer_connection::configuration::interceptor_registry::configure_simulcast_extension_headers(
                &mut media_engine,
            )
            .map_err(err)?;
        }
        let mut setting_engine = SettingEngineBuilder::new();
        if let Some(profiles) = &shared.srtp_profiles {
            setting_engine = setting_engine.with_srtp_protection_profiles(profiles.clone());
        }
        if light {
            // The SRTP keys it derives are captured (see `media::srtp`), to open packets itself.
            setting_engine = setting_engine.with_crypto_provider(srtp::KeyCapture::new());
        }
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(setting_engine.build())
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .map_err(err)?;
        let (mut video, mut audio) = (Vec::new(), None);
        if let Some((src, stream)) = publish {
            let outgoing = |sender, ssrc, stream, (rid, share), clock_rate| Outgoing {
                sender,
                rid,
                share,
                ssrc,
                seq: rand::random(),
                counter: 0,
                stream,
                clock_rate,
                paused: false,
            };
            let track =
                |pc: &mut RTCPeerConnection, kind: RtpCodecKind, codec: RTCRtpCodec, id: &str| {
                    let ssrc: u32 = rand::random();
                    let t = single_ssrc_track(
                        format!("lg-{stream}"),
                        format!("{id}-{stream}"),
                        "loadgen".into(),
                        kind,
                        codec.clone(),
                        ssrc,
                    );
                    let index = stream * 2 + u32::from(kind == RtpCodecKind::Audio);
                    pc.add_track(t)
                        .map(|sender| outgoing(sender, ssrc, index, ("", 1.0), codec.clock_rate))
                };
            if src.simulcast {
                let ssrcs: Vec<u32> = LAYERS.iter().map(|_| rand::random()).collect();
                let encodings = LAYERS
                    .iter()
                    .zip(&ssrcs)
                    .map(|((rid, _), ssrc)| {
                        rtc::rtp_transceiver::rtp_sender::RTCRtpEncodingParameters {
                            rtp_coding_parameters:
                                rtc::rtp_transceiver::rtp_sender::RTCRtpCodingParameters {
                                    rid: rid.to_string(),
                                    ssrc: Some(*ssrc),
                                    ..Default::default()
                                },
                            codec: vp8(),
                            ..Default::default()
                        }
                    })
                    .collect();
                let t = rtc::media_stream::MediaStreamTrack::new(
                    format!("lg-{stream}"),
                    format!("video-{stream}"),
                    "loadgen".into(),
                    RtpCodecKind::Video,
                    encodings,
                );
                let sender = pc.add_track(t).map_err(err)?;
                // Each layer a stream of its own for the receivers' loss counts.
                for (l, (layer, ssrc)) in LAYERS.iter().zip(ssrcs).enumerate() {
                    let index = (stream * 2) | ((l as u32) << 24);
                    video.push(outgoing(sender, ssrc, index, *layer, 90_000));
                }
            } else {
                video.push(track(&mut pc, RtpCodecKind::Video, vp8(), "video").map_err(err)?);
            }
            if src.audio {
                audio = Some(track(&mut pc, RtpCodecKind::Audio, opus(), "audio").map_err(err)?);
            }
        }
        let downlink = match shared.downlinks.len() {
            0 => None,
            _ if publish.is_some() || light => None,
            n => {
                let i = shared.next_downlink.fetch_add(1, Ordering::Relaxed) as usize;
                Some(shared.downlinks[i % n])
                    .filter(|b| *b > 0)
                    .map(Bucket::new)
            }
        };
        let tcp = shared.tcp.then(|| TcpSide::new(local_ip));
        let candidate = match tcp {
            Some(_) => crate::net::tcp_active_candidate(local_ip),
            None => crate::net::host_candidate(local),
        };
        pc.add_local_candidate(candidate.map_err(err)?)
            .map_err(err)?;
        Ok(Peer {
            pc,
            socket,
            rx: Some(rx),
            local,
            tcp,
            connected: false,
            video,
            audio,
            keyframe_wanted: true,
            frames: Vec::new(),
            simulcast_ext: None,
            downlink,
            loss: HashMap::new(),
            first_media_at: None,
            shared,
            opener: None,
            light,
            scratch: Vec::with_capacity(2048),
        })
    }

    /// Something to offer when there is no media to publish.
    pub fn add_data_channel(&mut self) -> Result<(), String> {
        self.pc
            .create_data_channel("ferry", None)
            .map(|_| ())
            .map_err(err)
    }

    /// Create the offer, set it as the local description; its SDP.
    pub fn offer(&mut self) -> Result<String, String> {
        let offer = self.pc.create_offer(None).map_err(err)?;
        self.pc
            .set_local_description(Instant::now(), offer)
            .map_err(err)?;
        Ok(self.local_sdp())
    }

    pub fn accept_answer(&mut self, sdp: String) -> Result<(), String> {
        RTCSessionDescription::answer(sdp)
            .and_then(|d| self.pc.set_remote_description(Instant::now(), d))
            .map_err(err)
    }

    /// Take the server's offer and answer it; the answer's SDP.
    pub fn answer(&mut self, offer: String) -> Result<String, String> {
        let now = Instant::now();
        RTCSessionDescription::offer(offer)
            .and_then(|d| self.pc.set_remote_description(now, d))
            .and_then(|_| self.pc.create_answer(None))
            .and_then(|a| self.pc.set_local_description(now, a))
            .map_err(err)?;
        Ok(self.local_sdp())
    }

    fn local_sdp(&self) -> String {
        self.pc
            .local_description()
            .map(|d| d.sdp)
            .unwrap_or_default()
    }

    /// This peer's only ICE candidate (also in its SDP), for servers that want it trickled.
    pub fn candidate(&self) -> Result<RTCIceCandidateInit, String> {
        match &self.tcp {
            Some(t) => crate::net::tcp_active_candidate(t.ip).map_err(err),
            None => crate::net::host_candidate(self.local).map_err(err),
        }
    }

    /// Simulcast layers `rids` are paused (the relay's `layers` message), the others sent.
    pub fn pause_layers(&mut self, rids: &[&str]) {
        for o in self.video.iter_mut() {
            let paused = rids.contains(&o.rid);
            match (o.paused, paused) {
                (false, true) => self.shared.layers_paused.fetch_add(1, Ordering::Relaxed),
                (true, false) => self.shared.layers_paused.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            o.paused = paused;
        }
    }

    /// Send one video frame (`bytes` split into packets; each simulcast layer its share), or an
    /// audio packet. With `gap`, a video frame's packets go out paced (see [`Peer::send_due`]).
    pub fn send_frame(
        &mut self,
        video: bool,
        bytes: usize,
        packet_bytes: usize,
        gap: Option<std::time::Duration>,
        now: Instant,
    ) {
        let keyframe = video && std::mem::take(&mut self.keyframe_wanted);
        let bytes = if keyframe { bytes * 3 } else { bytes };
        let layers: Vec<(f64, u32, bool)> = if video {
            self.video
                .iter()
                .map(|o| (o.share, o.clock_rate, o.paused))
                .collect()
        } else {
            self.audio
                .iter()
                .map(|o| (1.0, o.clock_rate, false))
                .collect()
        };
        if video {
            for f in std::mem::take(&mut self.frames) {
                for i in f.next..f.packets {
                    self.send_packet(true, &f, i, now);
                }
            }
        }
        for (layer, (share, clock_rate, paused)) in layers.into_iter().enumerate() {
            if paused {
                continue;
            }
            let bytes = ((bytes as f64 * share) as usize).max(STAMP);
            let frame = Frame {
                layer,
                keyframe,
                bytes,
                packet_bytes,
                packets: bytes.div_ceil(packet_bytes).max(1),
                next: 0,
                ts: (self.shared.since_epoch(now).as_micros() as u64 * u64::from(clock_rate)
                    / 1_000_000) as u32,
                next_at: now,
                // A layer's packets at its share of the paced rate.
                gap: gap
                    .filter(|_| video)
                    .map_or(Default::default(), |g| g.div_f64(share)),
            };
            if frame.gap.is_zero() {
                for i in 0..frame.packets {
                    self.send_packet(video, &frame, i, now);
                }
            } else {
                self.frames.push(frame);
            }
        }
        self.send_due(now);
    }

    /// Sends the paced frames' packets that are due; when the next one is.
    pub fn send_due(&mut self, now: Instant) -> Option<Instant> {
        let mut frames = std::mem::take(&mut self.frames);
        for f in frames.iter_mut() {
            while f.next < f.packets && f.next_at <= now {
                self.send_packet(true, f, f.next, now);
                f.next += 1;
                f.next_at += f.gap;
            }
        }
        frames.retain(|f| f.next < f.packets);
        let next = frames.iter().map(|f| f.next_at).min();
        self.frames = frames;
        next
    }

    /// Packet `i` of `f`, stamped with its send time. A simulcast layer's packets carry the mid
    /// and rid extensions and a VP8 payload descriptor (the relay switches layers at keyframes).
    fn send_packet(&mut self, video: bool, f: &Frame, i: usize, now: Instant) {
        let simulcast = video && self.video.len() > 1;
        if simulcast && self.simulcast_ext.is_none() {
            self.simulcast_ext = self.simulcast_ids();
        }
        let out = if video {
            self.video.get_mut(f.layer)
        } else {
            self.audio.as_mut()
        };
        let Some(o) = out else { return };
        let sent_us = self.shared.since_epoch(now).as_micros() as u64;
        let len = if i + 1 == f.packets {
            (f.bytes - f.packet_bytes * (f.packets - 1)).max(STAMP)
        } else {
            f.packet_bytes
        };
        let mut b = BytesMut::with_capacity(len + 2);
        let mut extensions = Vec::new();
        if simulcast && let Some((mid_id, rid_id, mid)) = &self.simulcast_ext {
            // S (start of a frame) on its first packet, then the key/delta bit of the VP8
            // frame header; never a stamp's first byte (0: send times are far below 2^56 µs).
            b.put_u8(if i == 0 { 0x10 } else { 0x01 });
            b.put_u8(if f.keyframe { 0x00 } else { 0x01 });
            extensions.push(rtc::rtp::header::Extension {
                id: *mid_id,
                payload: mid.clone(),
            });
            extensions.push(rtc::rtp::header::Extension {
                id: *rid_id,
                payload: bytes::Bytes::from_static(o.rid.as_bytes()),
            });
        }
        b.put_u64(sent_us);
        b.put_u32(o.counter);
        b.put_u32(o.stream);
        b.resize(b.len() + len.max(STAMP) - STAMP, o.counter as u8);
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker: i + 1 == f.packets,
                payload_type: if video { 96 } else { 111 },
                sequence_number: o.seq,
                timestamp: f.ts,
                ssrc: o.ssrc,
                extension: !extensions.is_empty(),
                extension_profile: if extensions.is_empty() { 0 } else { 0xBEDE },
                extensions,
                ..Default::default()
            },
            payload: b.freeze(),
        };
        o.seq = o.seq.wrapping_add(1);
        o.counter = o.counter.wrapping_add(1);
        if let Some(mut s) = self.pc.rtp_sender(o.sender)
            && s.write_rtp(now, packet).is_ok()
        {
            self.shared.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The negotiated mid and rid extension ids of the simulcast sender, and its mid.
    fn simulcast_ids(&mut self) -> Option<(u8, u8, bytes::Bytes)> {
        let sender = self.video.first()?.sender;
        let params = self
            .pc
            .rtp_sender(sender)?
            .get_parameters()
            .rtp_parameters
            .header_extensions
            .clone();
        let id = |uri: &str| {
            params
                .iter()
                .find(|h| h.uri == uri)
                .and_then(|h| u8::try_from(h.id).ok())
        };
        let mid = self.pc.rtp_transceiver(sender.into())?.mid().clone()?;
        Some((
            id("urn:ietf:params:rtp-hdrext:sdes:mid")?,
            id("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id")?,
            bytes::Bytes::from(mid),
        ))
    }

    /// Run the connection until `until`: socket, signaling, timers.
    pub async fn pump<S: Signal>(&mut self, sig: &mut S, until: tokio::time::Instant) {
        // The connection's next timer, re-read only after something went into the connection: a
        // light subscriber's media does not, and rtc's `poll_timeout` walks every protocol layer.
        let mut touched = true;
        let mut deadline = None;
        loop {
            if touched {
                self.drain(sig).await;
                deadline = self.pc.poll_timeout();
                touched = false;
            }
            let next = deadline
                .map(tokio::time::Instant::from_std)
                .unwrap_or(until)
                .min(until);
            let frames = self.tcp.as_mut().map(|t| &mut t.frames);
            tokio::select! {
                r = self.socket.readable() => {
                    if r.is_ok() {
                        touched = self.receive();
                    }
                }
                Some((from, local, frame)) = async {
                    match frames {
                        Some(f) => f.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let transport = (local, TransportProtocol::TCP);
                    touched = self.take_datagram(&frame, from, transport, Instant::now());
                }
                m = tokio::time::timeout_at(next, sig.ws().recv()) => {
                    if let Ok(Some(m)) = m {
                        sig.on_message(m, self);
                        touched = true;
                    }
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|t| t <= now) {
                let _ = self.pc.handle_timeout(now);
                take_keys(self.light, &mut self.opener);
                touched = true;
            }
            if tokio::time::Instant::now() >= until {
                self.drain(sig).await;
                return;
            }
        }
    }

    /// What the socket holds now (up to 16 receives), into the connection. Whether anything
    /// went into the connection.
    fn receive(&mut self) -> bool {
        let mut touched = false;
        let mut rx = self.rx.take().expect("the receive batch");
        for _ in 0..16 {
            match self.socket.try_recv(&mut rx) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
            let now = Instant::now();
            for (datagram, from) in rx.datagrams() {
                let transport = (self.local, TransportProtocol::UDP);
                touched |= self.take_datagram(datagram, from, transport, now);
            }
        }
        self.rx = Some(rx);
        touched
    }

    /// One datagram from the server (over UDP, or a TCP frame): a light subscriber's SRTP packets
    /// are opened and counted here, the rest goes into the connection (true then).
    fn take_datagram(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        (local_addr, transport_protocol): (SocketAddr, TransportProtocol),
        now: Instant,
    ) -> bool {
        if let Some(opener) = self.opener.as_mut()
            && let Some((header_len, ssrc, seq)) = srtp::rtp_header(datagram)
        {
            self.scratch.clear();
            self.scratch.extend_from_slice(datagram);
            match opener.open(&mut self.scratch, header_len, ssrc, seq) {
                Ok(range) => {
                    self.shared.opened_light.fetch_add(1, Ordering::Relaxed);
                    let mut payload = &self.scratch[range];
                    // Padding (RFC 3550 5.1): its last byte says how many to drop.
                    if datagram[0] & 0x20 != 0 {
                        let pad = payload.last().map_or(0, |p| usize::from(*p));
                        payload = &payload[..payload.len().saturating_sub(pad)];
                    }
                    count_media(
                        &self.shared,
                        &mut self.loss,
                        &mut self.first_media_at,
                        payload,
                        now,
                    );
                }
                Err(_) => {
                    self.shared.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            return false;
        }
        if let Some(b) = self.downlink.as_mut()
            && datagram.first().is_some_and(|x| (128..192).contains(x))
            && !b.take(datagram.len(), now)
        {
            self.shared.shaped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let _ = self.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr: from,
                ecn: None,
                transport_protocol,
            },
            message: BytesMut::from(datagram),
        });
        take_keys(self.light, &mut self.opener);
        true
    }

    async fn drain<S: Signal>(&mut self, sig: &mut S) {
        sig.ws().flush().await;
        while let Some(ev) = self.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => {
                    self.connected = s == RTCPeerConnectionState::Connected;
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(_)) => {}
                _ => {}
            }
        }
        let now = Instant::now();
        while let Some(TaggedRTCMessage { message, .. }) = self.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(_, p) => count_media(
                    &self.shared,
                    &mut self.loss,
                    &mut self.first_media_at,
                    &p.payload,
                    now,
                ),
                RTCMessage::RtcpPacket(_, _) => {
                    // A keyframe request (the only RTCP delivered to us).
                    self.keyframe_wanted = true;
                    self.shared
                        .keyframe_requests
                        .fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        while let Some(t) = self.pc.poll_write() {
            match self.tcp.as_mut() {
                Some(tcp) if t.transport.transport_protocol == TransportProtocol::TCP => {
                    tcp.send(t.transport.peer_addr, &t.message).await;
                }
                _ => {
                    let _ = self.socket.try_send_one(t.transport.peer_addr, &t.message);
                }
            }
        }
    }
}

/// A client's ICE-TCP side: a TCP connection per passive candidate its agent checks (opened at the
/// first datagram for it), datagrams framed as RFC 4571 says; what the server sends comes back
/// through `frames` (its address, our end's address, the datagram).
struct TcpSide {
    ip: IpAddr,
    writers: HashMap<SocketAddr, tokio::net::tcp::OwnedWriteHalf>,
    frames_tx: tokio::sync::mpsc::Sender<(SocketAddr, SocketAddr, bytes::Bytes)>,
    frames: tokio::sync::mpsc::Receiver<(SocketAddr, SocketAddr, bytes::Bytes)>,
}

impl TcpSide {
    fn new(ip: IpAddr) -> TcpSide {
        let (frames_tx, frames) = tokio::sync::mpsc::channel(1024);
        TcpSide {
            ip,
            writers: HashMap::new(),
            frames_tx,
            frames,
        }
    }

    /// Send `datagram` to `to` over TCP, connecting first if needed; what fails is dropped (as
    /// a datagram would be), and the connection with it.
    async fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        use tokio::io::AsyncWriteExt;
        if !self.writers.contains_key(&to) {
            match self.connect(to).await {
                Ok(w) => {
                    self.writers.insert(to, w);
                }
                Err(e) => {
                    tracing::debug!(%to, error = %e, "ICE-TCP connection failed");
                    return;
                }
            }
        }
        let Some(frame) = crate::net::tcp::frame(datagram) else {
            return;
        };
        let w = self.writers.get_mut(&to).expect("connected above");
        if w.write_all(&frame).await.is_err() {
            self.writers.remove(&to);
        }
    }

    /// A connection to `to` whose frames its reader task passes on; its write half.
    async fn connect(&self, to: SocketAddr) -> std::io::Result<tokio::net::tcp::OwnedWriteHalf> {
        use tokio::io::AsyncReadExt;
        let socket = match to {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(self.ip, 0))?;
        let stream =
            tokio::time::timeout(std::time::Duration::from_secs(5), socket.connect(to)).await??;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let (mut r, w) = stream.into_split();
        let frames = self.frames_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok(len) = r.read_u16().await {
                let len = usize::from(len);
                if r.read_exact(&mut buf[..len]).await.is_err() {
                    break;
                }
                let frame = bytes::Bytes::copy_from_slice(&buf[..len]);
                if frames.send((to, local, frame)).await.is_err() {
                    break;
                }
            }
        });
        Ok(w)
    }
}

/// After a call into a light subscriber's connection: if its DTLS handshake just completed, rtc
/// derived the local then the remote SRTP keys; the remote ones open what the server sends.
fn take_keys(light: bool, opener: &mut Option<srtp::Opener>) {
    if !light || opener.is_some() {
        return;
    }
    let keys = srtp::take_captured();
    if keys.len() == 2 {
        *opener = srtp::Opener::new(&keys[1]).ok();
    }
}

/// One received media payload: its stamp read, loss and latency counted, the whole payload
/// checked on a sample.
fn count_media(
    shared: &Shared,
    loss: &mut HashMap<u32, StreamLoss>,
    first_media_at: &mut Option<Instant>,
    payload: &[u8],
    now: Instant,
) {
    // A simulcast layer's VP8 payload descriptor (2 bytes) comes before the stamp, whose first
    // byte is 0.
    let payload = match payload.first() {
        Some(0) | None => payload,
        Some(_) => &payload[payload.len().min(2)..],
    };
    // Padding-only packets (the relay's probes of a downlink) carry no payload.
    if payload.is_empty() {
        return;
    }
    if payload.len() < STAMP {
        shared.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if first_media_at.is_none() {
        *first_media_at = Some(now);
        shared.receiving.fetch_add(1, Ordering::Relaxed);
    }
    let sent_us = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
    let counter = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
    let stream = u32::from_be_bytes(payload[12..16].try_into().expect("4 bytes"));
    let n = shared.received.fetch_add(1, Ordering::Relaxed);
    if n.is_multiple_of(shared.verify_every)
        && !payload[STAMP..].iter().all(|b| *b == counter as u8)
    {
        shared.corrupt.fetch_add(1, Ordering::Relaxed);
    }
    if !shared.measuring.load(Ordering::Relaxed) {
        return;
    }
    let now_us = shared.since_epoch(now).as_micros() as u64;
    shared.record_latency(now_us.saturating_sub(sent_us));
    loss.entry(stream).or_default().saw(counter);
}

/// A server's signaling protocol, as one load-generator client speaks it.
pub trait Signal: Send + 'static {
    /// Who this client is, for error messages.
    fn who(&self) -> String;
    /// Negotiate `peer`'s connection with the server: publish, or subscribe to what was planned.
    fn open(&mut self, peer: &mut Peer) -> impl Future<Output = Result<(), String>> + Send;
    /// Act on a message from the server that arrives while media flows (a renegotiation);
    /// replies go through [`JsonWs::queue`].
    fn on_message(&mut self, m: Value, peer: &mut Peer);
    fn ws(&mut self) -> &mut JsonWs;
}

/// An emulated downlink: a token bucket of `bps`, holding 50 ms of it (at least 3 kB); what
/// does not fit is dropped, as a thin link's full queue drops it.
struct Bucket {
    bps: f64,
    depth: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new(bps: u64) -> Bucket {
        let depth = (bps as f64 / 8.0 * 0.05).max(3000.0);
        Bucket {
            bps: bps as f64,
            depth,
            tokens: depth,
            last: None,
        }
    }

    /// Whether `bytes` pass now.
    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.last = Some(now);
        self.tokens = (self.tokens + elapsed * self.bps / 8.0).min(self.depth);
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}
