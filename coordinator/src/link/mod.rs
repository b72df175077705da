//! The coordinator's end of the agent link: a QUIC endpoint with mutual TLS
//! that hands authenticated agent connections to the caller and enrolls
//! agents that do not have a certificate yet.
//!
//! Every incoming connection gets its own task, bounded by a timeout, so a
//! slow or hostile peer never holds up anyone else. A connection whose
//! client certificate chains to the coordinator's CA becomes an
//! [`AgentConnection`] named by the certificate's common name. A connection
//! without a certificate may do one thing, enroll (see `enroll`), and is
//! then closed. A certificate from any other CA, an expired one, or one
//! naming a revoked agent (`revoked`) fails the TLS handshake, with a line
//! in the log naming the agent. A connected agent renews its certificate
//! over its link ([`LinkServer::renew`]).
//!
//! Not responsible for what agents say once connected (the caller runs the
//! control stream) nor for the certificates themselves (`pki`).

mod enroll;
pub mod iid;
mod revoked;
pub mod task;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use servitor_proto::link::close_code;
use servitor_runtime::link::code;
use servitor_runtime::secret::Secret;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::pki::Pki;
use enroll::Enroller;
pub use enroll::{
    AwsIidEnrollment, EnrolledInstances, Enrollment, GroupMembership, AWS_IID_OFF,
    JOIN_TOKEN_REJECTED,
};
pub use revoked::{Revocations, Revoked, REVOKED_FILE};

/// Longest a TLS handshake may take. Handshakes on a working network take a
/// few round trips; this only stops a silent peer from keeping a task alive.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// Longest an unauthenticated connection may stay open, enrollment included:
// the same limit the agent allows itself.
pub use servitor_proto::link::ENROLL_TIMEOUT;

/// Authenticated connections waiting for [`LinkServer::accept`]. Small: the
/// caller accepts continuously, and a full queue only delays handshakes
/// that already finished.
const ACCEPT_QUEUE: usize = 64;

/// Errors setting up the agent link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The certificates do not make a usable TLS configuration.
    #[error("cannot set up TLS for the agent link: {0}")]
    Tls(String),
    /// The client certificate validity is out of range.
    #[error("agents.cert_validity {0:?} must be more than zero and at most {max:?}", max = crate::pki::MAX_CLIENT_CERT_VALIDITY)]
    CertValidity(Duration),
    /// The UDP socket could not be bound.
    #[error("cannot listen for agents on {addr}: {source}; check that agents.listen is a local address and the port is free")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl LinkError {
    /// Whether binding again later can succeed (a port still held by a
    /// previous process can free up; a bad TLS set-up cannot fix itself).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Bind { .. })
    }
}

/// An agent that proved who it is with a certificate from the coordinator's
/// CA.
#[derive(Debug)]
pub struct AgentConnection {
    /// The common name of the agent's verified client certificate: the id
    /// the coordinator gave it at enrollment.
    pub agent_id: String,
    /// Where the connection comes from.
    pub remote: SocketAddr,
    /// When the certificate the agent connected with runs out: the link
    /// ends then unless the agent renewed it.
    pub cert_expires: SystemTime,
    /// The connection; the agent opens the control stream on it.
    pub connection: quinn::Connection,
}

/// A renewed agent certificate.
#[derive(Debug)]
pub struct Renewal {
    /// PEM, for the agent.
    pub certificate_pem: String,
    /// Its life.
    pub valid_for: Duration,
    /// When it runs out: the link may last until then.
    pub expires: SystemTime,
}

/// The agent link's QUIC endpoint.
pub struct LinkServer {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::Receiver<AgentConnection>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    enroller: Arc<Enroller>,
}

impl std::fmt::Debug for LinkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl LinkServer {
    /// Listens for agents on `addr` (UDP), presenting the server certificate
    /// from `pki` and accepting client certificates from its CA. Agents
    /// without a certificate may enroll with `join_token` and get one valid
    /// for `cert_validity`. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`LinkError::Bind`] when the socket cannot be bound,
    /// [`LinkError::Tls`] when the certificates do not make a TLS set-up,
    /// [`LinkError::CertValidity`] when `cert_validity` is zero or over
    /// [`crate::pki::MAX_CLIENT_CERT_VALIDITY`].
    pub fn bind(
        addr: SocketAddr,
        pki: &Pki,
        join_token: Secret,
        cert_validity: Duration,
    ) -> Result<Self, LinkError> {
        let enrollment = Enrollment {
            join_token,
            aws_iid: None,
            revocations: Arc::new(Revocations::in_memory()),
            tasks: None,
        };
        Self::bind_with(addr, pki, enrollment, cert_validity)
    }

    /// As [`Self::bind`], with every way of enrolling `enrollment` allows.
    ///
    /// # Errors
    /// As [`Self::bind`].
    pub fn bind_with(
        addr: SocketAddr,
        pki: &Pki,
        enrollment: Enrollment,
        cert_validity: Duration,
    ) -> Result<Self, LinkError> {
        // Checked here rather than at the first enrollment, where the
        // operator would only see it in agents' refusals.
        if cert_validity.is_zero() || cert_validity > crate::pki::MAX_CLIENT_CERT_VALIDITY {
            return Err(LinkError::CertValidity(cert_validity));
        }
        let server_config = server_config(pki, enrollment.revocations.clone())?;
        let bound = servitor_runtime::link::bind_socket(addr)
            .map_err(|source| LinkError::Bind { addr, source })?;
        if bound.short_of_buffer() {
            tracing::warn!(
                receive_buffer = bound.receive_buffer,
                wanted = servitor_runtime::link::SOCKET_BUFFER_BYTES,
                "the agent link's UDP receive buffer is small: with many agents streaming, the kernel will drop their packets and links will time out; raise it with `sysctl -w net.core.rmem_max=8388608 net.core.wmem_max=8388608` (and in /etc/sysctl.d/ to keep it)"
            );
        }
        let socket = bound.socket;
        let runtime = quinn::default_runtime().ok_or_else(|| LinkError::Bind {
            addr,
            source: std::io::Error::other("no async runtime for the agent link"),
        })?;
        let (reset_key, cid_key) = restart_keys(pki);
        let mut endpoint_config = quinn::EndpointConfig::new(reset_key);
        // Connection ids carry a keyed hash; with the same key after a
        // restart the new endpoint recognises agents' old ids and answers
        // them with a stateless reset instead of dropping them.
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
            .map_err(|source| LinkError::Bind { addr, source })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| LinkError::Bind { addr, source })?;
        let (queue, accepted) = mpsc::channel(ACCEPT_QUEUE);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let enroller = Arc::new(Enroller::new(pki.clone(), enrollment, cert_validity));
        tasks.spawn(
            accept_loop(
                endpoint.clone(),
                enroller.clone(),
                queue,
                shutdown.clone(),
                tasks.clone(),
            )
            .instrument(tracing::info_span!("agent_link", listen = %local_addr)),
        );
        tracing::info!(listen = %local_addr, "agent link listening");
        Ok(Self {
            endpoint,
            local_addr,
            accepted: tokio::sync::Mutex::new(accepted),
            shutdown,
            tasks,
            enroller,
        })
    }

    /// A new certificate for a connected agent's new key, for as long as
    /// the first; or why not (revoked, or its instance left the group).
    pub async fn renew(&self, agent_id: &str, csr_pem: &str) -> Result<Renewal, String> {
        let (certificate_pem, valid_for) = self.enroller.renew(agent_id, csr_pem).await?;
        let expires = rustls::pki_types::pem::PemObject::from_pem_slice(certificate_pem.as_bytes())
            .ok()
            .and_then(|der: CertificateDer<'_>| not_after(&der))
            .unwrap_or_else(|| SystemTime::now() + valid_for);
        Ok(Renewal {
            certificate_pem,
            valid_for,
            expires,
        })
    }

    /// The revoked agents.
    pub fn revocations(&self) -> &Arc<Revocations> {
        self.enroller.revocations()
    }

    /// The address the endpoint is bound to (with the real port when bound
    /// to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next authenticated agent connection. Unauthenticated connections
    /// are enrolled in the background and never returned. `None` once the
    /// server is closed.
    pub async fn accept(&self) -> Option<AgentConnection> {
        let mut accepted = self.accepted.lock().await;
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => None,
            conn = accepted.recv() => conn,
        }
    }

    /// Stops accepting, ends enrollments in progress and closes every
    /// connection on the endpoint, agents' included.
    pub fn close(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.endpoint.close(
            code(close_code::SHUTTING_DOWN),
            b"coordinator shutting down",
        );
    }

    /// Waits until [`close`](Self::close) has finished: background tasks
    /// ended and every connection's close acknowledged or timed out.
    pub async fn closed(&self) {
        self.tasks.wait().await;
        self.endpoint.wait_idle().await;
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        // Connections already handed out stay up; only new ones stop.
        self.shutdown.cancel();
        self.endpoint.set_server_config(None);
    }
}

/// TLS 1.3 with the link's ALPN, the server certificate and CA from `pki`,
/// and client certificates optional but, when present, verified against the
/// coordinator's CA and the revoked agents.
fn server_config(
    pki: &Pki,
    revocations: Arc<Revocations>,
) -> Result<quinn::ServerConfig, LinkError> {
    let tls = |e: &dyn std::fmt::Display| LinkError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client_verifier = client_verifier(pki, provider.clone(), revocations)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(pki.server_cert_chain(), pki.server_key())
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![servitor_proto::link::ALPN.to_vec()];
    // No 0-RTT (rustls' default): early data could be replayed, and an
    // enrollment must happen exactly once.
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(|e| tls(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(servitor_runtime::link::transport_config()));
    Ok(server)
}

/// Verifies agents' certificates against the coordinator's CA, then refuses
/// those naming a revoked agent.
fn client_verifier(
    pki: &Pki,
    provider: Arc<rustls::crypto::CryptoProvider>,
    revocations: Arc<Revocations>,
) -> Result<Arc<AgentCertVerifier>, LinkError> {
    let tls = |e: &dyn std::fmt::Display| LinkError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der().clone()).map_err(|e| tls(&e))?;
    let chain =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            // Agents without a certificate yet may connect, but only to enroll.
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls(&e))?;
    Ok(Arc::new(AgentCertVerifier { chain, revocations }))
}

/// The coordinator CA's verifier, plus revocation, plus a log line naming
/// the agent whose certificate was refused (the handshake failure alone
/// names only an address).
#[derive(Debug)]
struct AgentCertVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        use rustls::CertificateError;
        match self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(verified) => {
                let agent = common_name(end_entity).unwrap_or_default();
                match self.revocations.get(&agent) {
                    None => Ok(verified),
                    Some(revoked) => {
                        tracing::warn!(%agent, revocation = %revoked.describe(), "refused a revoked agent's certificate");
                        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
                    }
                }
            }
            Err(e) => {
                if let rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) = &e
                {
                    // Not verified yet, so "claims": a chain that does
                    // not verify fails with another error.
                    let agent = common_name(end_entity).unwrap_or_default();
                    tracing::warn!(%agent, error = %e, "refused an expired agent certificate; an agent renews over its link before expiry, so this one was offline or could not renew");
                }
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The certificate's subject common name, if it has one.
fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    name
}

/// When the certificate runs out.
fn not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    enroller: Arc<Enroller>,
    queue: mpsc::Sender<AgentConnection>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        tasks.spawn(
            handle_incoming(
                incoming,
                remote,
                enroller.clone(),
                queue.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("connection", %remote)),
        );
    }
}

/// Runs one connection's handshake, then hands it over or enrolls it.
async fn handle_incoming(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    enroller: Arc<Enroller>,
    queue: mpsc::Sender<AgentConnection>,
    shutdown: CancellationToken,
) {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "dropped an incoming connection");
            return;
        }
    };
    let handshake = tokio::select! {
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting) => handshake,
    };
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            log_handshake_failure(remote, &e);
            return;
        }
        Err(_) => {
            // Dropping the handshake closes the connection.
            tracing::info!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
            return;
        }
    };
    match peer_agent_id(&connection) {
        Peer::Anonymous => enroller.serve(connection, remote, &shutdown).await,
        Peer::Agent(agent_id, cert_expires) => {
            tracing::info!(%remote, agent = %agent_id, "agent connected");
            let agent = AgentConnection {
                agent_id,
                remote,
                cert_expires,
                connection,
            };
            tokio::select! {
                // Dropping the connection closes it.
                () = shutdown.cancelled() => {}
                sent = queue.send(agent) => if let Err(unsent) = sent {
                    unsent.0.connection.close(code(close_code::SHUTTING_DOWN), b"coordinator shutting down");
                },
            }
        }
        Peer::Unusable(reason) => {
            tracing::warn!(%remote, %reason, "refused a verified client certificate");
            connection.close(code(close_code::PROTOCOL_VIOLATION), reason.as_bytes());
        }
    }
}

/// A certificate from another CA, an expired one, or a client that does not
/// trust us all end here. The first two are worth an operator's attention,
/// so TLS failures are warnings; network trouble is not.
fn log_handshake_failure(remote: SocketAddr, error: &quinn::ConnectionError) {
    match error {
        quinn::ConnectionError::TransportError(e) => {
            tracing::warn!(%remote, error = %e, "refused a connection in the TLS handshake");
        }
        quinn::ConnectionError::ConnectionClosed(close) => {
            tracing::warn!(%remote, error = %close, "peer abandoned the TLS handshake (does it trust this coordinator's CA?)");
        }
        other => {
            tracing::debug!(%remote, error = %other, "connection ended during the TLS handshake");
        }
    }
}

/// Who is on the other end of a finished handshake.
enum Peer {
    /// No client certificate: may only enroll.
    Anonymous,
    /// A verified certificate naming this agent, and when it runs out.
    Agent(String, SystemTime),
    /// A verified certificate we cannot use (no common name).
    Unusable(String),
}

fn peer_agent_id(connection: &quinn::Connection) -> Peer {
    let Some(identity) = connection.peer_identity() else {
        return Peer::Anonymous;
    };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return Peer::Unusable("client identity is not a certificate chain".into());
    };
    let Some(leaf) = chain.first() else {
        return Peer::Anonymous;
    };
    match (common_name(leaf), not_after(leaf)) {
        (Some(cn), Some(expires)) if !cn.is_empty() => Peer::Agent(cn, expires),
        (_, None) => Peer::Unusable("client certificate has no usable expiry".into()),
        _ => Peer::Unusable("client certificate has no common name".into()),
    }
}

/// Keys that must stay the same across coordinator restarts: the one
/// stateless resets are signed with, and the one connection ids are hashed
/// with. Both derive from the server key. A restarted coordinator then
/// answers agents still talking to the old process with a reset they
/// accept, and they reconnect at once instead of waiting out the idle
/// timeout.
fn restart_keys(pki: &Pki) -> (Arc<dyn quinn::crypto::HmacKey>, u64) {
    use sha2::{Digest, Sha256};
    let derive = |label: &[u8]| {
        let mut hasher = Sha256::new();
        hasher.update(label);
        hasher.update(pki.server_key().secret_der());
        hasher.finalize()
    };
    let reset = derive(b"servitor agent link stateless reset key\0");
    let cid = derive(b"servitor agent link connection id key\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid[..8]);
    (
        Arc::new(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &reset,
        )),
        u64::from_le_bytes(cid_key),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::CertificateError;
    use servitor_runtime::link::SOCKET_BUFFER_BYTES;

    fn client_cert(pki: &Pki, agent_id: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let pem = pki
            .issue_client_cert(&csr, agent_id, Duration::from_secs(60))
            .unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn client_certificates_are_refused_when_expired_or_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let revocations = Arc::new(Revocations::in_memory());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = client_verifier(&pki, provider, revocations.clone()).unwrap();
        let one = client_cert(&pki, "box-1");
        let two = client_cert(&pki, "box-2");
        let now = UnixTime::now();
        assert!(verifier.verify_client_cert(&one, &[], now).is_ok());
        let expires = not_after(&one)
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            expires.abs_diff(now.as_secs() + 60) <= 1,
            "the link knows when the certificate runs out"
        );

        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 3600));
        let expired = verifier.verify_client_cert(&one, &[], later).unwrap_err();
        assert!(
            matches!(
                expired,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{expired:?}"
        );

        revocations.revoke("box-1", "key leaked").unwrap();
        let revoked = verifier.verify_client_cert(&one, &[], now).unwrap_err();
        assert_eq!(
            revoked,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        );
        assert!(
            verifier.verify_client_cert(&two, &[], now).is_ok(),
            "only the revoked agent is refused"
        );

        // A certificate from another CA naming the revoked agent is refused
        // for its CA, not for the revocation.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Pki::load_or_create(other_dir.path(), &[]).unwrap();
        let forged = verifier
            .verify_client_cert(&client_cert(&other, "box-1"), &[], now)
            .unwrap_err();
        assert_ne!(
            forged,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        );
    }

    /// The shipped sysctl settings let the kernel grant what the link asks for.
    #[test]
    fn the_shipped_sysctl_file_allows_the_link_buffer() {
        let conf = include_str!("../../systemd/60-servitor-coordinator.conf");
        for key in ["net.core.rmem_max", "net.core.wmem_max"] {
            let value: usize = conf
                .lines()
                .find_map(|line| line.strip_prefix(key)?.trim().strip_prefix('='))
                .unwrap_or_else(|| panic!("{key} is not set"))
                .trim()
                .parse()
                .unwrap();
            assert!(value >= SOCKET_BUFFER_BYTES, "{key} = {value}");
        }
    }
}
