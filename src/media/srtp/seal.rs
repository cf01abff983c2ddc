//! Sealing forwarded packets in place ([`Sealer`]) with the rollover counter of each outgoing SSRC
//! ([`Rollover`]).

use super::*;

/// Seals RTP packets for one connection's sending direction.
pub struct Sealer {
    cipher: Cipher,
    salt: [u8; 14],
}

impl Sealer {
    pub fn new(keys: &SrtpKeys) -> Result<Sealer, CryptoError> {
        let (cipher, salt) = keyed(keys)?;
        Ok(Sealer { cipher, salt })
    }

    /// Protects the RTP packet at `buf[start..]` (header of `header_len` bytes, then payload) in
    /// place and appends the tag.
    pub fn seal(
        &mut self,
        buf: &mut Vec<u8>,
        start: usize,
        header_len: usize,
        ssrc: u32,
        seq: u16,
        roc: u32,
    ) -> Result<(), CryptoError> {
        match &mut self.cipher {
            Cipher::Gcm(aead) => {
                let iv = gcm_iv(&self.salt, ssrc, roc, seq);
                let mut tag = [0; TAG_LEN];
                let (aad, payload) = buf[start..].split_at_mut(header_len);
                aead.seal_in_place(&iv, aad, payload, &mut tag)?;
                buf.extend_from_slice(&tag);
            }
            Cipher::Cm { ctr, mac } => {
                let iv = cm_iv(&self.salt, ssrc, roc, seq);
                ctr.apply_keystream(&iv, &mut buf[start + header_len..])?;
                // RFC 3711 4.2: HMAC-SHA1 over the packet and the ROC, 80 bits of it.
                let mut tag = [0; 20];
                mac.sign(&[&buf[start..], &roc.to_be_bytes()], &mut tag)?;
                buf.extend_from_slice(&tag[..CM_TAG_LEN]);
            }
        }
        Ok(())
    }
}
/// The rollover counter of one outgoing SSRC (RFC 3711 3.3.1), for packets we send in order and
/// the occasional retransmission of an older one.
#[derive(Default, Clone, Copy)]
pub struct Rollover {
    pub(super) roc: u32,
    pub(super) highest: Option<u16>,
}

impl Rollover {
    /// The ROC to seal `seq` with; advances on a wrap of the highest sequence number sent.
    pub fn roc_for(&mut self, seq: u16) -> u32 {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            return self.roc;
        };
        let newer = seq.wrapping_sub(highest) as i16 > 0;
        if newer {
            if seq < highest {
                self.roc = self.roc.wrapping_add(1);
            }
            self.highest = Some(seq);
            self.roc
        } else if seq > highest {
            // Older, from before the last wrap.
            self.roc.wrapping_sub(1)
        } else {
            self.roc
        }
    }
}
