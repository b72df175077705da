//! The agent's end of the agent link: a QUIC connection to the coordinator
//! with mutual TLS, and the enrollment that gets the agent its client
//! certificate in the first place.
//!
//! [`connect`] uses a stored client certificate while it has more than a
//! tenth of its life left (an agent enrolled by its instance identity uses
//! it to the end: it cannot enroll again). Otherwise it generates a key pair, connects
//! without a certificate, trades the join token and a certificate signing
//! request for a short-lived certificate from the coordinator's CA, stores
//! it, and connects again with it. It returns only once the coordinator has
//! confirmed the handshake, that is, accepted the certificate; a certificate
//! the coordinator rejects is discarded and the agent enrolls again. The
//! coordinator is trusted only through the CA the operator configured
//! ([`CaTrust`]), never the system's roots.
//!
//! A connected agent renews its certificate over the live link ([`Renewal`]:
//! a new key, a `Renew` request, the `Renewed` answer stored for the next
//! connection) once a third of its life is left.
//!
//! Not responsible for what travels on the connection (the control and
//! output streams belong to the caller) nor for retrying: a [`LinkError`]
//! says whether a retry can help, and the caller waits with
//! [`servitor_runtime::backoff::Backoff`].

mod der;
mod identity;
mod tls;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use servitor_proto::agent::{
    enroll_response, renewed, EnrollRequest, EnrollResponse, Renew, Renewed,
};
use servitor_proto::frame::{read_frame, write_frame};

use identity::{Credentials, Store};
use servitor_proto::link::close_code;
use servitor_runtime::link::code;
use servitor_runtime::secret::Secret;
use tls::{CoordinatorVerifier, Trust};

pub use servitor_proto::link::{
    DEFAULT_SERVER_NAME, ENROLL_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL, PIN_PREFIX,
};
pub use servitor_runtime::link::transport_config;

/// Longest to wait, after the agent's side of the handshake is done, for the
/// coordinator to confirm it. That takes one round trip; past this the
/// network is failing.
pub const HANDSHAKE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How often to look for the coordinator's confirmation. quinn counts it
/// but offers nothing to wait on.
const HANDSHAKE_CONFIRM_POLL: Duration = Duration::from_millis(10);

/// TLS alerts (RFC 8446 §6.2) a server sends when it rejects a client
/// certificate: bad_certificate, unsupported_certificate,
/// certificate_revoked, certificate_expired, certificate_unknown,
/// unknown_ca, decrypt_error (rustls' answer to a certificate whose issuer
/// has the right name but the wrong key, as after a CA was re-created) and
/// certificate_required.
const CERTIFICATE_ALERTS: &[u8] = &[42, 43, 44, 45, 46, 48, 51, 116];

/// QUIC carries TLS alerts as transport error codes 0x100 + alert
/// (RFC 9001 §4.8).
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// The TLS alert a coordinator sends for a revoked agent's certificate.
const ALERT_CERTIFICATE_REVOKED: u8 = 44;

/// Shortest and longest wait before asking again after a refused or
/// unanswered renewal.
const RENEW_RETRY_MIN: Duration = Duration::from_secs(1);
const RENEW_RETRY_MAX: Duration = Duration::from_secs(300);

/// How the agent recognizes its coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaTrust {
    /// The coordinator CA's certificate, PEM (its `ca.pem`). Only this CA is
    /// trusted.
    Pem(String),
    /// `sha256:` and the hex SHA-256 of the coordinator CA certificate's DER.
    /// The coordinator presents its CA certificate after its own, and the
    /// agent trusts the one with this hash.
    Sha256Pin(String),
}

/// Where the coordinator is, how to trust it, and who the agent is.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// The coordinator's QUIC address, `host:port`.
    pub coordinator: String,
    /// The name to verify in the coordinator's certificate; normally
    /// [`DEFAULT_SERVER_NAME`], which the coordinator's certificate always has.
    pub server_name: String,
    /// How to recognize the coordinator.
    pub trust: CaTrust,
    /// Proof, at enrollment, that the operator sent this agent.
    pub join_token: Secret,
    /// Proof, at enrollment, that this agent runs on an EC2 instance: its
    /// signed identity document. Sent instead of the join token when set.
    pub aws_identity: Option<servitor_proto::agent::AwsIdentity>,
    /// Proof, at enrollment, that this agent runs in the Fargate task the
    /// coordinator started for it: the credential minted for the task and
    /// the task's ARN. Sent instead of the join token when set.
    pub ecs_task: Option<servitor_proto::agent::EcsTaskIdentity>,
    /// The name the agent asks to be known by; the coordinator derives the
    /// agent id from it.
    pub agent_name: String,
    /// Where to keep the client certificate and key across restarts. `None`
    /// keeps them in memory for this process only.
    pub state_dir: Option<PathBuf>,
}

impl LinkSettings {
    /// Settings with the default server name and no state directory.
    pub fn new(
        coordinator: impl Into<String>,
        trust: CaTrust,
        join_token: Secret,
        agent_name: impl Into<String>,
    ) -> Self {
        Self {
            coordinator: coordinator.into(),
            server_name: DEFAULT_SERVER_NAME.to_owned(),
            trust,
            join_token,
            aws_identity: None,
            ecs_task: None,
            agent_name: agent_name.into(),
            state_dir: None,
        }
    }

    /// Where this agent's credentials are kept.
    fn store(&self) -> Store {
        let memory_key = format!(
            "{}\n{}\n{}",
            self.coordinator, self.server_name, self.agent_name
        );
        Store::new(self.state_dir.as_deref(), memory_key)
    }
}

/// An authenticated connection to the coordinator.
#[derive(Debug)]
pub struct Link {
    /// The QUIC connection; open the control stream on it.
    pub connection: quinn::Connection,
    /// The id the coordinator knows this agent by (the common name of the
    /// certificate it issued).
    pub agent_id: String,
    /// The certificate's renewal over this connection.
    pub renewal: Renewal,
}

/// Renewing the agent's certificate over a live link: when to ask, the
/// request, and keeping the answer for the next connection.
#[derive(Debug)]
pub struct Renewal {
    store: Store,
    agent_id: String,
    agent_name: String,
    not_before: i64,
    not_after: i64,
    /// The key of the request in flight.
    pending: Option<rcgen::KeyPair>,
}

impl Renewal {
    fn new(store: Store, agent_name: &str, creds: &Credentials) -> Self {
        let (not_before, not_after) = creds.validity();
        Self {
            store,
            agent_id: creds.agent_id.clone(),
            agent_name: agent_name.to_owned(),
            not_before,
            not_after,
            pending: None,
        }
    }

    /// How long until the certificate should be renewed: once no more than
    /// [`servitor_proto::link::RENEW_WHEN_REMAINING_PERCENT`] of its life is
    /// left (zero when that time has come).
    pub fn due_in(&self) -> Duration {
        let lifetime = (self.not_after - self.not_before).max(0);
        let keep = lifetime.saturating_mul(i64::from(
            servitor_proto::link::RENEW_WHEN_REMAINING_PERCENT,
        )) / 100;
        let due = self.not_after - keep;
        secs_until(due)
    }

    /// How long to wait before asking again after a refusal or no answer:
    /// a twentieth of the certificate's life, within a second and five
    /// minutes, so a short-lived certificate gets several tries.
    pub fn retry_in(&self) -> Duration {
        let lifetime = u64::try_from((self.not_after - self.not_before).max(0)).unwrap_or(0);
        Duration::from_secs(lifetime / 20).clamp(RENEW_RETRY_MIN, RENEW_RETRY_MAX)
    }

    /// When the current certificate runs out.
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_after).unwrap_or(0))
    }

    /// A request for a new certificate, for a new key.
    ///
    /// # Errors
    /// Only if no key can be generated.
    pub fn request(&mut self) -> Result<Renew, LinkError> {
        let (key, csr_pem) = identity::key_and_csr(&self.agent_name)?;
        self.pending = Some(key);
        Ok(Renew { csr_pem })
    }

    /// Takes the coordinator's answer: a new certificate is stored for the
    /// next connection and `Ok` says how long it lasts.
    ///
    /// # Errors
    /// [`NotRenewed::Refused`] with the coordinator's reason, or
    /// [`NotRenewed::Unusable`] with what is wrong with its answer (none,
    /// no request in flight, a certificate for another key or agent) or
    /// with keeping it (a state directory that cannot be written).
    pub fn accept(&mut self, answer: Renewed) -> Result<Duration, NotRenewed> {
        let pem = match answer.result {
            Some(renewed::Result::CertificatePem(pem)) => pem,
            Some(renewed::Result::Refused(reason)) => {
                self.pending = None;
                return Err(NotRenewed::Refused(reason));
            }
            None => {
                self.pending = None;
                return Err(NotRenewed::Unusable(
                    "the coordinator's answer has neither a certificate nor a reason".into(),
                ));
            }
        };
        self.keep(&pem).map_err(NotRenewed::Unusable)
    }

    /// Stores a renewed certificate for the key of the request in flight.
    fn keep(&mut self, pem: &str) -> Result<Duration, String> {
        let key = self
            .pending
            .take()
            .ok_or("the coordinator sent a certificate nobody asked for")?;
        let creds = Credentials::new(pem, &key)
            .map_err(|e| format!("the coordinator sent an unusable certificate: {e}"))?;
        if creds.agent_id != self.agent_id {
            return Err(format!(
                "the coordinator renewed the certificate for agent {} instead of {}",
                creds.agent_id, self.agent_id
            ));
        }
        self.store.save(&creds).map_err(|e| e.to_string())?;
        (self.not_before, self.not_after) = creds.validity();
        Ok(secs_until(self.not_after))
    }
}

/// Why a renewal did not give the agent a new certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotRenewed {
    /// The coordinator refused, for this reason.
    Refused(String),
    /// The answer could not be used or kept.
    Unusable(String),
}

/// The time from now to `at` (Unix seconds); zero once it has passed.
fn secs_until(at: i64) -> Duration {
    Duration::from_secs(u64::try_from(at - identity::unix_now()).unwrap_or(0))
}

/// Why the agent could not get a link to its coordinator.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The settings cannot work; the message names the fix.
    #[error("agent link settings are invalid: {0}")]
    Settings(String),
    /// The coordinator's name did not resolve.
    #[error("cannot resolve coordinator address {address}: {detail}; check the coordinator address and DNS")]
    Resolve { address: String, detail: String },
    /// No local UDP socket for the link.
    #[error("cannot open a UDP socket for the agent link: {0}")]
    Endpoint(#[source] std::io::Error),
    /// The coordinator refused to enroll the agent. Retrying with the same
    /// settings cannot help.
    #[error("coordinator refused enrollment: {0}")]
    Refused(String),
    /// The coordinator's certificate does not match the configured CA or pin.
    #[error("coordinator's certificate is not trusted ({0}); check ca_file / ca_sha256 against the coordinator's CA")]
    Untrusted(String),
    /// The coordinator revoked this agent: its certificate is refused, and
    /// has been discarded.
    #[error("the coordinator revoked this agent's certificate{0}; the agent stops (started again, an agent with a join token enrolls anew under a new id)")]
    Revoked(String),
    /// The coordinator rejected the agent's client certificate during the
    /// handshake. The stored certificate has been discarded, so the next
    /// attempt enrolls again.
    #[error("coordinator rejected the agent's certificate ({0}); the agent enrolls again")]
    CertificateRejected(String),
    /// The coordinator did not confirm the handshake in time.
    #[error("coordinator did not confirm the TLS handshake within {HANDSHAKE_CONFIRM_TIMEOUT:?}")]
    Unconfirmed,
    /// Local TLS set-up failed.
    #[error("{0}")]
    Tls(String),
    /// The connection could not be started.
    #[error("cannot start a connection to the coordinator: {0}")]
    Connect(#[source] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection to the coordinator failed: {0}")]
    Connection(#[source] quinn::ConnectionError),
    /// The enrollment exchange went wrong on the wire.
    #[error("enrollment exchange failed: {0}")]
    Protocol(String),
    /// The enrollment exchange took longer than [`ENROLL_TIMEOUT`].
    #[error("coordinator did not answer the enrollment request within {ENROLL_TIMEOUT:?}")]
    Timeout,
    /// The credentials could not be stored or read.
    #[error("cannot use agent state file {path}: {source}; make the state directory writable by the agent's user")]
    Storage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LinkError {
    /// Whether trying again later (with backoff) can succeed. Errors that
    /// need the operator to change something are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Settings(_)
            | Self::Refused(_)
            | Self::Revoked(_)
            | Self::Untrusted(_)
            | Self::Tls(_)
            | Self::Storage { .. } => false,
            Self::Resolve { .. }
            | Self::Endpoint(_)
            | Self::CertificateRejected(_)
            | Self::Unconfirmed
            | Self::Connect(_)
            | Self::Connection(_)
            | Self::Protocol(_)
            | Self::Timeout => true,
        }
    }
}

/// Whether a connection ended because the coordinator rejected the agent's
/// client certificate (a TLS alert about the certificate). [`connect`]
/// handles this itself; it is public for callers that want to tell it apart
/// in logs.
pub fn is_certificate_rejection(error: &quinn::ConnectionError) -> bool {
    tls_alert(error).is_some_and(|alert| CERTIFICATE_ALERTS.contains(&alert))
}

/// The TLS alert a connection was closed with, if any.
fn tls_alert(error: &quinn::ConnectionError) -> Option<u8> {
    let quinn::ConnectionError::ConnectionClosed(close) = error else {
        return None;
    };
    u64::from(close.error_code)
        .checked_sub(CRYPTO_ERROR_BASE)
        .and_then(|alert| u8::try_from(alert).ok())
}

/// What a link closed by the coordinator about the agent's certificate
/// means: `Some` for a revocation or an expiry, with the coordinator's words.
pub fn certificate_close(error: &quinn::ConnectionError) -> Option<CertificateClose> {
    let quinn::ConnectionError::ApplicationClosed(close) = error else {
        return None;
    };
    let reason = String::from_utf8_lossy(&close.reason).into_owned();
    match u32::try_from(u64::from(close.error_code)).ok()? {
        close_code::REVOKED => Some(CertificateClose::Revoked(reason)),
        close_code::CERTIFICATE_EXPIRED => Some(CertificateClose::Expired(reason)),
        _ => None,
    }
}

/// The coordinator's words when it ended a link because the agent names a
/// runner it does not serve: the agent's configuration must change.
pub fn runner_refusal(error: &quinn::ConnectionError) -> Option<String> {
    let quinn::ConnectionError::ApplicationClosed(close) = error else {
        return None;
    };
    (u64::from(close.error_code) == u64::from(close_code::UNKNOWN_RUNNER))
        .then(|| String::from_utf8_lossy(&close.reason).into_owned())
}

/// Why the coordinator ended a link because of the agent's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateClose {
    /// The operator revoked the agent.
    Revoked(String),
    /// The certificate ran out without being renewed.
    Expired(String),
}

/// Discards the agent's stored certificate and key, so the next [`connect`]
/// enrolls again (for example when the operator wants the agent to get a
/// new id).
///
/// # Errors
/// [`LinkError::Storage`] when a file in the state directory cannot be
/// removed.
pub fn forget_credentials(settings: &LinkSettings) -> Result<(), LinkError> {
    settings.store().forget()
}

/// Connects to the coordinator with the agent's client certificate,
/// enrolling first when there is no stored certificate with enough life
/// left, or when the coordinator rejects the stored one (its CA was
/// re-created, or its clock disagrees).
///
/// # Errors
/// - [`LinkError::Settings`] for settings that cannot work.
/// - [`LinkError::Refused`] when the coordinator refuses enrollment (wrong
///   join token, incompatible protocol version).
/// - [`LinkError::Untrusted`] when the coordinator's certificate does not
///   match the configured CA or pin.
/// - [`LinkError::Storage`] when the state directory is not writable.
/// - Transport errors ([`LinkError::is_retryable`]) otherwise.
pub async fn connect(settings: &LinkSettings) -> Result<Link, LinkError> {
    let dialer = Dialer::new(settings).await?;
    let store = settings.store();
    let now = identity::unix_now();
    // An instance enrolls by its identity once, soon after launch: it keeps
    // its certificate to the end instead of enrolling early again.
    let by_identity = settings.aws_identity.is_some() || settings.ecs_task.is_some();
    let stored = store.load()?;
    if by_identity {
        if let Some(creds) = stored.as_ref().filter(|creds| creds.expired(now)) {
            let (_, not_after) = creds.validity();
            let at =
                SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
            return Err(LinkError::Refused(format!(
                "agent {}'s certificate expired at {} without being renewed over the link (was the instance out of the group, or the coordinator out of reach?); an instance enrolls by its identity only once: replace the instance",
                creds.agent_id,
                humantime::format_rfc3339_seconds(at)
            )));
        }
    }
    let stored = stored.filter(|creds| {
        if by_identity {
            !creds.expired(now)
        } else {
            !creds.needs_renewal(now)
        }
    });
    if let Some(creds) = stored {
        match dialer.dial(Some(&creds)).await {
            Ok(connection) => return Ok(link(connection, store, settings, creds)),
            Err(LinkError::Revoked(detail)) => {
                store.forget()?;
                return Err(LinkError::Revoked(format!(
                    " ({}: {detail})",
                    creds.agent_id
                )));
            }
            Err(LinkError::CertificateRejected(reason)) if by_identity => {
                return Err(LinkError::Refused(format!(
                    "the coordinator rejected agent {}'s certificate ({reason}); an instance enrolls by its identity only once: check the coordinator's CA and clock, or replace the instance",
                    creds.agent_id
                )));
            }
            Err(LinkError::CertificateRejected(reason)) => {
                tracing::info!(
                    agent = %creds.agent_id,
                    %reason,
                    "coordinator no longer accepts the stored certificate; enrolling again"
                );
                store.forget()?;
            }
            Err(e) => return Err(e),
        }
    }
    let creds = dialer.enroll(settings).await?;
    store.save(&creds)?;
    match dialer.dial(Some(&creds)).await {
        Ok(connection) => Ok(link(connection, store, settings, creds)),
        Err(e) => {
            if matches!(e, LinkError::CertificateRejected(_)) {
                store.forget()?;
            }
            Err(e)
        }
    }
}

fn link(
    connection: quinn::Connection,
    store: Store,
    settings: &LinkSettings,
    creds: Credentials,
) -> Link {
    Link {
        connection,
        renewal: Renewal::new(store, &settings.agent_name, &creds),
        agent_id: creds.agent_id,
    }
}

/// What every connection attempt of one [`connect`] call shares.
struct Dialer {
    endpoint: quinn::Endpoint,
    address: SocketAddr,
    server_name: String,
    trust: Trust,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Dialer {
    /// Validates the settings, resolves the coordinator and opens a socket.
    async fn new(settings: &LinkSettings) -> Result<Self, LinkError> {
        if settings.agent_name.trim().is_empty() {
            return Err(LinkError::Settings(
                "agent name is empty; set a name for the agent".into(),
            ));
        }
        rustls::pki_types::ServerName::try_from(settings.server_name.as_str()).map_err(|_| {
            LinkError::Settings(format!(
                "server name {:?} is not a DNS name or IP address; leave it at {DEFAULT_SERVER_NAME}",
                settings.server_name
            ))
        })?;
        let trust = Trust::new(&settings.trust)?;
        let address = resolve(&settings.coordinator).await?;
        let local: SocketAddr = if address.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(local).map_err(LinkError::Endpoint)?;
        Ok(Self {
            endpoint,
            address,
            server_name: settings.server_name.clone(),
            trust,
            provider: tls::provider(),
        })
    }

    /// One QUIC connection, with or without the agent's certificate. With
    /// it, returns once the coordinator has accepted the certificate.
    async fn dial(&self, identity: Option<&Credentials>) -> Result<quinn::Connection, LinkError> {
        let verifier = Arc::new(CoordinatorVerifier::new(
            self.trust.clone(),
            self.provider.clone(),
        ));
        let config = tls::client_config(verifier.clone(), self.provider.clone(), identity)?;
        let connecting = self
            .endpoint
            .connect_with(config, self.address, &self.server_name)
            .map_err(LinkError::Connect)?;
        let failed = |e: quinn::ConnectionError| {
            if let Some(detail) = verifier.failure() {
                LinkError::Untrusted(detail)
            } else if identity.is_some() && tls_alert(&e) == Some(ALERT_CERTIFICATE_REVOKED) {
                LinkError::Revoked(e.to_string())
            } else if identity.is_some() && is_certificate_rejection(&e) {
                LinkError::CertificateRejected(e.to_string())
            } else {
                LinkError::Connection(e)
            }
        };
        let connection = connecting.await.map_err(failed)?;
        if identity.is_some() {
            // QUIC lets the client finish its side of the handshake before
            // the server has judged the client's certificate.
            match confirmation(&connection).await {
                Ok(true) => {}
                Ok(false) => {
                    connection.close(code(close_code::TIMEOUT), b"handshake not confirmed");
                    return Err(LinkError::Unconfirmed);
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(connection)
    }

    /// Trades the join token and a fresh key's signing request for a client
    /// certificate.
    async fn enroll(&self, settings: &LinkSettings) -> Result<Credentials, LinkError> {
        let (key, csr_pem) = identity::key_and_csr(&settings.agent_name)?;
        let request = EnrollRequest {
            join_token: if settings.aws_identity.is_some() || settings.ecs_task.is_some() {
                String::new()
            } else {
                settings.join_token.expose().to_owned()
            },
            aws_identity: settings.aws_identity.clone(),
            ecs_task: settings.ecs_task.clone(),
            csr_pem,
            agent_name: settings.agent_name.clone(),
            protocol_version: servitor_proto::link::PROTOCOL_VERSION,
        };
        let connection = self.dial(None).await?;
        let exchanged = tokio::time::timeout(ENROLL_TIMEOUT, exchange(&connection, &request)).await;
        connection.close(code(close_code::DONE), b"enrollment done");
        let response = exchanged.map_err(|_| LinkError::Timeout)??;
        match response.result {
            Some(enroll_response::Result::CertificatePem(pem)) => {
                let creds = Credentials::new(&pem, &key).map_err(|e| {
                    LinkError::Protocol(format!("coordinator issued an unusable certificate: {e}"))
                })?;
                tracing::info!(
                    agent = %creds.agent_id,
                    valid_for_secs = response.valid_for_secs,
                    "enrolled with the coordinator"
                );
                Ok(creds)
            }
            Some(enroll_response::Result::Refused(reason)) => Err(LinkError::Refused(reason)),
            None => Err(LinkError::Protocol(
                "coordinator sent an enrollment response with neither certificate nor reason"
                    .into(),
            )),
        }
    }
}

/// Waits for the server's HANDSHAKE_DONE frame, which it sends only once it
/// has completed the handshake, client certificate check included (RFC
/// 9001 §4.1.2). `Ok(false)` after [`HANDSHAKE_CONFIRM_TIMEOUT`]; the
/// connection's error if it closes first.
async fn confirmation(connection: &quinn::Connection) -> Result<bool, quinn::ConnectionError> {
    let deadline = tokio::time::sleep(HANDSHAKE_CONFIRM_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        if connection.stats().frame_rx.handshake_done > 0 {
            return Ok(true);
        }
        tokio::select! {
            error = connection.closed() => return Err(error),
            () = tokio::time::sleep(HANDSHAKE_CONFIRM_POLL) => {}
            () = &mut deadline => return Ok(false),
        }
    }
}

/// Sends the enrollment request on a new stream and reads the answer.
async fn exchange(
    connection: &quinn::Connection,
    request: &EnrollRequest,
) -> Result<EnrollResponse, LinkError> {
    let lost = |detail: String| match connection.close_reason() {
        Some(reason) => LinkError::Connection(reason),
        None => LinkError::Protocol(detail),
    };
    let (mut send, mut recv) = connection.open_bi().await.map_err(LinkError::Connection)?;
    write_frame(&mut send, request)
        .await
        .map_err(|e| lost(e.to_string()))?;
    // The coordinator expects nothing more on this stream; if finishing fails
    // the stream is already gone and reading the answer reports why.
    let _ = send.finish();
    match read_frame::<_, EnrollResponse>(&mut recv).await {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(lost(
            "coordinator ended the stream without answering".into(),
        )),
        Err(e) => Err(lost(e.to_string())),
    }
}

/// Resolves `host:port` to the first address it names.
async fn resolve(coordinator: &str) -> Result<SocketAddr, LinkError> {
    let has_port = coordinator
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(LinkError::Settings(format!(
            "coordinator address {coordinator:?} is not host:port; write it like coordinator.example.com:7443"
        )));
    }
    let resolve_error = |detail: String| LinkError::Resolve {
        address: coordinator.to_owned(),
        detail,
    };
    tokio::net::lookup_host(coordinator)
        .await
        .map_err(|e| resolve_error(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("it resolved to no address".into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn certificate_alerts_are_told_apart_from_other_closes() {
        let close = |code: u64| {
            quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::crypto(
                    u8::try_from(code - CRYPTO_ERROR_BASE).unwrap(),
                ),
                frame_type: None,
                reason: bytes::Bytes::new(),
            })
        };
        assert!(is_certificate_rejection(&close(CRYPTO_ERROR_BASE + 48)));
        assert!(is_certificate_rejection(&close(CRYPTO_ERROR_BASE + 42)));
        // no_application_protocol: a wrong ALPN, not a certificate problem.
        assert!(!is_certificate_rejection(&close(CRYPTO_ERROR_BASE + 120)));
        assert!(!is_certificate_rejection(&quinn::ConnectionError::TimedOut));
    }

    #[tokio::test]
    async fn bad_settings_fail_before_dialling() {
        let settings = |coordinator: &str, name: &str, server: &str| {
            let mut s = LinkSettings::new(
                coordinator,
                CaTrust::Sha256Pin(format!("sha256:{}", "00".repeat(32))),
                Secret::new("token"),
                name,
            );
            s.server_name = server.to_owned();
            s
        };
        let cases = [
            (
                settings("coordinator.example", "box", DEFAULT_SERVER_NAME),
                "host:port",
            ),
            (
                settings("127.0.0.1:7443", " ", DEFAULT_SERVER_NAME),
                "agent name is empty",
            ),
            (
                settings("127.0.0.1:7443", "box", "not a name!"),
                "server name",
            ),
        ];
        for (s, want) in cases {
            let err = connect(&s).await.unwrap_err();
            assert!(matches!(err, LinkError::Settings(_)), "{err}");
            assert!(err.to_string().contains(want), "{err}");
            assert!(!err.is_retryable());
        }
    }

    fn renewal(not_before: i64, not_after: i64) -> Renewal {
        Renewal {
            store: Store::new(None, "renewal test".into()),
            agent_id: "box-0a1b2c".into(),
            agent_name: "box".into(),
            not_before,
            not_after,
            pending: None,
        }
    }

    #[test]
    fn renewal_is_due_with_a_third_of_the_life_left_and_retried_sooner() {
        let now = identity::unix_now();
        // Five minutes, issued now: due once 102 s (34 %) are left.
        let fresh = renewal(now, now + 300);
        assert!(
            (197..=198).contains(&fresh.due_in().as_secs()),
            "{:?}",
            fresh.due_in()
        );
        assert_eq!(fresh.retry_in(), Duration::from_secs(15));
        // Past that point: due now.
        assert_eq!(renewal(now - 250, now + 50).due_in(), Duration::ZERO);
        assert_eq!(renewal(now - 400, now - 100).due_in(), Duration::ZERO);
        // A day's certificate is retried every five minutes at most, a
        // short one every second at least.
        assert_eq!(renewal(now, now + 86_400).retry_in(), RENEW_RETRY_MAX);
        assert_eq!(renewal(now, now + 10).retry_in(), RENEW_RETRY_MIN);
    }

    #[test]
    fn a_refused_or_unasked_renewal_changes_nothing() {
        let now = identity::unix_now();
        let mut r = renewal(now, now + 300);
        r.request().unwrap();
        let refused = Renewed {
            result: Some(renewed::Result::Refused("instance left the group".into())),
            valid_for_secs: 0,
        };
        assert_eq!(
            r.accept(refused).unwrap_err(),
            NotRenewed::Refused("instance left the group".into())
        );
        assert_eq!(r.not_after, now + 300);
        let unasked = Renewed {
            result: Some(renewed::Result::CertificatePem("x".into())),
            valid_for_secs: 300,
        };
        let err = r.accept(unasked).unwrap_err();
        assert!(
            matches!(&err, NotRenewed::Unusable(what) if what.contains("nobody asked")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn an_identity_agent_with_an_expired_certificate_is_told_to_replace_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "i-0abc");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let creds = Credentials::new(&cert.pem(), &key).unwrap();
        Store::new(Some(dir.path()), String::new())
            .save(&creds)
            .unwrap();

        let mut settings = LinkSettings::new(
            "127.0.0.1:9",
            CaTrust::Sha256Pin(format!("sha256:{}", "00".repeat(32))),
            Secret::new(""),
            "i-0abc",
        );
        settings.state_dir = Some(dir.path().to_path_buf());
        settings.aws_identity = Some(servitor_proto::agent::AwsIdentity {
            document: "{}".into(),
            rsa2048: String::new(),
        });
        let err = connect(&settings).await.unwrap_err();
        assert!(matches!(err, LinkError::Refused(_)), "{err}");
        assert!(!err.is_retryable());
        let text = err.to_string();
        assert!(
            text.contains("i-0abc's certificate expired at 2020-01-02"),
            "{text}"
        );
        assert!(text.contains("replace the instance"), "{text}");
    }
}
