//! TLS for the agent's end of the link: which coordinator certificates the
//! agent trusts (the coordinator's CA given as PEM, or pinned by its SHA-256),
//! and the QUIC client configuration built on that.
//!
//! Never trusts the system's root certificates: the coordinator runs its own
//! CA, and nothing else may speak for it. Not responsible for the agent's
//! own certificate (`identity`).

use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::identity::Credentials;
use super::{transport_config, CaTrust, LinkError, PIN_PREFIX};

/// Bytes in a SHA-256 digest.
const SHA256_LEN: usize = 32;

/// The crypto provider for everything on the link, passed explicitly so
/// nothing depends on a process-wide default being installed.
pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// SHA-256 of a certificate's DER encoding.
pub(super) fn sha256(der: &[u8]) -> [u8; SHA256_LEN] {
    Sha256::digest(der).into()
}

/// The validated form of [`CaTrust`].
#[derive(Clone, Debug)]
pub(super) enum Trust {
    /// Only these CA certificates.
    Roots(Arc<RootCertStore>),
    /// Whatever CA in the presented chain has this SHA-256.
    Pin([u8; SHA256_LEN]),
}

impl Trust {
    /// Checks the operator's trust setting.
    ///
    /// # Errors
    /// [`LinkError::Settings`] for a PEM without a usable certificate or a
    /// pin that is not `sha256:` and 64 hex digits.
    pub fn new(trust: &CaTrust) -> Result<Self, LinkError> {
        match trust {
            CaTrust::Pem(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| {
                        LinkError::Settings(format!(
                            "ca_file is not valid PEM ({e}); copy the coordinator's ca.pem"
                        ))
                    })?;
                    roots.add(cert).map_err(|e| {
                        LinkError::Settings(format!(
                            "ca_file holds a certificate that cannot be a trust anchor ({e}); copy the coordinator's ca.pem"
                        ))
                    })?;
                }
                if roots.is_empty() {
                    return Err(LinkError::Settings(
                        "ca_file holds no certificate; copy the coordinator's ca.pem".into(),
                    ));
                }
                Ok(Self::Roots(Arc::new(roots)))
            }
            CaTrust::Sha256Pin(pin) => parse_pin(pin).map(Self::Pin).ok_or_else(|| {
                LinkError::Settings(format!(
                    "ca_sha256 {pin:?} is not \"{PIN_PREFIX}\" followed by 64 hex digits; copy the pin the coordinator prints"
                ))
            }),
        }
    }
}

/// Parses `sha256:<64 hex digits>`; the prefix may be left out and the hex
/// may be in either case or grouped with colons, as tools print it.
fn parse_pin(pin: &str) -> Option<[u8; SHA256_LEN]> {
    let trimmed = pin.trim();
    let hex = trimmed
        .get(..PIN_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PIN_PREFIX))
        .map_or(trimmed, |_| &trimmed[PIN_PREFIX.len()..]);
    let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
    if digits.len() != SHA256_LEN * 2 {
        return None;
    }
    let mut out = [0u8; SHA256_LEN];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Checks the coordinator's certificate against the operator's trust and
/// remembers why it failed, so the caller can report [`LinkError::Untrusted`]
/// rather than a bare TLS alert.
#[derive(Debug)]
pub(super) struct CoordinatorVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<String>>,
}

impl CoordinatorVerifier {
    pub fn new(trust: Trust, provider: Arc<CryptoProvider>) -> Self {
        Self {
            trust,
            provider,
            failure: Mutex::new(None),
        }
    }

    /// Why the coordinator's certificate was rejected, if it was.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn webpki(
        &self,
        roots: Arc<RootCertStore>,
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("cannot build certificate verifier: {e}")))
    }

    /// Pin trust: the CA is whichever presented certificate has the pinned
    /// hash, and the end entity must chain to it like to any trust anchor.
    fn verify_pinned(
        &self,
        pin: &[u8; SHA256_LEN],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(anchor) = intermediates.iter().find(|c| sha256(c) == *pin) else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    presented: intermediates.len() + 1,
                })),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| *c != anchor)
            .cloned()
            .collect();
        self.webpki(Arc::new(roots))?.verify_server_cert(
            end_entity,
            &rest,
            server_name,
            ocsp_response,
            now,
        )
    }
}

/// No certificate in the coordinator's chain has the pinned hash.
#[derive(Debug, thiserror::Error)]
#[error("none of the {presented} certificates the coordinator presented has the pinned SHA-256")]
struct PinMismatch {
    presented: usize,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = match &self.trust {
            Trust::Roots(roots) => self.webpki(roots.clone())?.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            Trust::Pin(pin) => self.verify_pinned(
                pin,
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
        };
        if let Err(e) = &result {
            *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client configuration: TLS 1.3 (QUIC has no other), the link's
/// ALPN, the coordinator verifier, and the agent's certificate if it has one.
///
/// # Errors
/// [`LinkError::Tls`] when rustls refuses the pieces (a key that does not
/// fit the certificate, a provider without TLS 1.3 suites).
pub(super) fn client_config(
    verifier: Arc<CoordinatorVerifier>,
    provider: Arc<CryptoProvider>,
    identity: Option<&Credentials>,
) -> Result<quinn::ClientConfig, LinkError> {
    let tls = |e: &dyn std::fmt::Display| LinkError::Tls(format!("cannot set up TLS: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(creds) => builder
            .with_client_auth_cert(vec![creds.cert_der.clone()], creds.key_der())
            .map_err(|e| tls(&e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![servitor_proto::link::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(|e| tls(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport_config()));
    Ok(client)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn pins_parse_in_the_forms_tools_print() {
        let hex = "ab".repeat(32);
        let want = Some([0xab; 32]);
        assert_eq!(parse_pin(&format!("sha256:{hex}")), want);
        assert_eq!(parse_pin(&format!("SHA256:{}", hex.to_uppercase())), want);
        assert_eq!(parse_pin(&hex), want);
        let grouped: Vec<&str> = std::iter::repeat_n("AB", 32).collect();
        assert_eq!(parse_pin(&format!("sha256:{}", grouped.join(":"))), want);
        assert_eq!(parse_pin("sha256:abcd"), None);
        assert_eq!(parse_pin(&format!("sha256:{}", "zz".repeat(32))), None);
        assert_eq!(parse_pin(&format!("sha1:{hex}")), None);
    }

    #[test]
    fn trust_settings_are_checked() {
        let err = Trust::new(&CaTrust::Pem("not a certificate".into())).unwrap_err();
        assert!(
            err.to_string().contains("ca_file holds no certificate"),
            "{err}"
        );
        let err = Trust::new(&CaTrust::Sha256Pin("sha256:12".into())).unwrap_err();
        assert!(err.to_string().contains("ca_sha256"), "{err}");
        assert!(!err.is_retryable());
    }
}
