//! TLS on Ferry's own HTTP port (`tls_cert` / `tls_key`), for a single Ferry without a balancer:
//! browsers need a secure origin for cameras anywhere but localhost, and `wss://` for signaling
//! from an `https://` page. The certificate and key are read at start and again on SIGHUP
//! ([`Tls::reload`]); a reload that fails keeps the pair in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// The server's TLS settings, swapped whole on a reload.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Read `cert` (PEM, the chain from the server's certificate on) and `key` (PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Tls>, String> {
        let config = server_config(cert, key)?;
        Ok(Arc::new(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            config: RwLock::new(Arc::new(config)),
        }))
    }

    /// Read the files again; on an error the pair in use stays (and the error is returned).
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.cert, &self.key)?;
        // No `.await` under this lock.
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// What a new connection is accepted with.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls_cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("tls_cert {}: no certificate in it", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls_cert / tls_key: {e}"))?;
    // HTTP/1.1 only: browsers open WebSockets over it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
