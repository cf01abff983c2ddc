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
        for (n, c) in opened.into_iter().chain(per_kind) {
            if n > 0 {
                c.inc_by(n);
            }
        }
        *self = PacketCounts::default();
    }
}
