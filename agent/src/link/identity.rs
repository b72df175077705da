//! The agent's identity on the link: its key pair and the short-lived client
//! certificate the coordinator issued for it, where they are kept, and when
//! they are due for renewal.
//!
//! Not responsible for getting a certificate (enrollment lives in the parent
//! module) nor for judging the coordinator's certificate (`tls`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{der, LinkError};

/// Client certificate file in the agent's state directory.
const CERT_FILE: &str = "client.pem";
/// Private key file in the agent's state directory, mode [`KEY_FILE_MODE`].
const KEY_FILE: &str = "client.key.pem";
/// Only the agent's own user may read its private key.
const KEY_FILE_MODE: u32 = 0o600;
/// The state directory holds a private key, so it is private too.
const STATE_DIR_MODE: u32 = 0o700;
/// Renew once less than this share of the certificate's life is left, so a
/// certificate never runs out in the middle of a connection attempt.
const RENEW_BELOW_REMAINING_PERCENT: i64 = 10;

/// Credentials kept only in memory when the agent has no state directory,
/// keyed by coordinator, server name and agent name. They last as long as
/// the process, which is as long as such an agent needs them.
static MEMORY: Mutex<BTreeMap<String, Credentials>> = Mutex::new(BTreeMap::new());

/// A key pair with the certificate the coordinator issued for it.
#[derive(Clone)]
pub(super) struct Credentials {
    pub cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: Vec<u8>,
    pub agent_id: String,
    not_before: i64,
    not_after: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("agent_id", &self.agent_id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Pairs a certificate with the key it was issued for.
    ///
    /// # Errors
    /// Fails when the certificate does not parse, names no agent id, or
    /// carries a key other than `key`'s.
    pub fn new(cert_pem: &str, key: &rcgen::KeyPair) -> Result<Self, String> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("certificate is not PEM: {e}"))?;
        let summary =
            der::summarize(&cert_der).ok_or("certificate is malformed or has no common name")?;
        if summary.public_key != key.public_key_raw() {
            return Err("certificate is not for this agent's key".into());
        }
        if summary.common_name.is_empty() {
            return Err("certificate names no agent id".into());
        }
        Ok(Self {
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            agent_id: summary.common_name,
            not_before: summary.not_before,
            not_after: summary.not_after,
        })
    }

    /// The private key, for rustls.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Whether the certificate is expired, not yet valid, or close enough to
    /// its end that it should be replaced now (`now` in Unix seconds).
    pub fn needs_renewal(&self, now: i64) -> bool {
        needs_renewal(self.not_before, self.not_after, now)
    }

    /// Whether the certificate is outside its validity window.
    pub fn expired(&self, now: i64) -> bool {
        now < self.not_before || now >= self.not_after
    }
}

/// The pure renewal rule: renew outside the validity window and once less
/// than [`RENEW_BELOW_REMAINING_PERCENT`] of it is left.
fn needs_renewal(not_before: i64, not_after: i64, now: i64) -> bool {
    if now < not_before || now >= not_after {
        return true;
    }
    let lifetime = not_after - not_before;
    let remaining = not_after - now;
    remaining.saturating_mul(100) < lifetime.saturating_mul(RENEW_BELOW_REMAINING_PERCENT)
}

/// Unix seconds now; before 1970 counts as 0 (it only makes certificates
/// look not yet valid, which renews them).
pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Generates the agent's key pair (ECDSA P-256, what the coordinator's own
/// CA uses) and a certificate signing request for it.
///
/// # Errors
/// Fails only if the crypto library cannot generate a key.
pub(super) fn key_and_csr(agent_name: &str) -> Result<(rcgen::KeyPair, String), LinkError> {
    let tls =
        |e: rcgen::Error| LinkError::Tls(format!("cannot create the agent's key and request: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls)?;
    let mut params = rcgen::CertificateParams::default();
    // The coordinator chooses the agent id and ignores this name; it only
    // makes the request readable to a human.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, agent_name);
    let csr = params.serialize_request(&key).map_err(tls)?;
    let csr_pem = csr.pem().map_err(tls)?;
    Ok((key, csr_pem))
}

/// Where one agent's credentials live: files in its state directory, or
/// this process's memory.
#[derive(Clone, Debug)]
pub(super) enum Store {
    Dir(PathBuf),
    Memory(String),
}

impl Store {
    pub fn new(state_dir: Option<&Path>, memory_key: String) -> Self {
        match state_dir {
            Some(dir) => Self::Dir(dir.to_path_buf()),
            None => Self::Memory(memory_key),
        }
    }

    /// The stored credentials, if there are any usable ones. Files that do
    /// not parse or do not belong together are treated as absent (the agent
    /// enrolls again and overwrites them).
    ///
    /// # Errors
    /// Fails when a file exists but cannot be read.
    pub fn load(&self) -> Result<Option<Credentials>, LinkError> {
        match self {
            Self::Memory(key) => Ok(memory().get(key).cloned()),
            Self::Dir(dir) => {
                let cert_path = dir.join(CERT_FILE);
                let key_path = dir.join(KEY_FILE);
                let (Some(cert_pem), Some(key_pem)) =
                    (read_optional(&cert_path)?, read_optional(&key_path)?)
                else {
                    return Ok(None);
                };
                let key = match rcgen::KeyPair::from_pem(&key_pem) {
                    Ok(key) => key,
                    Err(e) => {
                        tracing::warn!(path = %key_path.display(), error = %e, "stored agent key does not parse; enrolling again");
                        return Ok(None);
                    }
                };
                match Credentials::new(&cert_pem, &key) {
                    Ok(creds) => Ok(Some(creds)),
                    Err(e) => {
                        tracing::warn!(path = %cert_path.display(), error = %e, "stored agent certificate is unusable; enrolling again");
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Keeps credentials for the next connection.
    ///
    /// # Errors
    /// Fails when the state directory or its files cannot be written.
    pub fn save(&self, creds: &Credentials) -> Result<(), LinkError> {
        match self {
            Self::Memory(key) => {
                memory().insert(key.clone(), creds.clone());
                Ok(())
            }
            Self::Dir(dir) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(STATE_DIR_MODE)
                    .create(dir)
                    .map_err(|e| storage(dir, e))?;
                // Key first: a crash between the two writes leaves a key
                // without a matching certificate, which load() discards.
                write_atomically(&dir.join(KEY_FILE), creds.key_pem.as_bytes(), KEY_FILE_MODE)?;
                write_atomically(
                    &dir.join(CERT_FILE),
                    creds.cert_pem.as_bytes(),
                    KEY_FILE_MODE,
                )
            }
        }
    }

    /// Discards the stored credentials so the next connection enrolls again.
    ///
    /// # Errors
    /// Fails when a file exists but cannot be removed.
    pub fn forget(&self) -> Result<(), LinkError> {
        match self {
            Self::Memory(key) => {
                memory().remove(key);
                Ok(())
            }
            Self::Dir(dir) => {
                for name in [CERT_FILE, KEY_FILE] {
                    let path = dir.join(name);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(storage(&path, e)),
                    }
                }
                Ok(())
            }
        }
    }
}

fn memory() -> std::sync::MutexGuard<'static, BTreeMap<String, Credentials>> {
    // A panic while holding the lock cannot leave the map half-updated (each
    // operation is a single insert, get or remove), so a poisoned lock is safe
    // to keep using.
    MEMORY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_optional(path: &Path) -> Result<Option<String>, LinkError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(storage(path, e)),
    }
}

/// Writes `contents` to a fresh file beside `path` with `mode`, then renames
/// it into place, so a reader never sees half a file and a key never exists
/// with wider permissions, even for a moment.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), LinkError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(storage(&tmp, e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| storage(&tmp, e))?;
    // The umask can only narrow the mode; set it exactly anyway.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all())
        .map_err(|e| storage(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| storage(path, e))
}

fn storage(path: &Path, source: std::io::Error) -> LinkError {
    LinkError::Storage {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn renewal_rule() {
        // (not_before, not_after, now, renew?)
        let cases = [
            (1_000, 2_000, 999, true),
            (1_000, 2_000, 1_000, false),
            (1_000, 2_000, 1_899, false),
            (1_000, 2_000, 1_900, false),
            (1_000, 2_000, 1_901, true),
            (1_000, 2_000, 2_000, true),
            (1_000, 2_000, 5_000, true),
            (1_000, 1_000, 1_000, true),
        ];
        for (not_before, not_after, now, renew) in cases {
            assert_eq!(
                needs_renewal(not_before, not_after, now),
                renew,
                "{not_before}..{not_after} at {now}"
            );
        }
    }

    fn issued_for(key: &rcgen::KeyPair, agent_id: &str) -> String {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, agent_id);
        params.self_signed(key).unwrap().pem()
    }

    #[test]
    fn credentials_refuse_a_certificate_for_another_key() {
        let (key, _) = key_and_csr("box").unwrap();
        let (other, _) = key_and_csr("box").unwrap();
        let creds = Credentials::new(&issued_for(&key, "box-abc123"), &key).unwrap();
        assert_eq!(creds.agent_id, "box-abc123");
        let err = Credentials::new(&issued_for(&other, "box-abc123"), &key).unwrap_err();
        assert!(err.contains("not for this agent's key"), "{err}");
    }

    #[test]
    fn dir_store_round_trips_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::new(Some(&state), String::new());
        assert!(store.load().unwrap().is_none());
        let (key, _) = key_and_csr("box").unwrap();
        let creds = Credentials::new(&issued_for(&key, "box-abc123"), &key).unwrap();
        store.save(&creds).unwrap();
        for name in [KEY_FILE, CERT_FILE] {
            let mode = std::fs::metadata(state.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, KEY_FILE_MODE, "{name}");
        }
        let dir_mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, STATE_DIR_MODE);
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.agent_id, "box-abc123");
        assert_eq!(loaded.cert_der, creds.cert_der);
        store.forget().unwrap();
        assert!(store.load().unwrap().is_none());
    }

    #[test]
    fn mismatched_files_are_treated_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(Some(dir.path()), String::new());
        let (key, _) = key_and_csr("box").unwrap();
        let (other, _) = key_and_csr("box").unwrap();
        std::fs::write(dir.path().join(CERT_FILE), issued_for(&other, "box-1")).unwrap();
        std::fs::write(dir.path().join(KEY_FILE), key.serialize_pem()).unwrap();
        assert!(store.load().unwrap().is_none());
    }

    #[test]
    fn memory_store_is_keyed() {
        let a = Store::new(None, "identity-test-a".into());
        let b = Store::new(None, "identity-test-b".into());
        let (key, _) = key_and_csr("box").unwrap();
        a.save(&Credentials::new(&issued_for(&key, "box-a"), &key).unwrap())
            .unwrap();
        assert_eq!(a.load().unwrap().unwrap().agent_id, "box-a");
        assert!(b.load().unwrap().is_none());
        a.forget().unwrap();
        assert!(a.load().unwrap().is_none());
    }
}
