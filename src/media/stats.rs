//! Counters kept by a shard during a drain and added to the shared metrics once at its end.

use super::*;

/// Per-kind (audio, video) packet and byte counts not yet added to the metrics.
#[derive(Default)]
pub(super) struct PacketCounts {
    pub(super) rtp_in: [u64; 2],
    pub(super) bytes_in: [u64; 2],
    pub(super) rtp_out: [u64; 2],
    pub(super) bytes_out: [u64; 2],
    /// Packets in opened by [relay, rtc].
    pub(super) opened: [u64; 2],
    /// Simulcast video payload bytes sent, by layer.
    pub(super) layer_bytes: [u64; 3],
}

impl PacketCounts {
    pub(super) fn publish(&mut self, m: &Metrics) {
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
        let layers = self.layer_bytes.iter().copied().zip(m.layer_bytes.iter());
        for (n, c) in opened.into_iter().chain(per_kind).chain(layers) {
            if n > 0 {
                c.inc_by(n);
            }
        }
        *self = PacketCounts::default();
    }
}

/// What the core produced since the loop last sent: the datagrams to send, the counters and
/// latency samples to publish, and the connections with output waiting in rtc (drained before
/// the send).
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) tx: TxBatch,
    pub(super) counts: PacketCounts,
    /// Receive times of the packets forwarded (latency is observed once they are handed to the
    /// kernel).
    pub(super) forwarded_rx: Vec<Instant>,
    /// Connections to drain: rtc may have transmits, events or received media for them.
    pub(super) needs_poll: FxHashSet<PeerKey>,
}
