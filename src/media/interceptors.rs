//! The rtc interceptors the relay adds or wraps: the receive side shared between rtc's chain and the
//! relay's own packet-in path, a pass-through tap, a NACK responder bound at its first write, the
//! RTCP the relay wants delivered, and the feedback counters.

use super::*;

/// rtc's default interceptors (NACK both ways, TWCC feedback to the publisher, sender and
/// receiver reports, simulcast header extensions), with the retransmission buffer sized for a
/// relay that keeps one per subscriber stream. The receiving ones (NACK generator, TWCC
/// receiver, receiver reports) are `receive_side`, in the NACK generator's slot.
pub(super) fn relay_interceptors(
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
pub(super) struct ReceiveSide(pub(super) Arc<std::sync::Mutex<Stages>>);

/// Interceptors walked as rtc's chain walks its own (read forwards, write backwards, each one's
/// output the next one's input), without the terminal stage rtc's `Registry::build` adds: inbound
/// RTCP goes on to the rest of the connection's chain.
pub(super) struct Stages {
    pub(super) stages: Vec<Box<dyn Interceptor>>,
    pub(super) read: std::collections::VecDeque<TaggedPacket>,
    pub(super) write: std::collections::VecDeque<TaggedPacket>,
    /// The walk's queue between two stages, kept (no allocation per packet).
    pub(super) belt: std::collections::VecDeque<TaggedPacket>,
}

impl Stages {
    pub(super) fn walk(
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
    pub(super) fn next(&mut self, read: bool) -> Option<TaggedPacket> {
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
    pub(super) fn new() -> ReceiveSide {
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Stages> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The own path's packet through the stages (which only record it) and back, in one lock.
    pub(super) fn pass_read(
        &self,
        msg: TaggedPacket,
    ) -> Result<rtc::rtp::Packet, rtc::shared::error::Error> {
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

    pub(super) fn each(&self, mut f: impl FnMut(&mut dyn Interceptor)) {
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
pub(super) fn count_nacks(packets: &[Box<dyn rtc::rtcp::Packet>]) -> u64 {
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
pub(super) fn count_feedback(metrics: &Metrics) -> impl Interceptor + use<> {
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
pub(super) fn is_keyframe_request(p: &dyn rtc::rtcp::Packet) -> bool {
    is_keyframe_request_any(p.as_any())
}

fn is_keyframe_request_any(p: &dyn std::any::Any) -> bool {
    p.is::<PictureLossIndication>() || p.is::<FullIntraRequest>()
}

/// The reception report blocks (SSRC, fraction lost of 256) in a compound RTCP packet.
pub(super) fn reception_reports(packets: &[Box<dyn rtc::rtcp::Packet>]) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    for p in packets {
        let p = p.as_any();
        let blocks =
            if let Some(rr) = p.downcast_ref::<rtc::rtcp::receiver_report::ReceiverReport>() {
                &rr.reports
            } else if let Some(sr) = p.downcast_ref::<rtc::rtcp::sender_report::SenderReport>() {
                &sr.reports
            } else {
                continue;
            };
        out.extend(blocks.iter().map(|b| (b.ssrc, b.fraction_lost)));
    }
    out
}

/// Marks inbound RTCP for delivery to the application (`RTCMessage::RtcpPacket`); everything passes
/// on to rtc's own interceptors either way. The relay uses it for subscribers' keyframe requests
/// and NACKs.
pub struct DeliverRtcp;

impl DeliverRtcp {
    /// PLI, FIR and NACK (the relay answers NACKs itself on its own sealing path), transport-cc
    /// feedback and REMB (a subscriber's bandwidth estimate) and reception reports (the loss on a
    /// subscriber's link, for its simulcast layers where it sends no transport-cc).
    pub fn relay_feedback() -> impl Interceptor {
        Self::when(|p| {
            let p = p.as_any();
            is_keyframe_request_any(p)
                || p.is::<TransportLayerNack>()
                || p.is::<rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc>()
                || p.is::<ReceiverEstimatedMaximumBitrate>()
                || p.is::<rtc::rtcp::receiver_report::ReceiverReport>()
                || p.is::<rtc::rtcp::sender_report::SenderReport>()
        })
    }

    /// PLI and FIR only.
    pub fn keyframe_requests() -> impl Interceptor {
        Self::when(is_keyframe_request)
    }

    /// Compound packets with at least one packet that `wanted` picks.
    pub(super) fn when(wanted: fn(&dyn rtc::rtcp::Packet) -> bool) -> impl Interceptor {
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
    use rtc::rtp::header::Header;

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
}
