//! Certificates for the tests of TLS between the hub and what it talks to: a private
//! authority made for one test, and a certificate for 127.0.0.1 it signed. Writes no file:
//! each test puts the PEM where its server and its client read them.

/// A server's certificate for 127.0.0.1 (and ::1) and its key, and the authority that signed it, as PEM.
pub struct Loopback {
    /// The private authority's certificate: what a client is given to trust the server.
    pub authority: String,
    pub cert: String,
    pub key: String,
}

/// A new private authority, named `name`, and a certificate for 127.0.0.1 and ::1 it signed.
pub fn loopback_signed_by(name: &str) -> Loopback {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let authority = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "::1".to_owned()])
        .unwrap()
        .signed_by(&key, &authority)
        .unwrap();
    Loopback { authority: authority.pem(), cert: cert.pem(), key: key.serialize_pem() }
}
