//! Opening received packets: SRTP with a replay window per SSRC ([`Opener`]), the first packet of
//! a stream checked without keeping anything, and SRTCP checked before rtc sees it ([`RtcpAuth`]).

use super::*;

/// Opens the SRTP packets of one connection's receiving direction with its session keys: the
/// relay's own packet-in path (publishers' media) and the load generator's light subscribers.
/// Each SSRC has its rollover counter and a replay window (RFC 3711 3.3.2): a packet already
/// opened, or older than the window, is refused before any decryption.
pub struct Opener {
    cipher: Cipher,
    salt: [u8; 14],
    /// Per SSRC received: its rollover counter and replay window.
    pub(super) streams: Vec<(u32, Rollover, ReplayWindow)>,
}

/// Why [`Opener::open`] refused a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Already opened, or too old to tell (behind the replay window).
    Replayed,
    /// Not authentic (or too short for a tag).
    Unauthentic,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenError::Replayed => "replayed SRTP packet",
            OpenError::Unauthentic => "SRTP packet failed authentication",
        })
    }
}

impl Opener {
    pub fn new(keys: &SrtpKeys) -> Result<Opener, CryptoError> {
        let (cipher, salt) = keyed(keys)?;
        Ok(Opener {
            cipher,
            salt,
            streams: Vec::new(),
        })
    }

    /// Continue an SSRC whose packets were opened elsewhere so far (rtc's receive pipeline), the
    /// latest being `seq` with rollover counter `roc`: that packet and the window behind it count
    /// as opened (which of them were is not known here; a late one is lost rather than a replay
    /// let through).
    pub fn resume(&mut self, ssrc: u32, seq: u16, roc: u32) {
        let rollover = Rollover {
            roc,
            highest: Some(seq),
        };
        let window = ReplayWindow {
            highest: Some(index(roc, seq)),
            seen: u64::MAX,
        };
        match self.streams.iter_mut().find(|(s, ..)| *s == ssrc) {
            Some(stream) => *stream = (ssrc, rollover, window),
            None => self.streams.push((ssrc, rollover, window)),
        }
    }

    /// Authenticates and decrypts the SRTP packet `packet` (an RTP header of `header_len` bytes,
    /// then the encrypted payload and the tag) in place; the payload's range. A packet refused
    /// changes nothing in the opener (its replay window and rollover counter); the packet's
    /// bytes after the header may have been overwritten (AES-GCM decrypts in place before it
    /// checks the tag), so a caller that keeps a refused packet opens a copy.
    pub fn open(
        &mut self,
        packet: &mut [u8],
        header_len: usize,
        ssrc: u32,
        seq: u16,
    ) -> Result<std::ops::Range<usize>, OpenError> {
        let i = match self.streams.iter().position(|(s, ..)| *s == ssrc) {
            Some(i) => i,
            None => {
                self.streams
                    .push((ssrc, Rollover::default(), ReplayWindow::default()));
                self.streams.len() - 1
            }
        };
        // Committed only once the packet authenticates.
        let mut rollover = self.streams[i].1;
        let roc = rollover.roc_for(seq);
        if !self.streams[i].2.fresh(index(roc, seq)) {
            return Err(OpenError::Replayed);
        }
        let end = open_with(
            &mut self.cipher,
            &self.salt,
            packet,
            header_len,
            (ssrc, roc, seq),
        )?;
        self.streams[i].1 = rollover;
        self.streams[i].2.accept(index(roc, seq));
        Ok(header_len..end)
    }

    /// Whether the SRTP packet `packet` of a stream not opened before is authentic, as its
    /// stream's first packet (rollover counter 0, RFC 3711 3.3.1): decrypted into `scratch`, so
    /// that nothing here or in `packet` changes. What lets the relay refuse a forged packet
    /// before anything (rtc's per-SSRC contexts) is made for its SSRC.
    pub fn authentic_first(
        &mut self,
        packet: &[u8],
        header_len: usize,
        ssrc: u32,
        seq: u16,
        scratch: &mut Vec<u8>,
    ) -> bool {
        scratch.clear();
        scratch.extend_from_slice(packet);
        open_with(
            &mut self.cipher,
            &self.salt,
            scratch,
            header_len,
            (ssrc, 0, seq),
        )
        .is_ok()
    }
}

/// Authenticates and decrypts an SRTP packet in place (the payload ends at the returned offset).
fn open_with(
    cipher: &mut Cipher,
    salt: &[u8; 14],
    packet: &mut [u8],
    header_len: usize,
    (ssrc, roc, seq): (u32, u32, u16),
) -> Result<usize, OpenError> {
    let tag_len = match cipher {
        Cipher::Gcm(_) => TAG_LEN,
        Cipher::Cm { .. } => CM_TAG_LEN,
    };
    if packet.len() < header_len + tag_len {
        return Err(OpenError::Unauthentic);
    }
    let end = packet.len() - tag_len;
    match cipher {
        Cipher::Gcm(aead) => {
            let iv = gcm_iv(salt, ssrc, roc, seq);
            let (aad, rest) = packet.split_at_mut(header_len);
            let (payload, tag) = rest.split_at_mut(end - header_len);
            aead.open_in_place(&iv, aad, payload, tag)
                .map_err(|_| OpenError::Unauthentic)?;
        }
        Cipher::Cm { ctr, mac } => {
            let mut tag = [0; 20];
            mac.sign(&[&packet[..end], &roc.to_be_bytes()], &mut tag)
                .map_err(|_| OpenError::Unauthentic)?;
            if !same_tag(&tag[..CM_TAG_LEN], &packet[end..]) {
                return Err(OpenError::Unauthentic);
            }
            let iv = cm_iv(salt, ssrc, roc, seq);
            ctr.apply_keystream(&iv, &mut packet[header_len..end])
                .map_err(|_| OpenError::Unauthentic)?;
        }
    }
    Ok(end)
}

/// Tags compared in constant time.
fn same_tag(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The E flag and SRTCP index trailer's length (RFC 3711 3.4).
const SRTCP_INDEX_LEN: usize = 4;

/// Checks received SRTCP packets of one connection (its receiving direction's SRTCP keys)
/// without keeping any state: the relay asks it before rtc, which makes a context for every SSRC
/// it is shown, sees an RTCP packet of an SSRC it has not had yet.
pub struct RtcpAuth {
    cipher: Cipher,
    salt: [u8; 14],
}

impl RtcpAuth {
    pub fn new(transform: Transform, keys: &SrtcpKeys) -> Result<RtcpAuth, CryptoError> {
        let (cipher, salt) = keyed_parts(
            transform,
            &keys.session_key,
            &keys.auth_key,
            &keys.session_salt,
        )?;
        Ok(RtcpAuth { cipher, salt })
    }

    /// Whether `packet` (an SRTCP packet as received) carries a valid authentication tag
    /// (AEAD_AES_*_GCM: RFC 7714 9; AES_CM with HMAC-SHA1-80: RFC 3711 3.4). Encrypted or not
    /// (the E flag), the tag covers it. `scratch` holds a decrypted copy; `packet` is untouched.
    pub fn authentic(&mut self, packet: &[u8], scratch: &mut Vec<u8>) -> bool {
        match &mut self.cipher {
            Cipher::Gcm(aead) => {
                if packet.len() < 8 + TAG_LEN + SRTCP_INDEX_LEN {
                    return false;
                }
                let trailer_at = packet.len() - SRTCP_INDEX_LEN;
                let tag_at = trailer_at - TAG_LEN;
                let trailer = &packet[trailer_at..];
                let encrypted = trailer[0] & 0x80 != 0;
                let e_index = u32::from_be_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
                let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                // 00 00 || SSRC || 00 00 || 0 || SRTCP index, XOR the salt.
                let mut iv = [0u8; 12];
                iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
                iv[8..12].copy_from_slice(&(e_index & 0x7fff_ffff).to_be_bytes());
                for (v, s) in iv.iter_mut().zip(&self.salt[..12]) {
                    *v ^= s;
                }
                let tag = &packet[tag_at..trailer_at];
                scratch.clear();
                if encrypted {
                    // AAD: the first 8 octets and the trailer; the rest is ciphertext.
                    let mut aad = [0u8; 8 + SRTCP_INDEX_LEN];
                    aad[..8].copy_from_slice(&packet[..8]);
                    aad[8..].copy_from_slice(trailer);
                    scratch.extend_from_slice(&packet[8..tag_at]);
                    aead.open_in_place(&iv, &aad, scratch, tag).is_ok()
                } else {
                    // Not encrypted: all of it is AAD, with the trailer.
                    scratch.extend_from_slice(&packet[..tag_at]);
                    scratch.extend_from_slice(trailer);
                    aead.open_in_place(&iv, scratch, &mut [], tag).is_ok()
                }
            }
            Cipher::Cm { mac, .. } => {
                if packet.len() < 8 + SRTCP_INDEX_LEN + CM_TAG_LEN {
                    return false;
                }
                let tag_at = packet.len() - CM_TAG_LEN;
                let mut tag = [0; 20];
                mac.sign(&[&packet[..tag_at]], &mut tag).is_ok()
                    && same_tag(&tag[..CM_TAG_LEN], &packet[tag_at..])
            }
        }
    }
}
/// The SRTP packet index (RFC 3711 3.3.1): 2^16 * ROC + SEQ.
fn index(roc: u32, seq: u16) -> u64 {
    (u64::from(roc) << 16) | u64::from(seq)
}

/// The packet indices opened lately: the highest, and which of the 63 before it.
#[derive(Default, Clone, Copy)]
pub(super) struct ReplayWindow {
    highest: Option<u64>,
    /// Bit `i`: index `highest - i` was opened.
    seen: u64,
}

impl ReplayWindow {
    /// Not opened before, and not too old to tell.
    fn fresh(&self, index: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if index > h => true,
            Some(h) => h - index < 64 && self.seen & (1 << (h - index)) == 0,
        }
    }

    fn accept(&mut self, index: u64) {
        match self.highest {
            Some(h) if index <= h => self.seen |= 1 << (h - index),
            Some(h) => {
                let shift = index - h;
                self.seen = if shift >= 64 { 0 } else { self.seen << shift } | 1;
                self.highest = Some(index);
            }
            None => {
                self.seen = 1;
                self.highest = Some(index);
            }
        }
    }
}
