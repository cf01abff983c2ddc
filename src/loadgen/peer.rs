//! One load-generator client: a WebSocket to Ferry's signaling and a webrtc-rs (`rtc`, sans-I/O)
//! peer connection to the relay with its own UDP socket on the loopback address, driven here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message;

use super::{Shared, StreamLoss};
use crate::media::DeliverRtcp;

/// Bytes at the start of every synthetic payload: send time (µs since the run's epoch, u64),
/// the stream's own packet counter (u32), the stream index (u32).
pub const STAMP: usize = 16;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Signaling {
    ws: Ws,
    next_id: u64,
    pub user_id: String,
    /// Events that arrived while waiting for a response.
    queued: Vec<Value>,
}

impl Signaling {
    pub async fn connect(url: &str) -> Result<Signaling, String> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let mut s = Signaling {
            ws,
            next_id: 1,
            user_id: String::new(),
            queued: Vec::new(),
        };
        let w = s.request("hello", json!({"protocol": 1})).await?;
        s.user_id = w["userId"].as_str().unwrap_or_default().to_string();
        Ok(s)
    }

    pub async fn request(&mut self, ty: &str, fields: Value) -> Result<Value, String> {
        let id = self.send(ty, fields).await?;
        loop {
            let v = tokio::time::timeout(Duration::from_secs(20), self.recv())
                .await
                .map_err(|_| format!("{ty}: no answer within 20 s"))?
                .ok_or_else(|| format!("{ty}: connection closed"))?;
            if v["type"] == "response" && v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    return Err(format!("{ty}: {} ({})", e["message"], e["code"]));
                }
                return Ok(v["result"].clone());
            }
            self.queued.push(v);
        }
    }

    async fn recv(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Send a request without waiting for its response (read and dropped later); its id.
    async fn send(&mut self, ty: &str, fields: Value) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut m = fields.as_object().cloned().unwrap_or_default();
        m.insert("id".into(), json!(id));
        m.insert("type".into(), json!(ty));
        self.ws
            .send(Message::text(Value::Object(m).to_string()))
            .await
            .map_err(|e| format!("{ty}: {e}"))?;
        Ok(id)
    }
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
}

struct Outgoing {
    sender: RTCRtpSenderId,
    ssrc: u32,
    seq: u16,
    counter: u32,
    stream: u32,
    clock_rate: u32,
}

pub struct Peer {
    pub sig: Signaling,
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    pub connected: bool,
    video: Option<Outgoing>,
    audio: Option<Outgoing>,
    /// A keyframe was asked for: the next video frame is a large one.
    keyframe_wanted: bool,
    pending: Vec<(String, Value)>,
    /// Per received stream (publisher's stream index): counters for loss.
    pub loss: HashMap<u32, StreamLoss>,
    pub first_media_at: Option<Instant>,
    shared: Arc<Shared>,
    buf: Vec<u8>,
}

impl Peer {
    /// Join the relay: publish (video, and audio when asked) under stream indices `streams`, or
    /// open with a data channel only.
    pub async fn connect(
        mut sig: Signaling,
        publish: Option<(Source, u32)>,
        shared: Arc<Shared>,
    ) -> Result<Peer, String> {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("UDP socket: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        let e = |e: rtc::shared::error::Error| e.to_string();
        let mut media_engine = MediaEngine::default();
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8(),
                    payload_type: 96,
                },
                RtpCodecKind::Video,
            )
            .map_err(e)?;
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus(),
                    payload_type: 111,
                },
                RtpCodecKind::Audio,
            )
            .map_err(e)?;
        let registry = Registry::new().with(Slot::from(14_000), DeliverRtcp::keyframe_requests());
        let registry = register_default_interceptors(registry, &mut media_engine).map_err(e)?;
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .map_err(e)?;
        let (mut video, mut audio) = (None, None);
        if let Some((src, stream)) = publish {
            let mut track = |kind: RtpCodecKind, codec: RTCRtpCodec, id: &str| {
                let ssrc: u32 = rand::random();
                let t = MediaStreamTrack::new(
                    format!("lg-{stream}"),
                    format!("{id}-{stream}"),
                    "loadgen".into(),
                    kind,
                    vec![RTCRtpEncodingParameters {
                        rtp_coding_parameters: RTCRtpCodingParameters {
                            ssrc: Some(ssrc),
                            ..Default::default()
                        },
                        codec: codec.clone(),
                        ..Default::default()
                    }],
                );
                pc.add_track(t).map(|sender| Outgoing {
                    sender,
                    ssrc,
                    seq: rand::random(),
                    counter: 0,
                    stream: stream * 2 + u32::from(kind == RtpCodecKind::Audio),
                    clock_rate: codec.clock_rate,
                })
            };
            video = Some(track(RtpCodecKind::Video, vp8(), "video").map_err(e)?);
            if src.audio {
                audio = Some(track(RtpCodecKind::Audio, opus(), "audio").map_err(e)?);
            }
        } else {
            pc.create_data_channel("ferry", None).map_err(e)?;
        }
        pc.add_local_candidate(crate::net::host_candidate(local).map_err(e)?)
            .map_err(e)?;
        let offer = pc.create_offer(None).map_err(e)?;
        pc.set_local_description(Instant::now(), offer).map_err(e)?;
        let sdp = pc.local_description().map(|d| d.sdp).unwrap_or_default();
        let streams = publish.map_or(json!({}), |(_, s)| json!({ format!("lg-{s}"): "cam" }));
        sig.request(
            "offer",
            json!({"to": "server", "sdp": sdp, "meta": {"streams": streams}}),
        )
        .await?;
        let queued = std::mem::take(&mut sig.queued);
        let mut p = Peer {
            sig,
            pc,
            socket,
            local,
            connected: false,
            video,
            audio,
            keyframe_wanted: true,
            pending: Vec::new(),
            loss: HashMap::new(),
            first_media_at: None,
            shared,
            buf: vec![0u8; 2048],
        };
        for m in queued {
            p.on_signal(m);
        }
        Ok(p)
    }

    /// Send one video frame (`bytes` split into packets), or an audio packet.
    pub fn send_frame(&mut self, video: bool, bytes: usize, packet_bytes: usize, now: Instant) {
        let keyframe = video && std::mem::take(&mut self.keyframe_wanted);
        let bytes = if keyframe { bytes * 3 } else { bytes };
        let out = if video {
            self.video.as_mut()
        } else {
            self.audio.as_mut()
        };
        let Some(o) = out else { return };
        let packets = bytes.div_ceil(packet_bytes).max(1);
        let ts = (self.shared.since_epoch(now).as_micros() as u64 * u64::from(o.clock_rate)
            / 1_000_000) as u32;
        let sent_us = self.shared.since_epoch(now).as_micros() as u64;
        for i in 0..packets {
            let len = if i + 1 == packets {
                (bytes - packet_bytes * (packets - 1)).max(STAMP)
            } else {
                packet_bytes
            };
            let mut b = BytesMut::with_capacity(len);
            b.put_u64(sent_us);
            b.put_u32(o.counter);
            b.put_u32(o.stream);
            b.resize(len.max(STAMP), o.counter as u8);
            let packet = rtc::rtp::Packet {
                header: rtc::rtp::header::Header {
                    version: 2,
                    marker: i + 1 == packets,
                    payload_type: if video { 96 } else { 111 },
                    sequence_number: o.seq,
                    timestamp: ts,
                    ssrc: o.ssrc,
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
    }

    /// Run the connection until `until`: socket, signaling, timers.
    pub async fn pump(&mut self, until: tokio::time::Instant) {
        loop {
            self.drain().await;
            let next = self
                .pc
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or(until)
                .min(until);
            tokio::select! {
                r = self.socket.recv_from(&mut self.buf) => {
                    if let Ok((n, from)) = r {
                        let _ = self.pc.handle_read(TaggedBytesMut {
                            now: Instant::now(),
                            transport: TransportContext {
                                local_addr: self.local,
                                peer_addr: from,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(&self.buf[..n]),
                        });
                    }
                }
                m = tokio::time::timeout_at(next, self.sig.recv()) => {
                    if let Ok(Some(m)) = m {
                        self.on_signal(m);
                    }
                }
            }
            let now = Instant::now();
            if self.pc.poll_timeout().is_some_and(|t| t <= now) {
                let _ = self.pc.handle_timeout(now);
            }
            if tokio::time::Instant::now() >= until {
                self.drain().await;
                return;
            }
        }
    }

    fn on_signal(&mut self, m: Value) {
        if m["from"] != "server" {
            return;
        }
        let sdp = m["sdp"].as_str().unwrap_or_default().to_string();
        let now = Instant::now();
        match m["type"].as_str() {
            Some("answer") => {
                if let Ok(d) = RTCSessionDescription::answer(sdp) {
                    let _ = self.pc.set_remote_description(now, d);
                }
            }
            Some("offer") => {
                let ok = RTCSessionDescription::offer(sdp)
                    .and_then(|d| self.pc.set_remote_description(now, d))
                    .and_then(|_| self.pc.create_answer(None))
                    .and_then(|a| self.pc.set_local_description(now, a));
                if ok.is_ok() {
                    let sdp = self.pc.local_description().map(|d| d.sdp);
                    self.pending
                        .push(("answer".into(), json!({"to": "server", "sdp": sdp})));
                }
            }
            _ => {}
        }
    }

    async fn drain(&mut self) {
        for (ty, fields) in std::mem::take(&mut self.pending) {
            let _ = self.sig.send(&ty, fields).await;
        }
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
                RTCMessage::RtpPacket(_, p) => self.on_media(&p.payload, now),
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
            let _ = self.socket.try_send_to(&t.message, t.transport.peer_addr);
        }
    }

    fn on_media(&mut self, payload: &Bytes, now: Instant) {
        if payload.len() < STAMP {
            self.shared.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.first_media_at.get_or_insert(now);
        let sent_us = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
        let counter = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
        let stream = u32::from_be_bytes(payload[12..16].try_into().expect("4 bytes"));
        let shared = &self.shared;
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
        self.loss.entry(stream).or_default().saw(counter);
    }
}
