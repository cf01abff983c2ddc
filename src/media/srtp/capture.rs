//! Learning a connection's SRTP keys: [`KeyCapture`] wraps rtc's crypto provider and recognises the
//! RFC 3711 key derivation rtc runs when a DTLS handshake completes (see the module above).

use super::*;

const LABEL_SRTP_AUTH: u8 = 1;
const LABEL_SRTP_SALT: u8 = 2;
const LABEL_SRTCP_KEY: u8 = 3;
const LABEL_SRTCP_AUTH: u8 = 4;
const LABEL_SRTCP_SALT: u8 = 5;
/// KDF blocks remembered per thread while a context is being derived (a context takes 4-6).
const MAX_PENDING_BLOCKS: usize = 64;
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
