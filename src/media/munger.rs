//! Per-subscriber rewrite of sequence numbers and timestamps, so that what one subscriber receives
//! on one of its tracks is a single contiguous stream:
//! - a packet the relay itself drops leaves no hole (the next one takes its number);
//! - when the publisher's stream restarts with a new SSRC, numbering continues where it left off.
//!
//! Losses upstream (the publisher's packets that never arrived) stay holes: the subscriber NACKs
//! them and the relay answers from its buffer.

fn newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

/// Packets after a change (a drop or an insert) past which no late packet from before it is
/// expected (far beyond any reordering or retransmission buffer; under half the sequence space).
const FORGET_AFTER: u16 = 0x1000;

#[derive(Debug, Default, Clone)]
pub struct Munger {
    started: bool,
    in_ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    /// The offset before the last change, and the first input sequence number the new one
    /// applies to: a late (reordered) packet from before the change keeps its old number.
    previous: Option<(u16, u16)>,
    highest_in: u16,
    last_out_seq: u16,
    last_out_ts: u32,
    /// The next packet starts a new input stream (a republished track), whatever its SSRC; the
    /// timestamp advances by this many ticks.
    restart: Option<u32>,
}

impl Munger {
    /// The (sequence number, timestamp) to send for an incoming packet.
    pub fn map(&mut self, ssrc: u32, seq: u16, ts: u32) -> (u16, u32) {
        if !self.started {
            self.started = true;
            self.in_ssrc = ssrc;
            self.highest_in = seq;
            self.last_out_seq = seq;
            self.last_out_ts = ts;
            return (seq, ts);
        }
        if ssrc != self.in_ssrc || self.restart.is_some() {
            // The publisher restarted: continue right after the last number we sent.
            let gap = self.restart.take().unwrap_or(0).max(1);
            self.in_ssrc = ssrc;
            self.previous = None;
            self.seq_offset = seq.wrapping_sub(self.last_out_seq.wrapping_add(1));
            self.ts_offset = ts.wrapping_sub(self.last_out_ts.wrapping_add(gap));
            self.highest_in = seq.wrapping_sub(1);
        }
        // A packet newer than any before comes after the last change; only a late one can be
        // from before it.
        let newest = newer(seq, self.highest_in);
        let offset = match self.previous {
            Some((old, from)) if !newest && newer(from, seq) => old,
            _ => self.seq_offset,
        };
        let out_seq = seq.wrapping_sub(offset);
        let out_ts = ts.wrapping_sub(self.ts_offset);
        if newest {
            // A change long past is forgotten: no packet from before it is still to come, and
            // half the sequence space after it `newer` would take the stream's own packets for
            // ones from before it.
            if self
                .previous
                .is_some_and(|(_, from)| seq.wrapping_sub(from) >= FORGET_AFTER)
            {
                self.previous = None;
            }
            self.highest_in = seq;
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
        }
        (out_seq, out_ts)
    }

    /// The next packet comes from a new input stream (the publisher republished this source):
    /// numbering continues right after the last packet sent, and timestamps `gap_ticks` later.
    pub fn restart(&mut self, gap_ticks: u32) {
        if self.started {
            self.restart = Some(gap_ticks);
        }
    }

    /// Whether a packet was mapped yet.
    pub fn started(&self) -> bool {
        self.started
    }

    /// A packet of the relay's own (padding) goes out between the publisher's: its sequence
    /// number (the next one; the publisher's packets after it move up by one) and the last
    /// timestamp sent. `None` before the first packet.
    pub fn insert(&mut self) -> Option<(u16, u32)> {
        if !self.started {
            return None;
        }
        // Several inserts at one point: late packets from before them keep the first offset.
        let from = self.highest_in.wrapping_add(1);
        if self.previous.is_none_or(|(_, f)| f != from) {
            self.previous = Some((self.seq_offset, from));
        }
        self.seq_offset = self.seq_offset.wrapping_sub(1);
        self.last_out_seq = self.last_out_seq.wrapping_add(1);
        Some((self.last_out_seq, self.last_out_ts))
    }

    /// The packet that came in with `seq` was not sent after all: if it was the newest, the next
    /// packet takes its number.
    pub fn dropped(&mut self, seq: u16) {
        if !self.started || seq != self.highest_in {
            return;
        }
        self.previous = Some((self.seq_offset, seq.wrapping_add(1)));
        self.seq_offset = self.seq_offset.wrapping_add(1);
        self.last_out_seq = self.last_out_seq.wrapping_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Step {
        /// (ssrc, seq in, expected seq out)
        Send(u32, u16, u16),
        /// the relay drops the packet with this input seq after mapping it
        Drop(u16),
    }
    use Step::*;

    fn run(steps: &[Step]) {
        let mut m = Munger::default();
        for (i, s) in steps.iter().enumerate() {
            match *s {
                Send(ssrc, seq, want) => {
                    let (got, _) = m.map(ssrc, seq, u32::from(seq) * 3000);
                    assert_eq!(got, want, "step {i}: seq in {seq}");
                }
                Drop(seq) => m.dropped(seq),
            }
        }
    }

    #[test]
    fn passes_through_in_order_and_upstream_losses() {
        run(&[
            Send(1, 100, 100),
            Send(1, 101, 101),
            Send(1, 103, 103),
            Send(1, 102, 102),
        ]);
    }

    #[test]
    fn a_relay_side_drop_leaves_no_hole() {
        run(&[
            Send(1, 10, 10),
            Send(1, 11, 11),
            Drop(11),
            Send(1, 12, 11),
            Send(1, 13, 12),
        ]);
    }

    #[test]
    fn late_packets_from_before_a_drop_keep_their_number() {
        run(&[
            Send(1, 10, 10),
            Send(1, 12, 12), // 11 late
            Drop(12),
            Send(1, 11, 11), // late, from before the change
            Send(1, 13, 12),
        ]);
    }

    #[test]
    fn inserted_packets_take_the_next_numbers_and_the_stream_goes_on_after_them() {
        let mut m = Munger::default();
        assert_eq!(m.insert(), None, "nothing before the first packet");
        assert_eq!(m.map(1, 100, 9_000), (100, 9_000));
        assert_eq!(m.insert(), Some((101, 9_000)));
        assert_eq!(m.insert(), Some((102, 9_000)));
        assert_eq!(m.map(1, 101, 12_000), (103, 12_000));
        // A late packet from before the insert keeps a number below it.
        assert_eq!(m.map(1, 99, 6_000).0, 99);
        m.dropped(101);
        assert_eq!(m.map(1, 102, 15_000), (103, 15_000));
    }

    /// Found writing the model of fuzz/fuzz_targets/munger.rs: the offset from before a drop
    /// was taken again for the stream's newest packets once they were half the sequence space
    /// past the drop (a hole, and a wrap later a duplicate), 32 768 packets after any single
    /// drop or padding insert.
    #[test]
    fn a_change_long_past_does_not_come_back_half_a_wrap_later() {
        let mut m = Munger::default();
        assert_eq!(m.map(1, 10, 0), (10, 0));
        m.insert();
        let mut seq = 10u16;
        let mut last: u16 = 11;
        for _ in 0..(3 * 65_536 / 100) {
            seq = seq.wrapping_add(100);
            let (out, _) = m.map(1, seq, 0);
            assert_eq!(out, last.wrapping_add(100), "in {seq}");
            last = out;
        }
    }

    #[test]
    fn a_drop_before_the_first_packet_changes_nothing() {
        let mut m = Munger::default();
        m.dropped(0);
        assert_eq!(m.map(1, 0, 5), (0, 5));
        assert_eq!(m.map(1, 1, 6), (1, 6));
        let mut m = Munger::default();
        m.dropped(0);
        assert_eq!(m.map(1, 100, 5), (100, 5));
        assert_eq!(m.map(1, 101, 6), (101, 6));
    }

    #[test]
    fn wraps_around() {
        run(&[
            Send(1, 65534, 65534),
            Send(1, 65535, 65535),
            Drop(65535),
            Send(1, 0, 65535),
            Send(1, 1, 0),
        ]);
    }

    #[test]
    fn a_republished_track_with_the_same_ssrc_continues_too() {
        let mut m = Munger::default();
        assert_eq!(m.map(7, 100, 1_000), (100, 1_000));
        assert_eq!(m.map(7, 101, 4_000), (101, 4_000));
        // Same SSRC, new sequence space (a new track): 0.5 s of silence at 90 kHz.
        m.restart(45_000);
        assert_eq!(m.map(7, 30_000, 777), (102, 4_000 + 45_000));
        assert_eq!(m.map(7, 30_001, 3_777), (103, 4_000 + 45_000 + 3_000));
    }

    #[test]
    fn a_publisher_restart_continues_the_numbering() {
        run(&[
            Send(1, 500, 500),
            Send(1, 501, 501),
            Send(2, 9000, 502),
            Send(2, 9001, 503),
            Send(2, 9003, 505),
        ]);
        let mut m = Munger::default();
        m.map(1, 500, 1000);
        let (_, ts) = m.map(2, 7, 77_000);
        assert_eq!(ts, 1001, "timestamps continue too");
    }
}
