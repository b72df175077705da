//! The coordinator's own certificate authority: a long-lived CA created on
//! first start and kept in the state directory, the server certificate the
//! agent link presents, and the short-lived client certificates issued to
//! agents at enrollment.
//!
//! The CA is never replaced once it exists: agents trust it by its PEM or by
//! its SHA-256 pin, so a new CA would cut every agent off. The server
//! certificate is cheap and is re-issued whenever the configured names
//! change. Not responsible for deciding who may enroll (`link` checks the
//! join token) nor for TLS itself.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Common name of the coordinator's CA certificate.
pub const CA_COMMON_NAME: &str = "Servitor coordinator CA";
/// The name every server certificate carries, whatever else is configured,
/// so agents can verify the coordinator however they reach it.
pub use servitor_proto::link::DEFAULT_SERVER_NAME as SERVER_NAME;
/// How long an agent's client certificate lasts unless configured otherwise.
/// A day keeps a stolen certificate short-lived while letting an agent ride
/// out a long coordinator outage without enrolling again.
pub const DEFAULT_CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest client certificate validity we issue; anything longer would
/// defeat the point of short-lived certificates.
pub const MAX_CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// The CA certificate (PEM) in the state directory; operators copy it to
/// agents as their `ca_file`.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (PEM, mode 0600).
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// The agent link's server certificate (PEM).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server certificate's private key (PEM, mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key.pem";

/// Twenty years: the CA outlives any coordinator install, because replacing
/// it means re-configuring every agent.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);
/// Server certificates are re-issued at start when they get near their end,
/// so this only needs to outlast the longest uptime between restarts.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 60 * 60);
/// Re-issue the server certificate at start once it has less than this left.
const SERVER_CERT_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates start this far in the past so a peer whose clock runs a
/// little behind does not reject a certificate issued a moment ago.
const CLOCK_SKEW_ALLOWANCE: Duration = servitor_proto::link::CERTIFICATE_BACKDATE;
/// Random serial numbers of 16 octets: RFC 5280 allows up to 20, and 64 bits
/// of randomness is the common minimum.
const SERIAL_BYTES: usize = 16;
/// RFC 5280's upper bound for a common name.
const MAX_COMMON_NAME_LEN: usize = 64;
/// Private keys are readable by the coordinator's user only.
const KEY_FILE_MODE: u32 = 0o600;
/// Certificates are public.
const CERT_FILE_MODE: u32 = 0o644;
/// A state directory we create holds private keys, so it is private.
const STATE_DIR_MODE: u32 = 0o700;
/// Permission bits that must be clear on a private key file.
const KEY_FILE_FORBIDDEN_BITS: u32 = 0o077;

/// Errors loading, creating or using the coordinator's certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file in the state directory could not be read or written.
    #[error("cannot {action} {path}: {source}; the state directory must be writable by the user the coordinator runs as")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored CA file does not parse or does not fit its partner.
    #[error("{path} does not hold a usable {what} ({detail}); restore the CA files from a backup, or move {CA_CERT_FILE} and {CA_KEY_FILE} away to create a new CA (every agent must then trust the new one)")]
    CorruptCa {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    /// Only one of the CA's certificate and key exists.
    #[error("{present} exists but {missing} does not; restore {missing} from a backup, or move {present} away to create a new CA (every agent must then trust the new one)")]
    IncompleteCa { present: PathBuf, missing: PathBuf },
    /// A configured server name cannot go in a certificate.
    #[error("server name {0:?} is not a DNS name or IP address; fix agents.server_names")]
    ServerName(String),
    /// The agent's certificate signing request is unusable.
    #[error("certificate signing request is unusable: {0}")]
    Csr(String),
    /// The agent id cannot be a certificate's common name.
    #[error("agent id {0:?} must be 1 to {MAX_COMMON_NAME_LEN} letters, digits, '-', '_' or '.'")]
    AgentId(String),
    /// The requested client certificate validity is out of range.
    #[error("client certificate validity {0:?} must be more than zero and at most {MAX_CLIENT_CERT_VALIDITY:?}")]
    Validity(Duration),
    /// Key generation or signing failed.
    #[error("cannot create a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The coordinator's CA and server identity. Cheap to clone.
#[derive(Clone)]
pub struct Pki {
    inner: Arc<Inner>,
}

struct Inner {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_cert_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca", &self.ca_sha256_pin())
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the CA and server certificate from `state_dir`, creating the CA
    /// on first start and re-issuing the server certificate when it is
    /// missing, unusable, near its end, or for other names than
    /// `server_names` (plus [`SERVER_NAME`]).
    ///
    /// # Errors
    /// [`PkiError::Io`] when the state directory is not readable or
    /// writable, [`PkiError::CorruptCa`] or [`PkiError::IncompleteCa`] when
    /// the stored CA is damaged (it is never replaced silently), and
    /// [`PkiError::ServerName`] for a name that cannot go in a certificate.
    pub fn load_or_create(state_dir: &Path, server_names: &[String]) -> Result<Self, PkiError> {
        let names = server_cert_names(server_names)?;
        if !state_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(STATE_DIR_MODE)
                .create(state_dir)
                .map_err(|e| io("create", state_dir, e))?;
        }
        let (ca_pem, ca_der, ca_key) = load_or_create_ca(state_dir)?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;
        let (server_cert_der, server_key_der) = match load_server_cert(state_dir, &ca_der, &names)?
        {
            Some(loaded) => loaded,
            None => create_server_cert(state_dir, &issuer, &names)?,
        };
        let pki = Self {
            inner: Arc::new(Inner {
                ca_pem,
                ca_der,
                issuer,
                server_cert_der,
                server_key_der,
            }),
        };
        tracing::info!(ca_pin = %pki.ca_sha256_pin(), names = ?names, "coordinator certificates ready");
        Ok(pki)
    }

    /// The CA certificate as PEM: what agents put in their `ca_file`.
    pub fn ca_pem(&self) -> &str {
        &self.inner.ca_pem
    }

    /// The CA certificate as DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.inner.ca_der
    }

    /// `sha256:` and the lowercase hex SHA-256 of the CA certificate's DER:
    /// what agents put in their `ca_sha256`.
    pub fn ca_sha256_pin(&self) -> String {
        let digest = Sha256::digest(&self.inner.ca_der);
        let mut pin = String::from(servitor_proto::link::PIN_PREFIX);
        for byte in digest {
            pin.push_str(&format!("{byte:02x}"));
        }
        pin
    }

    /// The server certificate chain the agent link presents: the server
    /// certificate, then the CA certificate (agents that pin the CA find it
    /// there).
    pub fn server_cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![
            self.inner.server_cert_der.clone(),
            self.inner.ca_der.clone(),
        ]
    }

    /// The server certificate's private key.
    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.inner.server_key_der.clone()))
    }

    /// Signs an agent's certificate signing request: the certificate names
    /// `agent_id` (whatever the request asked for), may only authenticate a
    /// TLS client, and lasts `valid_for` (see
    /// [`DEFAULT_CLIENT_CERT_VALIDITY`]). Returns the certificate as PEM.
    ///
    /// # Errors
    /// [`PkiError::Csr`] for a request that does not parse or whose
    /// signature does not verify, [`PkiError::AgentId`] and
    /// [`PkiError::Validity`] for arguments out of range.
    pub fn issue_client_cert(
        &self,
        csr_pem: &str,
        agent_id: &str,
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        let id_ok = !agent_id.is_empty()
            && agent_id.len() <= MAX_COMMON_NAME_LEN
            && agent_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !id_ok {
            return Err(PkiError::AgentId(agent_id.to_owned()));
        }
        if valid_for.is_zero() || valid_for > MAX_CLIENT_CERT_VALIDITY {
            return Err(PkiError::Validity(valid_for));
        }
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        // Nothing from the request but its key is used: the coordinator
        // decides the name, the validity and what the certificate is for.
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(agent_id);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, valid_for);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.inner.issuer)?;
        Ok(signed.pem())
    }
}

/// The names for the server certificate: [`SERVER_NAME`] and the configured
/// ones, normalized (IP addresses in canonical form, DNS names lowercase).
fn server_cert_names(configured: &[String]) -> Result<BTreeSet<String>, PkiError> {
    let mut names = BTreeSet::from([SERVER_NAME.to_owned()]);
    for name in configured {
        let name = name.trim();
        if let Ok(ip) = name.parse::<IpAddr>() {
            names.insert(ip.to_string());
        } else if ServerName::try_from(name).is_ok() && !name.is_empty() {
            names.insert(name.to_ascii_lowercase());
        } else {
            return Err(PkiError::ServerName(name.to_owned()));
        }
    }
    Ok(names)
}

/// Loads the CA, or creates it when neither of its files exists. Returns the
/// certificate as PEM and DER, and the key.
fn load_or_create_ca(dir: &Path) -> Result<(String, CertificateDer<'static>, KeyPair), PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (read_optional(&cert_path)?, read_optional(&key_path)?) {
        (Some(cert_pem), Some(key_pem)) => {
            tighten_key_permissions(&key_path)?;
            let corrupt = |path: &Path, what: &'static str, detail: String| PkiError::CorruptCa {
                path: path.to_path_buf(),
                what,
                detail,
            };
            let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| corrupt(&cert_path, "CA certificate", e.to_string()))?;
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| corrupt(&key_path, "CA key", e.to_string()))?;
            let (_, cert) = X509Certificate::from_der(&der)
                .map_err(|e| corrupt(&cert_path, "CA certificate", e.to_string()))?;
            if !cert.is_ca() {
                return Err(corrupt(
                    &cert_path,
                    "CA certificate",
                    "it is not a CA certificate".into(),
                ));
            }
            if *cert.public_key().subject_public_key.data != *key.public_key_raw() {
                return Err(corrupt(
                    &key_path,
                    "CA key",
                    format!("it is not the key of {}", cert_path.display()),
                ));
            }
            Ok((cert_pem, der, key))
        }
        (None, None) => create_ca(&cert_path, &key_path),
        (Some(_), None) => Err(PkiError::IncompleteCa {
            present: cert_path,
            missing: key_path,
        }),
        (None, Some(_)) => Err(PkiError::IncompleteCa {
            present: key_path,
            missing: cert_path,
        }),
    }
}

fn create_ca(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(String, CertificateDer<'static>, KeyPair), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_COMMON_NAME);
    params.serial_number = Some(random_serial());
    // Only ever issues end-entity certificates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    // Key first: a key without a certificate is reported, never silently
    // replaced, and the window between the two renames is tiny.
    write_file(key_path, key.serialize_pem().as_bytes(), KEY_FILE_MODE)?;
    write_file(cert_path, cert.pem().as_bytes(), CERT_FILE_MODE)?;
    tracing::info!(path = %cert_path.display(), "created the coordinator CA; agents trust it through this file or its pin");
    Ok((cert.pem(), cert.der().clone(), key))
}

/// The stored server certificate and key, if they are still right: issued
/// by this CA for exactly `names`, with plenty of life left.
fn load_server_cert(
    dir: &Path,
    ca_der: &CertificateDer<'static>,
    names: &BTreeSet<String>,
) -> Result<Option<(CertificateDer<'static>, Vec<u8>)>, PkiError> {
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let (Some(cert_pem), Some(key_pem)) = (read_optional(&cert_path)?, read_optional(&key_path)?)
    else {
        return Ok(None);
    };
    tighten_key_permissions(&key_path)?;
    match check_server_cert(&cert_pem, &key_pem, ca_der, names) {
        Ok(loaded) => Ok(Some(loaded)),
        Err(reason) => {
            tracing::info!(path = %cert_path.display(), %reason, "issuing a new server certificate");
            Ok(None)
        }
    }
}

fn check_server_cert(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &CertificateDer<'static>,
    names: &BTreeSet<String>,
) -> Result<(CertificateDer<'static>, Vec<u8>), String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| e.to_string())?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| e.to_string())?;
    if *cert.public_key().subject_public_key.data != *key.public_key_raw() {
        return Err("its key file holds another key".into());
    }
    let present = certificate_names(&cert)?;
    if present != *names {
        return Err(format!("it is for {present:?}, not {names:?}"));
    }
    let renew_at = unix_now().saturating_add(SERVER_CERT_RENEW_BEFORE.as_secs());
    if u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0) < renew_at {
        return Err("it is near its end".into());
    }
    // What an agent will check: signed by this CA, valid now, for server
    // authentication, under the name agents verify.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone()).map_err(|e| e.to_string())?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        &der,
        &[],
        &server_name,
        &[],
        UnixTime::now(),
    )
    .map_err(|e| format!("it does not verify against the CA: {e}"))?;
    Ok((der, key.serialize_der()))
}

/// The DNS names and IP addresses a certificate is for, normalized like
/// [`server_cert_names`].
fn certificate_names(cert: &X509Certificate<'_>) -> Result<BTreeSet<String>, String> {
    let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(BTreeSet::new());
    };
    let mut names = BTreeSet::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(dns) => {
                names.insert(dns.to_ascii_lowercase());
            }
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).map(IpAddr::from).ok(),
                    16 => <[u8; 16]>::try_from(*bytes).map(IpAddr::from).ok(),
                    _ => None,
                };
                names.insert(ip.map_or_else(|| format!("{bytes:?}"), |ip| ip.to_string()));
            }
            other => {
                names.insert(other.to_string());
            }
        }
    }
    Ok(names)
}

fn create_server_cert(
    dir: &Path,
    issuer: &Issuer<'static, KeyPair>,
    names: &BTreeSet<String>,
) -> Result<(CertificateDer<'static>, Vec<u8>), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    // CertificateParams::new makes IP addresses IP SANs and the rest DNS SANs.
    let mut params = CertificateParams::new(names.iter().cloned().collect::<Vec<_>>())?;
    params.distinguished_name = common_name(SERVER_NAME);
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, SERVER_CERT_VALIDITY);
    let cert = params.signed_by(&key, issuer)?;
    write_file(
        &dir.join(SERVER_KEY_FILE),
        key.serialize_pem().as_bytes(),
        KEY_FILE_MODE,
    )?;
    write_file(
        &dir.join(SERVER_CERT_FILE),
        cert.pem().as_bytes(),
        CERT_FILE_MODE,
    )?;
    Ok((cert.der().clone(), key.serialize_der()))
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// A positive serial number whose first octet is not zero, so it encodes in
/// exactly [`SERIAL_BYTES`] octets.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; SERIAL_BYTES];
    rand::fill(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Valid from a little before now (see [`CLOCK_SKEW_ALLOWANCE`]) until
/// `lifetime` from now.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(CLOCK_SKEW_ALLOWANCE);
    params.not_after = epoch + now + lifetime;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path, e)),
    }
}

/// A key file others can read is fixed (and reported) rather than refused:
/// refusing would stop the coordinator over something it can repair.
fn tighten_key_permissions(path: &Path) -> Result<(), PkiError> {
    let mode = std::fs::metadata(path)
        .map_err(|e| io("inspect", path, e))?
        .permissions()
        .mode();
    if mode & KEY_FILE_FORBIDDEN_BITS != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "private key was readable by others; restricting it to 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(KEY_FILE_MODE))
            .map_err(|e| io("restrict permissions of", path, e))?;
    }
    Ok(())
}

/// Writes a fresh file beside `path` with `mode`, then renames it into
/// place: a reader never sees half a file, and a key never exists with
/// wider permissions.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    if let Err(e) = std::fs::remove_file(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io("remove", &tmp, e));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", &tmp, e))?;
    // The umask may have narrowed the mode further; make it exact.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("replace", path, e))
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn csr(cn: &str) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(cn);
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    #[test]
    fn reload_keeps_the_ca_and_key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = Pki::load_or_create(&state, &names(&["localhost", "127.0.0.1"])).unwrap();
        for file in [CA_KEY_FILE, SERVER_KEY_FILE] {
            assert_eq!(mode(&state.join(file)), 0o600, "{file}");
        }
        assert_eq!(mode(&state.join(CA_CERT_FILE)), 0o644);
        assert_eq!(mode(&state), 0o700);
        assert_eq!(
            std::fs::read_to_string(state.join(CA_CERT_FILE)).unwrap(),
            first.ca_pem()
        );
        let server_before = std::fs::read(state.join(SERVER_CERT_FILE)).unwrap();

        let second = Pki::load_or_create(&state, &names(&["127.0.0.1", "LOCALHOST"])).unwrap();
        assert_eq!(second.ca_pem(), first.ca_pem());
        assert_eq!(second.ca_sha256_pin(), first.ca_sha256_pin());
        assert_eq!(
            std::fs::read(state.join(SERVER_CERT_FILE)).unwrap(),
            server_before,
            "same names must keep the server certificate"
        );

        let third = Pki::load_or_create(&state, &names(&["coordinator.example"])).unwrap();
        assert_eq!(third.ca_sha256_pin(), first.ca_sha256_pin());
        let server_after = std::fs::read(state.join(SERVER_CERT_FILE)).unwrap();
        assert_ne!(
            server_after, server_before,
            "new names need a new server certificate"
        );
        let chain = third.server_cert_chain();
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        let want: BTreeSet<String> = ["coordinator.example", SERVER_NAME]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(certificate_names(&cert).unwrap(), want);
    }

    #[test]
    fn ca_is_what_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let (_, ca) = X509Certificate::from_der(pki.ca_der()).unwrap();
        assert!(ca.is_ca());
        let cn = ca
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, CA_COMMON_NAME);
        let pin = pki.ca_sha256_pin();
        assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");
        assert_eq!(
            CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap(),
            *pki.ca_der()
        );
        // The chain is [server, CA] so pinning agents find the CA.
        assert_eq!(pki.server_cert_chain()[1], *pki.ca_der());
    }

    #[test]
    fn a_missing_server_cert_is_reissued_but_a_missing_ca_half_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        std::fs::remove_file(dir.path().join(SERVER_CERT_FILE)).unwrap();
        let again = Pki::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(again.ca_sha256_pin(), pki.ca_sha256_pin());
        assert!(dir.path().join(SERVER_CERT_FILE).exists());

        std::fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let err = Pki::load_or_create(dir.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::IncompleteCa { .. }), "{err}");
        assert!(err.to_string().contains("restore"), "{err}");
        assert!(
            !dir.path().join(CA_CERT_FILE).exists(),
            "the CA must not be replaced"
        );
    }

    #[test]
    fn loose_key_permissions_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        Pki::load_or_create(dir.path(), &[]).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        Pki::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn bad_server_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Pki::load_or_create(dir.path(), &names(&["not a name"])).unwrap_err();
        assert!(matches!(err, PkiError::ServerName(_)), "{err}");
    }

    #[test]
    fn client_certificates_name_the_chosen_agent_id_and_are_client_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let (key, request) = csr("i-want-to-be-admin");
        let valid_for = Duration::from_secs(3600);
        let pem = pki
            .issue_client_cert(&request, "box-a1b2c3", valid_for)
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "box-a1b2c3");
        assert_eq!(cert.subject().iter_common_name().count(), 1);
        assert_eq!(
            *cert.public_key().subject_public_key.data,
            *key.public_key_raw()
        );
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let validity = cert.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        let want = i64::try_from((valid_for + CLOCK_SKEW_ALLOWANCE).as_secs()).unwrap();
        assert!((lifetime - want).abs() <= 2, "{lifetime} vs {want}");
        assert_eq!(cert.issuer().as_raw(), {
            let (_, ca) = X509Certificate::from_der(pki.ca_der()).unwrap();
            ca.subject().as_raw().to_vec()
        });

        // The coordinator's own verifier accepts it.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn bad_requests_and_arguments_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let (_, request) = csr("box");
        let day = DEFAULT_CLIENT_CERT_VALIDITY;
        let err = pki
            .issue_client_cert("not a csr", "box-1", day)
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
        let mut tampered = request.clone().into_bytes();
        let mid = tampered.len() / 2;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        let err = pki
            .issue_client_cert(&String::from_utf8(tampered).unwrap(), "box-1", day)
            .unwrap_err();
        assert!(matches!(err, PkiError::Csr(_)), "{err}");
        for id in ["", "has space", &"x".repeat(65)] {
            let err = pki.issue_client_cert(&request, id, day).unwrap_err();
            assert!(matches!(err, PkiError::AgentId(_)), "{err}");
        }
        for valid_for in [Duration::ZERO, MAX_CLIENT_CERT_VALIDITY * 2] {
            let err = pki
                .issue_client_cert(&request, "box-1", valid_for)
                .unwrap_err();
            assert!(matches!(err, PkiError::Validity(_)), "{err}");
        }
    }
}
