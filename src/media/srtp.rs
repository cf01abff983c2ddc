//! The relay's own SRTP sealing for forwarded packets.
//!
//! rtc keeps each connection's SRTP contexts to itself, and sending every forwarded copy through
//! its pipeline (interceptors, marshal, encrypt, queues) costs several microseconds and several
//! allocations per copy. Its public crypto-provider hook is how the relay learns the keys of its
//! own connections: [`KeyCapture`] wraps the ring provider, passes every operation through
//! unchanged, and recognises the RFC 3711 key derivation rtc runs when a DTLS handshake completes
//! (AES-CM PRF blocks under the master key, then an AEAD keyed with the derived session key). The
//! session key and salt it derives are left in a per-thread list; the media core, which drives each
//! connection on its own thread, takes them right after the call that completed the handshake, so
//! they are attributed to that connection. rtc derives the local (sending) context first, then the
//! remote one.
//!
//! With the local keys, [`Sealer`] protects a forwarded packet in place in the send batch
//! (AEAD_AES_128_GCM / AEAD_AES_256_GCM, RFC 7714; AES_CM_128_HMAC_SHA1_80, RFC 3711): no
//! allocation, no copy beyond the one into the send buffer. The relay offers only these profiles
//! ([`PROFILES`]; HMAC_SHA1_32 is left out, its tag length cannot be told from the keys).

use std::cell::RefCell;
use std::sync::Arc;

use rtc::crypto::providers::RingProvider;
use rtc::crypto::{
    ActiveKeyExchange, AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher,
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac,
    PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme, SigningKey, StreamCipher,
    StreamCipherAlgorithm,
};

/// AES-GCM's tag length in SRTP (RFC 7714).
pub const TAG_LEN: usize = 16;

const LABEL_SRTP_AUTH: u8 = 1;
const LABEL_SRTP_SALT: u8 = 2;
const LABEL_SRTCP_KEY: u8 = 3;
const LABEL_SRTCP_AUTH: u8 = 4;
const LABEL_SRTCP_SALT: u8 = 5;
/// HMAC-SHA1-80's tag length.
pub const CM_TAG_LEN: usize = 10;

/// The DTLS-SRTP profiles the relay accepts, all sealed by [`Sealer`]. A DTLS server takes the
/// client's first choice among them (Chrome: AES-CM first; rtc: AES-128-GCM first).
pub const PROFILES: [rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile; 3] = [
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
];
/// KDF blocks remembered per thread while a context is being derived (a context takes 4-6).
const MAX_PENDING_BLOCKS: usize = 64;

/// The transform a context was keyed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// AEAD_AES_*_GCM.
    Gcm(AeadAlgorithm),
    /// AES_CM with HMAC-SHA1.
    Cm(StreamCipherAlgorithm),
}

/// The `srtp_profiles` name (and metric label) of the profile keys of `transform` belong to.
pub fn profile_label(transform: Transform) -> &'static str {
    match transform {
        Transform::Gcm(AeadAlgorithm::Aes256Gcm) => "aes256-gcm",
        Transform::Gcm(_) => "aes128-gcm",
        Transform::Cm(_) => "aes128-cm-sha1-80",
    }
}

/// One direction's SRTP session keys (the key derivation's output).
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    pub transform: Transform,
    pub session_key: Vec<u8>,
    /// 12 bytes (GCM) or 14 (CM).
    pub session_salt: Vec<u8>,
    /// HMAC-SHA1 key (CM only).
    pub auth_key: Vec<u8>,
    /// The same direction's SRTCP session keys (labels 3-5 of the same derivation), when they
    /// were seen: what [`RtcpAuth`] checks received SRTCP packets with.
    pub rtcp: Option<SrtcpKeys>,
}

/// One direction's SRTCP session keys (RFC 3711 4.3.2, labels 3, 4 and 5).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SrtcpKeys {
    pub session_key: Vec<u8>,
    /// 12 bytes (GCM) or 14 (CM).
    pub session_salt: Vec<u8>,
    /// HMAC-SHA1 key (CM only).
    pub auth_key: Vec<u8>,
}

impl std::fmt::Debug for SrtpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpKeys")
            .field("transform", &self.transform)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keyed {
    No,
    Aead(AeadAlgorithm),
    Stream(StreamCipherAlgorithm),
}

struct KdfBlock {
    algorithm: BlockCipherAlgorithm,
    key: Vec<u8>,
    input: [u8; 16],
    output: [u8; 16],
    /// A cipher was keyed with this block's output: it was the first block of a session key.
    keyed: Keyed,
}

impl KdfBlock {
    /// `(label, counter)` of this block in the derivation `base` (a label-0, counter-0 block) is
    /// part of: same master key, input differing only in the label byte and the counter.
    fn relative_to(&self, base: &KdfBlock) -> Option<(u8, u8)> {
        let same = self.algorithm == base.algorithm
            && self.key == base.key
            && (0..15).all(|i| i == 7 || self.input[i] == base.input[i]);
        same.then(|| {
            (
                self.input[7] ^ base.input[7],
                self.input[15] ^ base.input[15],
            )
        })
    }
}

thread_local! {
    static PENDING: RefCell<Vec<KdfBlock>> = const { RefCell::new(Vec::new()) };
    static CAPTURED: RefCell<Vec<SrtpKeys>> = const { RefCell::new(Vec::new()) };
}

/// The SRTP keys derived on this thread since the last call, in derivation order (rtc: local
/// context first, then remote).
pub fn take_captured() -> Vec<SrtpKeys> {
    CAPTURED.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut *c)
        }
    })
}

/// A crypto provider that is ring's, plus the key capture described in the module docs.
pub struct KeyCapture {
    crypto: CapturingCrypto,
}

impl KeyCapture {
    pub fn new() -> Arc<KeyCapture> {
        Arc::new(KeyCapture {
            crypto: CapturingCrypto {
                inner: Arc::new(RingProvider::new()),
            },
        })
    }
}

impl RTCCryptoProvider for KeyCapture {
    fn name(&self) -> &'static str {
        "ring (ferry key capture)"
    }

    fn crypto(&self) -> &dyn RTCCrypto {
        &self.crypto
    }

    fn random(&self) -> &dyn RTCRandom {
        self.crypto.inner.random()
    }
}

struct CapturingCrypto {
    inner: Arc<dyn RTCCryptoProvider>,
}

impl CapturingCrypto {
    fn inner(&self) -> &dyn RTCCrypto {
        self.inner.crypto()
    }

    /// After a KDF block: when it is the last one of an SRTP context (GCM: the SRTCP salt, label
    /// 5; CM: the SRTCP auth key's second block, label 4), assemble that context's SRTP keys from
    /// the blocks seen before it.
    fn on_block(&self, block: KdfBlock) {
        PENDING.with(|p| {
            let mut pending = p.borrow_mut();
            let base = pending.iter().position(|b| {
                matches!(
                    (b.keyed, block.relative_to(b)),
                    (Keyed::Aead(_), Some((LABEL_SRTCP_SALT, 0)))
                        | (Keyed::Stream(_), Some((LABEL_SRTCP_AUTH, 1)))
                )
            });
            let Some(i) = base else {
                if pending.len() >= MAX_PENDING_BLOCKS {
                    pending.remove(0);
                }
                pending.push(block);
                return;
            };
            let base = &pending[i];
            let find = |label: u8, counter: u8| {
                pending
                    .iter()
                    .find(|b| b.relative_to(base) == Some((label, counter)))
                    .map(|b| b.output)
            };
            let key = match base.algorithm {
                BlockCipherAlgorithm::Aes128 => Some(base.output.to_vec()),
                // AES-256: the key is the first two PRF blocks (counter 0 and 1).
                BlockCipherAlgorithm::Aes256 => find(0, 1).map(|b| [base.output, b].concat()),
                _ => None,
            };
            let rtcp_key = match base.algorithm {
                BlockCipherAlgorithm::Aes128 => find(LABEL_SRTCP_KEY, 0).map(|b| b.to_vec()),
                BlockCipherAlgorithm::Aes256 => find(LABEL_SRTCP_KEY, 0)
                    .zip(find(LABEL_SRTCP_KEY, 1))
                    .map(|(a, b)| [a, b].concat()),
                _ => None,
            };
            let keys = match base.keyed {
                Keyed::Aead(a) => key.zip(find(LABEL_SRTP_SALT, 0)).map(|(k, salt)| SrtpKeys {
                    transform: Transform::Gcm(a),
                    session_key: k,
                    session_salt: salt[..12].to_vec(),
                    auth_key: Vec::new(),
                    // rtc derives the SRTCP key before the salts; this block is the SRTCP salt.
                    rtcp: rtcp_key.map(|k| SrtcpKeys {
                        session_key: k,
                        session_salt: block.output[..12].to_vec(),
                        auth_key: Vec::new(),
                    }),
                }),
                Keyed::Stream(c) => {
                    let auth = find(LABEL_SRTP_AUTH, 0)
                        .zip(find(LABEL_SRTP_AUTH, 1))
                        .map(|(a, b)| [a, b].concat()[..20].to_vec());
                    // This block is the SRTCP auth key's second one, the last rtc derives.
                    let rtcp = rtcp_key
                        .zip(find(LABEL_SRTCP_SALT, 0))
                        .zip(find(LABEL_SRTCP_AUTH, 0))
                        .map(|((k, salt), a)| SrtcpKeys {
                            session_key: k,
                            session_salt: salt[..14].to_vec(),
                            auth_key: [a, block.output].concat()[..20].to_vec(),
                        });
                    match (key, find(LABEL_SRTP_SALT, 0), auth) {
                        (Some(k), Some(salt), Some(auth_key)) => Some(SrtpKeys {
                            transform: Transform::Cm(c),
                            session_key: k,
                            session_salt: salt[..14].to_vec(),
                            auth_key,
                            rtcp,
                        }),
                        _ => None,
                    }
                }
                Keyed::No => None,
            };
            if let Some(keys) = keys {
                CAPTURED.with(|c| c.borrow_mut().push(keys));
            }
            let master = base.key.clone();
            pending.retain(|b| b.key != master);
        });
    }

    /// A cipher keyed with `key`: marks the KDF block that produced its first 16 bytes.
    fn on_keyed(&self, keyed: Keyed, key: &[u8]) {
        let expected = match keyed {
            Keyed::Aead(AeadAlgorithm::Aes128Gcm)
            | Keyed::Stream(StreamCipherAlgorithm::Aes128Ctr) => 16,
            Keyed::Aead(AeadAlgorithm::Aes256Gcm)
            | Keyed::Stream(StreamCipherAlgorithm::Aes256Ctr) => 32,
            _ => return,
        };
        if key.len() != expected {
            return;
        }
        PENDING.with(|p| {
            for b in p.borrow_mut().iter_mut() {
                if b.output == key[..16] && b.input[14..] == [0, 0] {
                    b.keyed = keyed;
                }
            }
        });
    }
}

impl RTCCrypto for CapturingCrypto {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        self.inner().supports(algorithm)
    }

    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner().hash(algorithm, data)
    }

    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        let mut input = [0; 16];
        let is_block = block.len() == 16;
        if is_block {
            input.copy_from_slice(block);
        }
        self.inner().block_encrypt(algorithm, key, block)?;
        if is_block {
            let mut output = [0; 16];
            output.copy_from_slice(block);
            self.on_block(KdfBlock {
                algorithm,
                key: key.to_vec(),
                input,
                output,
                keyed: Keyed::No,
            });
        }
        Ok(())
    }

    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner().new_hmac(algorithm, key)
    }

    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        let cipher = self.inner().new_stream_cipher(algorithm, key)?;
        self.on_keyed(Keyed::Stream(algorithm), key);
        Ok(cipher)
    }

    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        let cipher = self.inner().new_aead(algorithm, key)?;
        self.on_keyed(Keyed::Aead(algorithm), key);
        Ok(cipher)
    }

    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner().new_cbc(algorithm, key)
    }

    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        self.inner().start_key_exchange(algorithm)
    }

    fn generate_signing_key(
        &self,
        scheme: SignatureScheme,
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner().generate_signing_key(scheme)
    }

    fn import_signing_key(
        &self,
        scheme: SignatureScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner().import_signing_key(scheme, pkcs8_der)
    }

    fn verify_signature(
        &self,
        scheme: SignatureScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner()
            .verify_signature(scheme, public_key, message, signature)
    }
}

/// The cipher (and salt) of one direction's session keys.
fn keyed(keys: &SrtpKeys) -> Result<(Cipher, [u8; 14]), CryptoError> {
    keyed_parts(
        keys.transform,
        &keys.session_key,
        &keys.auth_key,
        &keys.session_salt,
    )
}

fn keyed_parts(
    transform: Transform,
    session_key: &[u8],
    auth_key: &[u8],
    session_salt: &[u8],
) -> Result<(Cipher, [u8; 14]), CryptoError> {
    let provider = RingProvider::new();
    let crypto = provider.crypto();
    let cipher = match transform {
        Transform::Gcm(a) => Cipher::Gcm(crypto.new_aead(a, session_key)?),
        Transform::Cm(c) => Cipher::Cm {
            ctr: crypto.new_stream_cipher(c, session_key)?,
            mac: crypto.new_hmac(HmacAlgorithm::Sha1, auth_key)?,
        },
    };
    let mut salt = [0; 14];
    let n = session_salt.len().min(14);
    salt[..n].copy_from_slice(&session_salt[..n]);
    Ok((cipher, salt))
}

/// RFC 7714 8.1: 00 00 || SSRC || ROC || SEQ, XOR the 12-byte salt.
fn gcm_iv(salt: &[u8; 14], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&roc.to_be_bytes());
    iv[10..12].copy_from_slice(&seq.to_be_bytes());
    for (v, s) in iv.iter_mut().zip(&salt[..12]) {
        *v ^= s;
    }
    iv
}

/// RFC 3711 4.1.1: SSRC || ROC || SEQ || 00 00 from byte 4, XOR the 14-byte salt.
fn cm_iv(salt: &[u8; 14], ssrc: u32, roc: u32, seq: u16) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&roc.to_be_bytes());
    iv[12..14].copy_from_slice(&seq.to_be_bytes());
    for (v, s) in iv.iter_mut().zip(salt) {
        *v ^= s;
    }
    iv
}

enum Cipher {
    Gcm(Box<dyn AeadCipher>),
    Cm {
        ctr: Box<dyn StreamCipher>,
        mac: Box<dyn Mac>,
    },
}

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

/// Opens the SRTP packets of one connection's receiving direction with its session keys: the
/// relay's own packet-in path (publishers' media) and the load generator's light subscribers.
/// Each SSRC has its rollover counter and a replay window (RFC 3711 3.3.2): a packet already
/// opened, or older than the window, is refused before any decryption.
pub struct Opener {
    cipher: Cipher,
    salt: [u8; 14],
    /// Per SSRC received: its rollover counter and replay window.
    streams: Vec<(u32, Rollover, ReplayWindow)>,
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
    /// changes nothing.
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

/// An SRTP packet's header length, SSRC and sequence number (not RTCP, not DTLS or STUN).
pub fn rtp_header(d: &[u8]) -> Option<(usize, u32, u16)> {
    // Version 2, and not an RTCP packet type (192-223 in the second byte).
    if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
        return None;
    }
    let mut len = 12 + 4 * usize::from(d[0] & 0x0f);
    if d[0] & 0x10 != 0 {
        let words = u16::from_be_bytes([*d.get(len + 2)?, *d.get(len + 3)?]);
        len += 4 + 4 * usize::from(words);
    }
    (len <= d.len()).then(|| {
        let seq = u16::from_be_bytes([d[2], d[3]]);
        let ssrc = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        (len, ssrc, seq)
    })
}

/// The SRTP packet index (RFC 3711 3.3.1): 2^16 * ROC + SEQ.
fn index(roc: u32, seq: u16) -> u64 {
    (u64::from(roc) << 16) | u64::from(seq)
}

/// The packet indices opened lately: the highest, and which of the 63 before it.
#[derive(Default, Clone, Copy)]
struct ReplayWindow {
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

/// The rollover counter of one outgoing SSRC (RFC 3711 3.3.1), for packets we send in order and
/// the occasional retransmission of an older one.
#[derive(Default, Clone, Copy)]
pub struct Rollover {
    roc: u32,
    highest: Option<u16>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::crypto::providers::RingCrypto;
    use rtc::rtp::header::Header;
    use rtc::shared::marshal::{Marshal, MarshalSize};
    use rtc::srtp::context::Context;
    use rtc::srtp::protection_profile::ProtectionProfile;

    fn master(profile: ProtectionProfile) -> (Vec<u8>, Vec<u8>) {
        let key: Vec<u8> = (0..profile.key_len() as u8).map(|i| i * 7 + 1).collect();
        let salt: Vec<u8> = (0..profile.salt_len() as u8).map(|i| 0xa0 ^ i).collect();
        (key, salt)
    }

    /// Builds a context through the capturing provider (as rtc does after DTLS) and returns the
    /// keys captured for it.
    fn capture(profile: ProtectionProfile, key: &[u8], salt: &[u8]) -> Vec<SrtpKeys> {
        let provider = KeyCapture::new();
        take_captured();
        Context::new(key, salt, profile, None, None, provider.crypto()).unwrap();
        take_captured()
    }

    fn seal_packet(sealer: &mut Sealer, h: &Header, payload: &[u8], roc: u32) -> Vec<u8> {
        let mut buf = vec![0xee; 3]; // sealing at an offset, as in the send batch
        let start = buf.len();
        buf.resize(start + h.marshal_size(), 0);
        h.marshal_to(&mut buf[start..]).unwrap();
        buf.extend_from_slice(payload);
        sealer
            .seal(
                &mut buf,
                start,
                h.marshal_size(),
                h.ssrc,
                h.sequence_number,
                roc,
            )
            .unwrap();
        buf.split_off(start)
    }

    fn header(seq: u16) -> Header {
        Header {
            version: 2,
            payload_type: 96,
            sequence_number: seq,
            timestamp: 3000,
            ssrc: 0x1234_5678,
            ..Default::default()
        }
    }

    #[test]
    fn captured_keys_seal_exactly_as_rtc_does_and_rtc_opens_them() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (key, salt) = master(profile);
            let captured = capture(profile, &key, &salt);
            assert_eq!(captured.len(), 1, "{profile:?}: one context, one key set");
            let mut sealer = Sealer::new(&captured[0]).unwrap();
            let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            let mut rtc_rx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            let payload: Vec<u8> = (0..1188u32).map(|i| i as u8).collect();
            for seq in [65533u16, 65534, 65535, 0, 1] {
                let h = header(seq);
                let roc = u32::from(seq < 100);
                let ours = seal_packet(&mut sealer, &h, &payload, roc);
                let mut plain = vec![0; h.marshal_size()];
                h.marshal_to(&mut plain).unwrap();
                plain.extend_from_slice(&payload);
                let theirs = rtc_tx.encrypt_rtp(&plain).unwrap();
                assert_eq!(ours, theirs.to_vec(), "{profile:?} seq {seq}");
                let opened = rtc_rx.decrypt_rtp(&ours).unwrap();
                assert_eq!(&opened[h.marshal_size()..], &payload[..]);
            }
        }
    }

    #[test]
    fn opener_opens_what_rtc_seals_across_a_wrap_and_refuses_tampering() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (key, salt) = master(profile);
            let captured = capture(profile, &key, &salt);
            let mut opener = Opener::new(&captured[0]).unwrap();
            let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            for (i, seq) in [65533u16, 65534, 65535, 0, 1, 2].into_iter().enumerate() {
                let h = header(seq);
                let payload: Vec<u8> = (0..1100u32).map(|b| (b as u8) ^ (i as u8)).collect();
                let mut plain = vec![0; h.marshal_size()];
                h.marshal_to(&mut plain).unwrap();
                plain.extend_from_slice(&payload);
                let sealed = rtc_tx.encrypt_rtp(&plain).unwrap().to_vec();
                // A flipped bit in the payload or the header: refused, and the next good packet
                // still opens (nothing was committed).
                for at in [h.marshal_size() + 10, 3] {
                    let mut bad = sealed.clone();
                    bad[at] ^= 1;
                    assert!(
                        opener
                            .open(&mut bad, h.marshal_size(), h.ssrc, seq)
                            .is_err(),
                        "{profile:?} seq {seq}: tampered byte {at} accepted"
                    );
                }
                let mut got = sealed.clone();
                let range = opener
                    .open(&mut got, h.marshal_size(), h.ssrc, seq)
                    .unwrap_or_else(|e| panic!("{profile:?} seq {seq}: {e}"));
                assert_eq!(&got[range], &payload[..], "{profile:?} seq {seq}");
            }
            let mut short = vec![0x80; 20];
            assert!(
                opener.open(&mut short, 12, 1, 1).is_err(),
                "too short for a tag"
            );
        }
    }

    /// The SRTCP keys captured with a context check what rtc seals (encrypted compound packets,
    /// one SSRC after another) and refuse a flipped bit anywhere, a packet of random bytes, and
    /// one too short for a tag; the first packet of a new RTP stream is told authentic or not
    /// without a trace in the opener.
    #[test]
    fn srtcp_and_first_srtp_packets_are_authenticated_before_any_state() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::AeadAes256Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (key, salt) = master(profile);
            let captured = capture(profile, &key, &salt);
            let rtcp_keys = captured[0].rtcp.as_ref().expect("SRTCP keys captured");
            let mut auth = RtcpAuth::new(captured[0].transform, rtcp_keys).unwrap();
            let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
            let mut scratch = Vec::new();
            for ssrc in [1u32, 0x1234_5678, 0xdead_beef] {
                // A receiver report with one report block, as a receive-only client sends.
                let mut rr = vec![0x81, 201, 0, 7];
                rr.extend_from_slice(&ssrc.to_be_bytes());
                rr.extend_from_slice(&[0x11; 24]);
                let sealed = rtc_tx.encrypt_rtcp(&rr).unwrap().to_vec();
                assert!(
                    auth.authentic(&sealed, &mut scratch),
                    "{profile:?}: rtc's SRTCP refused"
                );
                for at in [1, 5, 12, sealed.len() - 1, sealed.len() - 5] {
                    let mut bad = sealed.clone();
                    bad[at] ^= 0x10;
                    assert!(
                        !auth.authentic(&bad, &mut scratch),
                        "{profile:?}: flipped byte {at} accepted"
                    );
                }
            }
            let mut noise: Vec<u8> = (0..80u32).map(|i| (i * 37 + 11) as u8).collect();
            noise[0] = 0x81;
            noise[1] = 200;
            assert!(!auth.authentic(&noise, &mut scratch), "{profile:?}: noise");
            assert!(!auth.authentic(&noise[..12], &mut scratch), "too short");

            let mut opener = Opener::new(&captured[0]).unwrap();
            let h = header(40_000);
            let mut plain = vec![0; h.marshal_size()];
            h.marshal_to(&mut plain).unwrap();
            plain.extend_from_slice(&[7; 300]);
            let sealed = rtc_tx.encrypt_rtp(&plain).unwrap().to_vec();
            let mut bad = sealed.clone();
            bad[40] ^= 1;
            let hl = h.marshal_size();
            assert!(!opener.authentic_first(&bad, hl, h.ssrc, 40_000, &mut scratch));
            assert!(opener.authentic_first(&sealed, hl, h.ssrc, 40_000, &mut scratch));
            assert!(opener.streams.is_empty(), "{profile:?}: state kept");
            // And the opener still opens it afterwards (nothing was committed).
            let mut got = sealed.clone();
            assert!(opener.open(&mut got, hl, h.ssrc, 40_000).is_ok());
        }
    }

    #[test]
    fn two_contexts_are_captured_in_order() {
        let provider = KeyCapture::new();
        take_captured();
        let profile = ProtectionProfile::AeadAes128Gcm;
        let (k1, s1) = master(profile);
        let (k2, s2) = (vec![9; 16], vec![3; 12]);
        Context::new(&k1, &s1, profile, None, None, provider.crypto()).unwrap();
        Context::new(&k2, &s2, profile, None, None, provider.crypto()).unwrap();
        let got = take_captured();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], capture(profile, &k1, &s1)[0]);
        assert_eq!(got[1], capture(profile, &k2, &s2)[0]);
        assert_ne!(got[0], got[1]);
        assert!(take_captured().is_empty(), "taken once");
    }

    #[test]
    fn opener_refuses_replays_and_packets_behind_its_window() {
        let profile = ProtectionProfile::AeadAes128Gcm;
        let (key, salt) = master(profile);
        let captured = capture(profile, &key, &salt);
        let mut rtc_tx = Context::new(&key, &salt, profile, None, None, &RingCrypto).unwrap();
        let sealed: Vec<(u16, Vec<u8>)> = (0..200u16)
            .map(|seq| {
                let h = header(seq);
                let mut plain = vec![0; h.marshal_size()];
                h.marshal_to(&mut plain).unwrap();
                plain.extend_from_slice(&[seq as u8; 100]);
                (seq, rtc_tx.encrypt_rtp(&plain).unwrap().to_vec())
            })
            .collect();
        let hl = header(0).marshal_size();
        let ssrc = header(0).ssrc;
        let mut opener = Opener::new(&captured[0]).unwrap();
        let open = |o: &mut Opener, seq: u16| {
            let mut p = sealed[usize::from(seq)].1.clone();
            o.open(&mut p, hl, ssrc, seq).map(|_| ())
        };
        // Packets 0..=9 arrive, 5 missing; then 5 late (still in the window): fine once.
        for seq in (0..10).filter(|s| *s != 5) {
            assert_eq!(open(&mut opener, seq), Ok(()), "seq {seq}");
        }
        assert_eq!(open(&mut opener, 7), Err(OpenError::Replayed));
        assert_eq!(open(&mut opener, 5), Ok(()), "late but within the window");
        assert_eq!(open(&mut opener, 5), Err(OpenError::Replayed));
        // A tampered packet is refused without being marked: the genuine one still opens.
        let mut bad = sealed[10].1.clone();
        bad[hl + 3] ^= 1;
        assert_eq!(
            opener.open(&mut bad, hl, ssrc, 10),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(open(&mut opener, 10), Ok(()));
        // Far ahead, then a packet 64 or more behind: refused, one 63 behind is not.
        assert_eq!(open(&mut opener, 150), Ok(()));
        assert_eq!(open(&mut opener, 86), Err(OpenError::Replayed), "64 behind");
        assert_eq!(open(&mut opener, 87), Ok(()), "63 behind");
        // Resumed after rtc opened up to 190: 190 and before refused, 191 opens.
        let mut resumed = Opener::new(&captured[0]).unwrap();
        resumed.resume(ssrc, 190, 0);
        assert_eq!(open(&mut resumed, 190), Err(OpenError::Replayed));
        assert_eq!(open(&mut resumed, 191), Ok(()));
        assert_eq!(
            open(&mut resumed, 189),
            Err(OpenError::Replayed),
            "opened by rtc, as far as the opener can tell"
        );
    }

    #[test]
    fn rollover_counts_wraps_and_places_retransmissions() {
        let mut r = Rollover::default();
        assert_eq!(r.roc_for(65534), 0);
        assert_eq!(r.roc_for(65535), 0);
        assert_eq!(r.roc_for(0), 1);
        assert_eq!(r.roc_for(65535), 0, "a retransmission from before the wrap");
        assert_eq!(r.roc_for(1), 1);
        assert_eq!(r.roc_for(0), 1, "a retransmission after the wrap");
    }
}
