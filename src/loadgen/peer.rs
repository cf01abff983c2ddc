//! One load-generator client's media side: a webrtc-rs (`rtc`, sans-I/O) peer connection to the
//! server with its own UDP socket on a local address, driven here, whatever the server (the
//! signaling is a [`Signal`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
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
use tokio::net::UdpSocket;

use super::ws::Signal;
use super::{Shared, StreamLoss};
use crate::media::{DeliverRtcp, single_ssrc_track};

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
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    pub connected: bool,
    video: Option<Outgoing>,
    audio: Option<Outgoing>,
    /// A keyframe was asked for: the next video frame is a large one.
    keyframe_wanted: bool,
    /// Per received stream (publisher's stream index): counters for loss.
    pub loss: HashMap<u32, StreamLoss>,
    pub first_media_at: Option<Instant>,
    shared: Arc<Shared>,
    buf: Vec<u8>,
}

impl Peer {
    /// A peer connection with a UDP socket on `local_ip`, publishing (video, and audio when asked)
    /// as stream `publish.1`, or with no media of its own; not negotiated yet.
    pub async fn new(
        local_ip: IpAddr,
        publish: Option<(Source, u32)>,
        shared: Arc<Shared>,
    ) -> Result<Peer, String> {
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
            .await
            .map_err(|e| format!("UDP socket on {local_ip}: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
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
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .map_err(err)?;
        let (mut video, mut audio) = (None, None);
        if let Some((src, stream)) = publish {
            let mut track = |kind: RtpCodecKind, codec: RTCRtpCodec, id: &str| {
                let ssrc: u32 = rand::random();
                let t = single_ssrc_track(
                    format!("lg-{stream}"),
                    format!("{id}-{stream}"),
                    "loadgen".into(),
                    kind,
                    codec.clone(),
                    ssrc,
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
            video = Some(track(RtpCodecKind::Video, vp8(), "video").map_err(err)?);
            if src.audio {
                audio = Some(track(RtpCodecKind::Audio, opus(), "audio").map_err(err)?);
            }
        }
        pc.add_local_candidate(crate::net::host_candidate(local).map_err(err)?)
            .map_err(err)?;
        Ok(Peer {
            pc,
            socket,
            local,
            connected: false,
            video,
            audio,
            keyframe_wanted: true,
            loss: HashMap::new(),
            first_media_at: None,
            shared,
            buf: vec![0u8; 2048],
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
        crate::net::host_candidate(self.local).map_err(err)
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
    pub async fn pump<S: Signal>(&mut self, sig: &mut S, until: tokio::time::Instant) {
        loop {
            self.drain(sig).await;
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
                m = tokio::time::timeout_at(next, sig.ws().recv()) => {
                    if let Ok(Some(m)) = m {
                        sig.on_message(m, self);
                    }
                }
            }
            let now = Instant::now();
            if self.pc.poll_timeout().is_some_and(|t| t <= now) {
                let _ = self.pc.handle_timeout(now);
            }
            if tokio::time::Instant::now() >= until {
                self.drain(sig).await;
                return;
            }
        }
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
        if self.first_media_at.is_none() {
            self.first_media_at = Some(now);
            self.shared.receiving.fetch_add(1, Ordering::Relaxed);
        }
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
