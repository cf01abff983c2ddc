//! VP8 picture ids and TL0PICIDX kept continuous per subscriber across simulcast layer switches.
//! Each layer of a simulcast track numbers its frames on its own (RFC 7741 4.2: the payload
//! descriptor's PictureID, 7 or 15 bits, and TL0PICIDX, the index of the last base temporal layer
//! frame); a subscriber moved from one layer to another would see them jump. A route's
//! [`Vp8Map`] shifts them so they go on from the last ones it sent, as the munger does for sequence
//! numbers and timestamps. The values are rewritten in place in the subscriber's copy, same width,
//! so nothing moves.

/// Where a VP8 payload descriptor keeps its picture id and TL0PICIDX, and their values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Offset of the picture id, whether it is 15 bits (else 7), its value.
    pub pid: Option<(usize, bool, u16)>,
    /// Offset and value of TL0PICIDX.
    pub tl0: Option<(usize, u8)>,
    /// The temporal layer (TID) of the frame, when the descriptor says.
    pub tid: Option<u8>,
}

impl Descriptor {
    /// The descriptor at the start of `p` (`None`: too short for what it says it has).
    pub fn parse(p: &[u8]) -> Option<Descriptor> {
        let mut d = Descriptor::default();
        if p.first()? & 0x80 == 0 {
            return Some(d);
        }
        let x = *p.get(1)?;
        let mut i = 2;
        if x & 0x80 != 0 {
            let b = *p.get(i)?;
            if b & 0x80 != 0 {
                let v = u16::from_be_bytes([b & 0x7f, *p.get(i + 1)?]);
                d.pid = Some((i, true, v));
                i += 2;
            } else {
                d.pid = Some((i, false, u16::from(b)));
                i += 1;
            }
        }
        if x & 0x40 != 0 {
            d.tl0 = Some((i, *p.get(i)?));
            i += 1;
        }
        if x & 0x20 != 0 {
            d.tid = Some(*p.get(i)? >> 6);
        }
        Some(d)
    }

    /// Writes `pid` and `tl0` where this descriptor has them, in `p` (a copy of the payload it
    /// was parsed from).
    pub fn write(&self, p: &mut [u8], pid: u16, tl0: u8) {
        match self.pid {
            Some((i, true, _)) => {
                p[i] = 0x80 | ((pid >> 8) as u8 & 0x7f);
                p[i + 1] = pid as u8;
            }
            Some((i, false, _)) => p[i] = pid as u8 & 0x7f,
            None => {}
        }
        if let Some((i, _)) = self.tl0 {
            p[i] = tl0;
        }
    }
}

/// A route's shift of picture ids and TL0PICIDX (see the module's text).
#[derive(Clone, Debug, Default)]
pub struct Vp8Map {
    started: bool,
    pid_offset: u16,
    tl0_offset: u8,
    last_pid: u16,
    last_tl0: u8,
    /// The next packet starts another layer: the offsets are worked out again.
    restart: bool,
    /// The picture id of the last frame the route dropped (a temporal layer it does not take).
    dropped: Option<u16>,
}

fn newer(a: u16, b: u16, bits: u32) -> bool {
    let half = 1u16 << (bits - 1);
    let d = a.wrapping_sub(b) & ((1u32 << bits) - 1) as u16;
    d != 0 && d < half
}

impl Vp8Map {
    /// The route moves to another layer: its next packet continues the numbering.
    pub fn restart(&mut self) {
        if self.started {
            self.restart = true;
        }
    }

    /// The (picture id, TL0PICIDX) to send for a packet with descriptor `d`.
    pub fn map(&mut self, d: &Descriptor) -> (u16, u8) {
        let bits = if d.pid.is_some_and(|p| p.1) { 15 } else { 7 };
        let mask = ((1u32 << bits) - 1) as u16;
        if !self.started {
            self.started = true;
            if let Some((_, _, v)) = d.pid {
                self.last_pid = v;
            }
            if let Some((_, v)) = d.tl0 {
                self.last_tl0 = v;
            }
        } else if std::mem::take(&mut self.restart) {
            if let Some((_, _, v)) = d.pid {
                self.pid_offset = v.wrapping_sub(self.last_pid.wrapping_add(1)) & mask;
            }
            if let Some((_, v)) = d.tl0 {
                self.tl0_offset = v.wrapping_sub(self.last_tl0.wrapping_add(1));
            }
        }
        let pid = d
            .pid
            .map_or(0, |(_, _, v)| v.wrapping_sub(self.pid_offset) & mask);
        let tl0 = d.tl0.map_or(0, |(_, v)| v.wrapping_sub(self.tl0_offset));
        if d.pid.is_some() && newer(pid, self.last_pid, bits) {
            self.last_pid = pid;
        }
        if d.tl0.is_some() && (tl0.wrapping_sub(self.last_tl0) as i8) > 0 {
            self.last_tl0 = tl0;
        }
        (pid, tl0)
    }

    /// The shift applied now: kept with what is sent, so that a retransmission goes out with the
    /// numbers it first had ([`Vp8Map::map_again`]).
    pub fn offsets(&self) -> (u16, u8) {
        (self.pid_offset, self.tl0_offset)
    }

    /// The (picture id, TL0PICIDX) of a retransmission of a packet sent under `offsets`.
    pub fn map_again(d: &Descriptor, (pid_offset, tl0_offset): (u16, u8)) -> (u16, u8) {
        let mask = if d.pid.is_some_and(|p| p.1) {
            0x7fff
        } else {
            0x7f
        };
        (
            d.pid
                .map_or(0, |(_, _, v)| v.wrapping_sub(pid_offset) & mask),
            d.tl0.map_or(0, |(_, v)| v.wrapping_sub(tl0_offset)),
        )
    }

    /// A packet of the frame with picture id `d.pid` is not sent (its temporal layer is not
    /// taken): the frames after it are numbered on from the last one sent.
    pub fn drop_frame(&mut self, d: &Descriptor) {
        let Some((_, long, pid)) = d.pid else {
            return;
        };
        if self.dropped == Some(pid) {
            return;
        }
        self.dropped = Some(pid);
        let mask = if long { 0x7fff } else { 0x7f };
        self.pid_offset = self.pid_offset.wrapping_add(1) & mask;
    }

    /// Nothing was shifted yet: copies go out as they came.
    pub fn identity(&self) -> bool {
        self.pid_offset == 0 && self.tl0_offset == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// X=1, I=1 (15-bit picture id), L=1; then one byte of VP8 payload.
    fn payload(pid: u16, tl0: u8) -> Vec<u8> {
        vec![0x90, 0xc0, 0x80 | (pid >> 8) as u8, pid as u8, tl0, 0x9d]
    }

    #[test]
    fn descriptors_are_read_in_every_form() {
        assert_eq!(
            Descriptor::parse(&[0x10, 0x9d]),
            Some(Descriptor::default())
        );
        let d = Descriptor::parse(&payload(0x1234, 7)).unwrap();
        assert_eq!(d.pid, Some((2, true, 0x1234)));
        assert_eq!(d.tl0, Some((4, 7)));
        // 7-bit picture id, no TL0PICIDX.
        let d = Descriptor::parse(&[0x90, 0x80, 0x45, 0x9d]).unwrap();
        assert_eq!(d.pid, Some((2, false, 0x45)));
        assert_eq!(d.tl0, None);
        // Says it has a picture id, too short for it.
        assert_eq!(Descriptor::parse(&[0x90, 0x80, 0x81]), None);
        assert_eq!(Descriptor::parse(&[]), None);
    }

    #[test]
    fn picture_ids_and_tl0_go_on_across_a_switch() {
        let mut m = Vp8Map::default();
        let mut out = Vec::new();
        // Layer A: pids 500..503, tl0 10..13; then layer B: pids 32760.. (wrapping), tl0 250..
        for (pid, tl0) in (500..503).map(|i| (i, (i - 490) as u8)) {
            out.push(m.map(&Descriptor::parse(&payload(pid, tl0)).unwrap()));
        }
        m.restart();
        for (pid, tl0) in [(32766u16, 250u8), (32767, 251), (0, 252), (1, 253)] {
            out.push(m.map(&Descriptor::parse(&payload(pid, tl0)).unwrap()));
        }
        let pids: Vec<u16> = out.iter().map(|o| o.0).collect();
        let tl0s: Vec<u8> = out.iter().map(|o| o.1).collect();
        assert_eq!(pids, [500, 501, 502, 503, 504, 505, 506]);
        assert_eq!(tl0s, [10, 11, 12, 13, 14, 15, 16]);
        // A retransmission goes out with the numbers it had, by the shift it was sent under.
        let old = Descriptor::parse(&payload(501, 11)).unwrap();
        assert_eq!(Vp8Map::map_again(&old, (0, 0)), (501, 11));
        let new = Descriptor::parse(&payload(0, 252)).unwrap();
        assert_eq!(Vp8Map::map_again(&new, m.offsets()), (505, 15));
        // Written back in place, same width.
        let mut p = payload(0, 252);
        new.write(&mut p, 505, 15);
        assert_eq!(p, payload(505, 15));
    }

    /// As [`payload`], with T=1 and the frame's TID.
    fn layered(pid: u16, tl0: u8, tid: u8) -> Vec<u8> {
        vec![
            0x90,
            0xe0,
            0x80 | (pid >> 8) as u8,
            pid as u8,
            tl0,
            tid << 6,
            0x9d,
        ]
    }

    #[test]
    fn dropped_temporal_layers_leave_no_gap_in_picture_ids() {
        let d = Descriptor::parse(&layered(7, 3, 2)).unwrap();
        assert_eq!((d.tid, d.tl0), (Some(2), Some((4, 3))));
        // TIDs 0 2 1 2 0 2 1 2: the route takes TID <= 1.
        let mut m = Vp8Map::default();
        let mut sent = Vec::new();
        for (i, tid) in [0u8, 2, 1, 2, 0, 2, 1, 2].into_iter().enumerate() {
            let pid = 100 + i as u16;
            let tl0 = 10 + (i / 4) as u8;
            let d = Descriptor::parse(&layered(pid, tl0, tid)).unwrap();
            if tid > 1 {
                m.drop_frame(&d);
                m.drop_frame(&d); // its second packet
                continue;
            }
            sent.push(m.map(&d));
        }
        assert_eq!(sent, [(100, 10), (101, 10), (102, 11), (103, 11)]);
    }

    #[test]
    fn packets_of_one_frame_keep_one_picture_id() {
        let mut m = Vp8Map::default();
        let d = Descriptor::parse(&payload(40, 1)).unwrap();
        assert_eq!(m.map(&d), (40, 1));
        m.restart();
        let d = Descriptor::parse(&payload(9000, 77)).unwrap();
        assert_eq!(m.map(&d), (41, 2));
        assert_eq!(m.map(&d), (41, 2), "the frame's second packet");
        let d = Descriptor::parse(&payload(9001, 77)).unwrap();
        assert_eq!(
            m.map(&d),
            (42, 2),
            "TL0PICIDX moves only with a base-layer frame"
        );
    }
}
