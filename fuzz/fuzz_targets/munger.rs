//! A route's munger under any sequence of packets (any SSRC, sequence number and timestamp),
//! relay-side drops, inserted padding and restarts: no panic, and what it promises:
//! - nothing is inserted before the first packet; an insert takes the number after the last
//!   one sent and the last timestamp;
//! - a new input stream (another SSRC, or after `restart`) continues right after the last number
//!   sent, and its timestamp `max(gap, 1)` after the last one;
//! - in one stream, packets newer than any before move the output as much as the input moved;
//! - a drop of the newest packet gives its number to the next one.
#![no_main]

use ferry::fuzzing::Munger;
use libfuzzer_sys::fuzz_target;

fn newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

fuzz_target!(|data: &[u8]| {
    let mut m = Munger::default();
    // The model: the last (seq, ts) sent for the newest packet (or insert), the newest input
    // sequence number, the stream's SSRC, and a pending restart.
    let mut last: Option<(u16, u32)> = None;
    let mut highest_in = 0u16;
    let mut ssrc_in = 0u32;
    let mut pending: Option<u32> = None;
    let mut ops = data.chunks_exact(4);
    for op in &mut ops {
        let arg = u16::from_be_bytes([op[1], op[2]]);
        match op[0] % 8 {
            0..=3 => {
                // A packet: the SSRC mostly stays, the sequence number moves by a little.
                let ssrc = if op[0] % 8 == 3 {
                    u32::from(op[3] % 4)
                } else {
                    ssrc_in
                };
                let seq = if op[0] & 0x80 != 0 {
                    arg
                } else {
                    highest_in.wrapping_add(i16::from(op[3] as i8) as u16)
                };
                let ts = u32::from(seq).wrapping_mul(3000) ^ u32::from(op[1]);
                let (out_seq, out_ts) = m.map(ssrc, seq, ts);
                match last {
                    None => {
                        assert_eq!((out_seq, out_ts), (seq, ts), "the first packet goes as is");
                        last = Some((seq, ts));
                        highest_in = seq;
                        ssrc_in = ssrc;
                    }
                    Some((ls, lt)) if ssrc != ssrc_in || pending.is_some() => {
                        let gap = pending.take().unwrap_or(0).max(1);
                        assert_eq!(
                            out_seq,
                            ls.wrapping_add(1),
                            "a new stream goes on after {ls}"
                        );
                        assert_eq!(out_ts, lt.wrapping_add(gap), "and its timestamps too");
                        last = Some((out_seq, out_ts));
                        highest_in = seq;
                        ssrc_in = ssrc;
                    }
                    Some((ls, lt)) if newer(seq, highest_in) => {
                        let moved = seq.wrapping_sub(highest_in);
                        assert_eq!(
                            out_seq,
                            ls.wrapping_add(moved),
                            "in {seq} after {highest_in}"
                        );
                        let _ = lt;
                        last = Some((out_seq, out_ts));
                        highest_in = seq;
                    }
                    Some(_) => {} // late (or the same again): its own number, from before
                }
                if op[0] & 0x40 != 0 {
                    // The relay did not send it after all.
                    m.dropped(seq);
                    if seq == highest_in {
                        last = last.map(|(s, t)| (s.wrapping_sub(1), t));
                    }
                }
            }
            4 | 5 => {
                let got = m.insert();
                match last {
                    None => assert_eq!(got, None, "nothing before the first packet"),
                    Some((ls, lt)) => {
                        assert_eq!(got, Some((ls.wrapping_add(1), lt)));
                        last = got;
                    }
                }
            }
            6 => {
                let gap = u32::from(arg) << (op[3] % 16);
                m.restart(gap);
                if last.is_some() {
                    pending = Some(gap);
                }
            }
            _ => {
                // A drop of any number: only the newest one's frees its number.
                m.dropped(arg);
                if arg == highest_in {
                    last = last.map(|(s, t)| (s.wrapping_sub(1), t));
                }
            }
        }
        assert_eq!(m.started(), last.is_some());
    }
});
