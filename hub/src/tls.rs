//! HTTPS: the certificate chain and key the hub presents, read from PEM files at start and
//! again on each reload, and the rustls configuration that offers them with ALPN `h2` and
//! `http/1.1`; and when the certificate served expires, for the operator. It accepts no
//! connection (`server` does) and catches no signal (`hub serve` calls [`Tls::reload`] on
//! SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, InconsistentKeys, ServerConfig};

/// The ALPN protocols offered, preferred first: a client that speaks HTTP/2 gets it.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What HTTPS serves: the rustls configuration, and the certificate it presents, which
/// [`Tls::reload`] may replace while the hub runs.
#[derive(Debug)]
pub struct Tls {
    /// Built once; its resolver reads the current certificate at every handshake.
    config: Arc<ServerConfig>,
    certificate: Arc<Certificate>,
}

impl Tls {
    /// Reads the certificate chain and its key; an unreadable or invalid file, or a key
    /// that does not belong to the certificate, is an error naming the file.
    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Tls> {
        let provider = Arc::new(ring::default_provider());
        let (current, not_after) = read(cert_path, key_path, &provider)?;
        let certificate = Arc::new(Certificate {
            current: ArcSwap::from_pointee(current),
            not_after: AtomicI64::new(not_after),
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider: provider.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no protocol version")?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls { config: Arc::new(config), certificate })
    }

    /// Rereads both files. New handshakes get the new certificate; connections already open
    /// keep theirs. On an error (named as by [`Tls::load`]) the current certificate stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let c = &self.certificate;
        let (current, not_after) = read(&c.cert_path, &c.key_path, &c.provider)?;
        c.current.store(Arc::new(current));
        c.not_after.store(not_after, Ordering::Relaxed);
        Ok(())
    }

    /// When the certificate served now stops being valid (its `notAfter`), in seconds since
    /// the Unix epoch; the chain's other certificates are not looked at.
    pub fn not_after(&self) -> i64 {
        self.certificate.not_after.load(Ordering::Relaxed)
    }

    /// Performs the server side of handshakes with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}

/// The certificate presented to every client, whatever name it asks for: the hub has one.
#[derive(Debug)]
struct Certificate {
    /// Swapped whole by a reload; a handshake takes whichever is current when it starts.
    current: ArcSwap<CertifiedKey>,
    /// `current`'s `notAfter`, in seconds since the Unix epoch.
    not_after: AtomicI64,
    cert_path: PathBuf,
    key_path: PathBuf,
    /// Parses the key on reload, as at start.
    provider: Arc<CryptoProvider>,
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The chain in `cert_path` and the private key in `key_path`, checked to belong together,
/// and the `notAfter` of the chain's first certificate, the server's own.
fn read(cert_path: &Path, key_path: &Path, provider: &CryptoProvider) -> anyhow::Result<(CertifiedKey, i64)> {
    let cert_name = cert_path.display();
    let key_name = key_path.display();
    let pem = std::fs::read(cert_path).with_context(|| format!("cannot read TLS certificate {cert_name}"))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("TLS certificate {cert_name} is not valid PEM: {e}"))?;
    let Some(first) = chain.first() else {
        bail!("TLS certificate {cert_name} holds no CERTIFICATE block");
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| anyhow!("TLS certificate {cert_name} is not an X.509 certificate: {e}"))?;
    let not_after = parsed.validity().not_after.timestamp();
    let pem = std::fs::read(key_path).with_context(|| format!("cannot read TLS key {key_name}"))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow!("TLS key {key_name} holds no usable PEM private key: {e}"))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow!("TLS key {key_name} cannot be used: {e}"))?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok((certified, not_after))
        }
        Err(rustls::Error::InconsistentKeys(_)) => {
            bail!("TLS key {key_name} does not belong to the certificate {cert_name}")
        }
        Err(e) => bail!("TLS certificate {cert_name} cannot be used: {e}"),
    }
}
