//! Enrollment: how an agent without a certificate gets one. On a connection
//! without a client certificate the agent opens one bidirectional stream and
//! sends an `EnrollRequest` (join token, certificate signing request, name,
//! protocol version); the coordinator answers with one `EnrollResponse`
//! (a certificate or the reason for refusing) and closes the connection.
//! Anything else on such a connection closes it.
//!
//! A connected agent renews its certificate with the same checks, minus
//! the credential: it must not be revoked, and an agent that enrolled by
//! its instance identity must still run in the group.
//!
//! Not responsible for authenticating agents that have a certificate (TLS
//! does that) nor for signing (`pki`).

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message as _;
use quinn::VarInt;
use servitor_proto::agent::{enroll_response, EnrollRequest, EnrollResponse};
use servitor_proto::frame::write_frame;
use servitor_proto::link::close_code;
use servitor_proto::link::PROTOCOL_VERSION;
use servitor_runtime::link::code;
use servitor_runtime::secret::Secret;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::iid::{IidVerifier, InstanceIdentity};
use super::revoked::Revocations;
use super::ENROLL_TIMEOUT;
use crate::pki::Pki;

/// What an agent with the wrong join token is told. It names the fix,
/// because the operator reads it in the agent's log.
pub const JOIN_TOKEN_REJECTED: &str = "join token rejected: the agent's join token does not match the coordinator's join_token_file; copy the current token to the agent";

/// Why an unauthenticated connection that did something else was closed.
/// The answer to an instance identity when aws-iid enrollment is off.
pub const AWS_IID_OFF: &str = "this coordinator does not enroll agents by instance identity; enable agents.aws_iid in its configuration, or give the agent a join token";

const ONLY_ENROLLMENT: &str = "a connection without a client certificate may only enroll: one bidirectional stream carrying one EnrollRequest";

/// Largest enrollment request read. A P-256 signing request is well under
/// 1 KiB; this bound keeps an unauthenticated peer from making us buffer
/// more than that by much.
const MAX_ENROLL_REQUEST_BYTES: usize = 64 * 1024;

/// Bytes read from the stream at a time.
const READ_CHUNK_BYTES: usize = 4096;

/// A varint length prefix is at most ten bytes.
const MAX_LENGTH_PREFIX_BYTES: usize = 10;

/// After answering, how long to wait for the agent to hang up before we do:
/// closing at once could discard the answer before it arrives.
const LINGER: Duration = Duration::from_secs(5);

/// Longest agent name kept in an agent id; with the suffix it stays well
/// inside a certificate common name's 64 characters.
const MAX_AGENT_NAME_LEN: usize = 40;

/// Random bytes after the name in an agent id (six hex digits): enough that
/// two agents with the same name do not collide, short enough to read.
const AGENT_ID_SUFFIX_BYTES: usize = 3;

/// Agent id stem when the requested name has nothing usable in it.
const FALLBACK_AGENT_NAME: &str = "agent";

/// Handles unauthenticated connections.
pub(super) struct Enroller {
    pki: Pki,
    /// SHA-256 of the join token; `None` (empty token) refuses everyone.
    join_token_digest: Option<[u8; 32]>,
    /// Enrollment by EC2 instance identity, when enabled.
    aws_iid: Option<AwsIidEnrollment>,
    /// Enrollment of Fargate tasks' agents by their one-task credential.
    tasks: Option<std::sync::Arc<super::task::TaskCredentials>>,
    revocations: std::sync::Arc<Revocations>,
    cert_validity: Duration,
}

/// Whether an instance is a running member of the group the coordinator
/// sizes.
pub trait GroupMembership: Send + Sync {
    /// `Ok(true)` for a pending or in-service member of the group.
    ///
    /// # Errors
    /// When the answer cannot be had (the cloud API failed): the agent is
    /// refused for now and tries again.
    fn is_member<'a>(
        &'a self,
        instance_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>;
}

/// Instances that have enrolled, so that a document is used once. Kept in
/// a file in the state directory, so a restart does not forget them.
#[derive(Debug)]
pub struct EnrolledInstances {
    path: Option<std::path::PathBuf>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl EnrolledInstances {
    /// The instances recorded in `path` (none when it does not exist yet);
    /// `None` keeps them in memory only.
    ///
    /// # Errors
    /// When the file exists but cannot be read.
    pub fn open(path: Option<std::path::PathBuf>) -> std::io::Result<Self> {
        let seen = match &path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => text.lines().map(str::to_owned).collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
                Err(e) => return Err(e),
            },
            None => Default::default(),
        };
        Ok(Self {
            path,
            seen: std::sync::Mutex::new(seen),
        })
    }

    /// Whether `instance` has enrolled.
    pub fn contains(&self, instance: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(instance)
    }

    /// Records `instance`; `Ok(false)` when it was recorded before.
    fn claim(&self, instance: &str) -> std::io::Result<bool> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(instance) {
            return Ok(false);
        }
        if let Some(path) = &self.path {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(file, "{instance}")?;
            file.sync_all()?;
        }
        seen.insert(instance.to_owned());
        Ok(true)
    }
}

/// What enrollment by instance identity needs.
pub struct AwsIidEnrollment {
    pub verifier: IidVerifier,
    pub membership: std::sync::Arc<dyn GroupMembership>,
    pub enrolled: std::sync::Arc<EnrolledInstances>,
}

impl std::fmt::Debug for AwsIidEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsIidEnrollment")
            .field("regions", &self.verifier.regions().len())
            .finish_non_exhaustive()
    }
}

/// How agents may enroll.
#[derive(Debug)]
pub struct Enrollment {
    /// Agents that present it get a certificate; empty refuses all.
    pub join_token: Secret,
    /// Agents on EC2 instances of the group may enroll with their
    /// identity document instead.
    pub aws_iid: Option<AwsIidEnrollment>,
    /// Agents whose certificates are no longer accepted nor renewed.
    pub revocations: std::sync::Arc<Revocations>,
    /// Credentials minted for the Fargate tasks this coordinator starts;
    /// `None` without a Fargate runner.
    pub tasks: Option<std::sync::Arc<super::task::TaskCredentials>>,
}

/// How an enrollment connection ends.
struct Verdict {
    code: VarInt,
    reason: String,
}

impl Verdict {
    fn new(close: u32, reason: impl Into<String>) -> Self {
        Self {
            code: code(close),
            reason: reason.into(),
        }
    }

    fn violation(remote: SocketAddr, what: &str) -> Self {
        tracing::warn!(%remote, what, "closed an unauthenticated connection that did not enroll");
        Self::new(close_code::PROTOCOL_VIOLATION, ONLY_ENROLLMENT)
    }
}

impl Enroller {
    pub fn new(pki: Pki, enrollment: Enrollment, cert_validity: Duration) -> Self {
        let token = enrollment.join_token.expose();
        Self {
            pki,
            join_token_digest: (!token.is_empty()).then(|| Sha256::digest(token).into()),
            aws_iid: enrollment.aws_iid,
            tasks: enrollment.tasks,
            revocations: enrollment.revocations,
            cert_validity,
        }
    }

    /// The revoked agents.
    pub fn revocations(&self) -> &std::sync::Arc<Revocations> {
        &self.revocations
    }

    /// Signs a new certificate for a connected agent's new key, with the
    /// agent's id and the configured validity; or says why not.
    pub async fn renew(&self, agent_id: &str, csr_pem: &str) -> Result<(String, Duration), String> {
        if let Some(revoked) = self.revocations.get(agent_id) {
            tracing::warn!(agent = %agent_id, revocation = %revoked.describe(), "refused to renew a revoked agent's certificate");
            return Err(format!("agent {agent_id} was {}", revoked.describe()));
        }
        if let Some(iid) = &self.aws_iid {
            // An agent that enrolled by its instance identity is named by its
            // instance; it keeps its certificate only while the instance is
            // in the group.
            if iid.enrolled.contains(agent_id) {
                match iid.membership.is_member(agent_id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(agent = %agent_id, "refused to renew: the instance is no longer a running member of the group");
                        return Err(format!(
                            "instance {agent_id} is no longer a running member of the Auto Scaling group this coordinator sizes; its certificate is not renewed"
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(agent = %agent_id, error = %e, "could not renew: group membership unknown");
                        return Err(format!(
                            "cannot check whether instance {agent_id} is still in the group ({e}); the agent asks again"
                        ));
                    }
                }
            }
        }
        match self
            .pki
            .issue_client_cert(csr_pem, agent_id, self.cert_validity)
        {
            Ok(pem) => {
                tracing::info!(agent = %agent_id, valid_for = ?self.cert_validity, "renewed an agent's certificate");
                Ok((pem, self.cert_validity))
            }
            Err(e) => {
                tracing::warn!(agent = %agent_id, error = %e, "refused to renew: cannot issue a certificate");
                Err(format!(
                    "the coordinator cannot sign this agent's request: {e}"
                ))
            }
        }
    }

    /// Serves one connection without a client certificate, then closes it.
    pub async fn serve(
        &self,
        connection: quinn::Connection,
        remote: SocketAddr,
        shutdown: &CancellationToken,
    ) {
        let verdict = tokio::select! {
            () = shutdown.cancelled() => {
                Verdict::new(close_code::SHUTTING_DOWN, "coordinator shutting down")
            }
            done = tokio::time::timeout(ENROLL_TIMEOUT, self.converse(&connection, remote)) => {
                done.unwrap_or_else(|_| {
                    tracing::info!(%remote, timeout = ?ENROLL_TIMEOUT, "enrollment timed out");
                    Verdict::new(close_code::TIMEOUT, "enrollment took too long")
                })
            }
        };
        connection.close(verdict.code, verdict.reason.as_bytes());
    }

    async fn converse(&self, connection: &quinn::Connection, remote: SocketAddr) -> Verdict {
        let (mut send, mut recv) = tokio::select! {
            bi = connection.accept_bi() => match bi {
                Ok(streams) => streams,
                Err(e) => return gone(remote, &e),
            },
            uni = connection.accept_uni() => return match uni {
                Ok(_) => Verdict::violation(remote, "opened a unidirectional stream"),
                Err(e) => gone(remote, &e),
            },
        };
        // While the request is read and answered, any further stream is a
        // violation too.
        let request = tokio::select! {
            request = read_request(&mut recv) => request,
            other = another_stream(connection) => return match other {
                Ok(kind) => Verdict::violation(remote, kind),
                Err(e) => gone(remote, &e),
            },
        };
        let request = match request {
            Ok(request) => request,
            Err(what) => return Verdict::violation(remote, &what),
        };
        let (response, verdict) = match self.decide(&request, remote).await {
            Ok(certificate_pem) => (
                EnrollResponse {
                    result: Some(enroll_response::Result::CertificatePem(certificate_pem)),
                    valid_for_secs: self.cert_validity.as_secs(),
                },
                Verdict::new(close_code::DONE, "enrolled"),
            ),
            Err(reason) => (
                EnrollResponse {
                    result: Some(enroll_response::Result::Refused(reason)),
                    valid_for_secs: 0,
                },
                Verdict::new(close_code::ENROLLMENT_REFUSED, "enrollment refused"),
            ),
        };
        if let Err(e) = write_frame(&mut send, &response).await {
            tracing::info!(%remote, error = %e, "could not send the enrollment answer");
            return verdict;
        }
        // The stream is finished only if the agent is still there; either
        // way there is nothing left to do but close.
        let _ = send.finish();
        // Give the agent the chance to read the answer and hang up first.
        let _ = tokio::time::timeout(LINGER, connection.closed()).await;
        verdict
    }

    /// Checks the request and signs its certificate, or says why not.
    async fn decide(&self, request: &EnrollRequest, remote: SocketAddr) -> Result<String, String> {
        let mut name = sanitize_agent_name(&request.agent_name);
        if request.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(%remote, agent_name = %name, agent_protocol = request.protocol_version, "refused enrollment: incompatible link protocol");
            return Err(format!(
                "the agent speaks link protocol {} but the coordinator speaks {PROTOCOL_VERSION}; run matching releases of the agent and the coordinator",
                request.protocol_version
            ));
        }
        let agent_id = match (&request.ecs_task, &request.aws_identity) {
            (Some(task), _) => {
                let Some(tasks) = &self.tasks else {
                    tracing::warn!(%remote, task = %task.task_arn, "refused enrollment: a task credential came, but this coordinator runs no Fargate tasks");
                    return Err(
                        "this coordinator starts no Fargate tasks; an agent outside a task enrolls with a join token or its instance identity"
                            .to_owned(),
                    );
                };
                let binding = tasks.claim(&task.credential, &task.task_arn).map_err(|e| {
                    tracing::warn!(%remote, task = %task.task_arn, error = %e, "refused enrollment: task credential");
                    e
                })?;
                binding.agent_id(super::task::task_id(&task.task_arn))
            }
            (None, Some(identity)) => {
                let instance = self.admit_instance(identity, remote).await?;
                name = sanitize_agent_name(&instance.instance_id);
                // One certificate per instance: its id is the agent's.
                name.clone()
            }
            (None, None) => {
                let token_ok = self.join_token_digest.is_some_and(|want| {
                    digests_equal(&want, &Sha256::digest(&request.join_token).into())
                });
                if !token_ok {
                    tracing::warn!(%remote, agent_name = %name, "refused enrollment: the agent's join token does not match join_token_file");
                    return Err(JOIN_TOKEN_REJECTED.to_owned());
                }
                agent_id(&name)
            }
        };
        match self
            .pki
            .issue_client_cert(&request.csr_pem, &agent_id, self.cert_validity)
        {
            Ok(pem) => {
                tracing::info!(%remote, agent = %agent_id, valid_for = ?self.cert_validity, "enrolled an agent");
                Ok(pem)
            }
            Err(e) => {
                tracing::warn!(%remote, agent_name = %name, error = %e, "refused enrollment: cannot issue a certificate");
                Err(format!(
                    "the coordinator cannot sign this agent's request: {e}"
                ))
            }
        }
    }
}

impl Enroller {
    /// Checks an instance identity: the document and its signature, the
    /// group, and that the instance has not enrolled before.
    async fn admit_instance(
        &self,
        identity: &servitor_proto::agent::AwsIdentity,
        remote: SocketAddr,
    ) -> Result<InstanceIdentity, String> {
        let Some(iid) = &self.aws_iid else {
            tracing::warn!(%remote, "refused enrollment: an instance identity came, but aws-iid enrollment is off");
            return Err(AWS_IID_OFF.to_owned());
        };
        let instance = iid
            .verifier
            .verify(
                identity.document.as_bytes(),
                &identity.rsa2048,
                std::time::SystemTime::now(),
            )
            .map_err(|e| {
                tracing::warn!(%remote, error = %e, "refused enrollment: instance identity");
                format!("instance identity refused: {e}")
            })?;
        let id = &instance.instance_id;
        match iid.membership.is_member(id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%remote, instance = %id, "refused enrollment: not a running member of the group");
                return Err(format!(
                    "instance {id} is not a running member of the Auto Scaling group this coordinator sizes; only the group's instances may enroll"
                ));
            }
            Err(e) => {
                tracing::warn!(%remote, instance = %id, error = %e, "refused enrollment: group membership unknown");
                return Err(format!(
                    "cannot check whether instance {id} belongs to the group ({e}); the agent tries again"
                ));
            }
        }
        match iid.enrolled.claim(id) {
            Ok(true) => Ok(instance),
            Ok(false) => {
                tracing::warn!(%remote, instance = %id, "refused enrollment: the instance enrolled before (a replayed document?)");
                Err(format!(
                    "instance {id} has enrolled before; an instance enrolls once, and renews its certificate over its link"
                ))
            }
            Err(e) => {
                tracing::warn!(%remote, instance = %id, error = %e, "refused enrollment: cannot record the instance");
                Err(format!(
                    "the coordinator cannot record the enrollment ({e})"
                ))
            }
        }
    }
}

/// The connection went away before it did anything wrong.
fn gone(remote: SocketAddr, error: &quinn::ConnectionError) -> Verdict {
    tracing::debug!(%remote, %error, "unauthenticated connection ended");
    Verdict::new(close_code::DONE, "")
}

/// Resolves when the peer opens any further stream.
async fn another_stream(
    connection: &quinn::Connection,
) -> Result<&'static str, quinn::ConnectionError> {
    tokio::select! {
        bi = connection.accept_bi() => bi.map(|_| "opened a second stream"),
        uni = connection.accept_uni() => uni.map(|_| "opened a unidirectional stream"),
    }
}

/// Reads one length-delimited `EnrollRequest`. Unlike the general frame
/// reader, this refuses a length over [`MAX_ENROLL_REQUEST_BYTES`] before
/// buffering anything, since the peer is not authenticated yet.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<EnrollRequest, String> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    loop {
        match prost::decode_length_delimiter(buf.as_slice()) {
            Ok(len) => {
                if len > MAX_ENROLL_REQUEST_BYTES {
                    return Err(format!(
                        "sent a {len} byte frame, over the {MAX_ENROLL_REQUEST_BYTES} byte enrollment limit"
                    ));
                }
                let start = prost::length_delimiter_len(len);
                if let Some(frame) = buf.get(start..start + len) {
                    let request = EnrollRequest::decode(frame).map_err(|e| {
                        format!("sent a frame that is not an enrollment request ({e})")
                    })?;
                    return if is_enrollment(&request) {
                        Ok(request)
                    } else {
                        Err("sent a frame that is not an enrollment request".into())
                    };
                }
            }
            Err(_) if buf.len() >= MAX_LENGTH_PREFIX_BYTES => {
                return Err("sent a malformed frame length".into());
            }
            // The length prefix is still incomplete.
            Err(_) => {}
        }
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) => return Err("ended the stream before a whole enrollment request".into()),
            Err(e) => return Err(format!("broke off the stream ({e})")),
        }
    }
}

/// Protobuf decodes many messages as many others; an enrollment request
/// must at least carry a protocol version and a signing request.
fn is_enrollment(request: &EnrollRequest) -> bool {
    request.protocol_version != 0 && !request.csr_pem.trim().is_empty()
}

/// Compares two digests in time that does not depend on where they differ.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The requested name reduced to lowercase letters, digits and single
/// hyphens, at most [`MAX_AGENT_NAME_LEN`] long.
fn sanitize_agent_name(requested: &str) -> String {
    let mut name = String::with_capacity(requested.len().min(MAX_AGENT_NAME_LEN));
    for c in requested.chars() {
        if name.len() >= MAX_AGENT_NAME_LEN {
            break;
        }
        if c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_lowercase());
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        FALLBACK_AGENT_NAME.to_owned()
    } else {
        name.to_owned()
    }
}

/// `name` plus a random suffix: what the agent is known by from now on.
fn agent_id(name: &str) -> String {
    let suffix: [u8; AGENT_ID_SUFFIX_BYTES] = rand::random();
    let mut id = format!("{name}-");
    for byte in suffix {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use servitor_testkit::iid::{IidSigner, Tamper};

    #[test]
    fn agent_names_are_sanitized() {
        let long = "x".repeat(100);
        let cases = [
            ("build-box-1", "build-box-1"),
            ("Build Box #7", "build-box-7"),
            ("  i-0abc.ec2.internal ", "i-0abc-ec2-internal"),
            ("--weird__name--", "weird-name"),
            ("", FALLBACK_AGENT_NAME),
            ("///", FALLBACK_AGENT_NAME),
            ("ünïcode", "n-code"),
            (long.as_str(), &long[..MAX_AGENT_NAME_LEN]),
        ];
        for (requested, want) in cases {
            assert_eq!(sanitize_agent_name(requested), want, "{requested:?}");
        }
    }

    #[test]
    fn agent_ids_get_a_short_random_suffix() {
        let a = agent_id("box");
        let b = agent_id("box");
        assert_ne!(a, b);
        let suffix = a.strip_prefix("box-").unwrap();
        assert_eq!(suffix.len(), AGENT_ID_SUFFIX_BYTES * 2);
        assert!(suffix
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn digest_comparison() {
        let a: [u8; 32] = Sha256::digest("token").into();
        let b: [u8; 32] = Sha256::digest("token").into();
        let c: [u8; 32] = Sha256::digest("tokem").into();
        assert!(digests_equal(&a, &b));
        assert!(!digests_equal(&a, &c));
    }

    #[tokio::test]
    async fn empty_join_token_refuses_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let enrollment = Enrollment {
            join_token: Secret::new(""),
            aws_iid: None,
            revocations: std::sync::Arc::new(Revocations::in_memory()),
            tasks: None,
        };
        let enroller = Enroller::new(pki, enrollment, Duration::from_secs(3600));
        let request = EnrollRequest {
            join_token: String::new(),
            csr_pem: "x".into(),
            agent_name: "box".into(),
            protocol_version: PROTOCOL_VERSION,
            aws_identity: None,
            ecs_task: None,
        };
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            enroller.decide(&request, remote).await.unwrap_err(),
            JOIN_TOKEN_REJECTED
        );
    }

    /// The group: a fixed set of instance ids.
    struct Group(Vec<&'static str>);

    impl GroupMembership for Group {
        fn is_member<'a>(
            &'a self,
            instance_id: &'a str,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>
        {
            Box::pin(async move { Ok(self.0.contains(&instance_id)) })
        }
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn iid_request(
        signer: &IidSigner,
        instance: &str,
        pending: std::time::SystemTime,
    ) -> EnrollRequest {
        let document = servitor_testkit::iid::document(instance, "eu-west-1", pending);
        EnrollRequest {
            join_token: String::new(),
            csr_pem: csr(),
            agent_name: "ignored".into(),
            protocol_version: PROTOCOL_VERSION,
            aws_identity: Some(servitor_proto::agent::AwsIdentity {
                rsa2048: signer.sign(document.as_bytes(), Tamper::None),
                document,
            }),
            ecs_task: None,
        }
    }

    fn iid_enroller(
        dir: &std::path::Path,
        signer: &IidSigner,
        state: &std::path::Path,
    ) -> Enroller {
        let pki = Pki::load_or_create(dir, &[]).unwrap();
        let certificates = format!("region: eu-west-1\n{}", signer.certificate_pem());
        let verifier =
            IidVerifier::from_pem_set(&certificates, "test", Duration::from_secs(600)).unwrap();
        let enrollment = Enrollment {
            join_token: Secret::new("a-token-aws-agents-never-send"),
            aws_iid: Some(AwsIidEnrollment {
                verifier,
                membership: std::sync::Arc::new(Group(vec!["i-0member", "i-0second"])),
                enrolled: std::sync::Arc::new(
                    EnrolledInstances::open(Some(state.join("enrolled-instances"))).unwrap(),
                ),
            }),
            revocations: std::sync::Arc::new(Revocations::in_memory()),
            tasks: None,
        };
        Enroller::new(pki, enrollment, Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn an_instance_of_the_group_enrolls_once_by_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let signer = IidSigner::generate();
        let enroller = iid_enroller(dir.path(), &signer, dir.path());
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let now = std::time::SystemTime::now();

        let request = iid_request(&signer, "i-0member", now);
        let pem = enroller.decide(&request, remote).await.unwrap();
        let (_, cert) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = cert.parse_x509().unwrap();
        let names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        assert_eq!(names, ["i-0member"], "the agent is named by its instance");

        // The same document again, even after a restart: a replay.
        let err = enroller.decide(&request, remote).await.unwrap_err();
        assert!(err.contains("i-0member has enrolled before"), "{err}");
        let restarted = iid_enroller(dir.path(), &signer, dir.path());
        let again = iid_request(&signer, "i-0member", now);
        let err = restarted.decide(&again, remote).await.unwrap_err();
        assert!(err.contains("enrolled before"), "{err}");

        // Outside the group.
        let err = enroller
            .decide(&iid_request(&signer, "i-0stranger", now), remote)
            .await
            .unwrap_err();
        assert!(err.contains("i-0stranger is not a running member"), "{err}");

        // Signed by someone else.
        let forger = IidSigner::generate();
        let err = enroller
            .decide(&iid_request(&forger, "i-0second", now), remote)
            .await
            .unwrap_err();
        assert!(err.starts_with("instance identity refused"), "{err}");
        assert!(err.contains("does not verify"), "{err}");

        // Stale.
        let old = now - Duration::from_secs(7200);
        let err = enroller
            .decide(&iid_request(&signer, "i-0second", old), remote)
            .await
            .unwrap_err();
        assert!(err.contains("s old"), "{err}");
        // Refusals did not use up the instance's one enrollment.
        enroller
            .decide(&iid_request(&signer, "i-0second", now), remote)
            .await
            .unwrap();
    }

    /// The agent of a Fargate task enrolls once with the credential minted
    /// for its task, and gets an id that binds it to its job; the same
    /// credential from another task, or again, is refused.
    #[tokio::test]
    async fn a_task_agent_enrolls_once_with_its_tasks_credential() {
        use crate::link::task::{TaskBinding, TaskCredentials};
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let tasks = std::sync::Arc::new(TaskCredentials::default());
        let enroller = Enroller::new(
            pki,
            Enrollment {
                join_token: Secret::new("t"),
                aws_iid: None,
                revocations: std::sync::Arc::new(Revocations::in_memory()),
                tasks: Some(tasks.clone()),
            },
            Duration::from_secs(3600),
        );
        let arn = "arn:aws:ecs:eu-west-1:123456789012:task/ci/5f0e0a1b2c3d";
        let binding = TaskBinding {
            runner: "light".into(),
            job_id: 7,
            attempt: 2,
        };
        let credential = tasks.mint(binding.clone(), Duration::from_secs(300));
        tasks.bind(&credential, arn);
        let request = |task_arn: &str| EnrollRequest {
            csr_pem: csr(),
            agent_name: "job".into(),
            protocol_version: PROTOCOL_VERSION,
            ecs_task: Some(servitor_proto::agent::EcsTaskIdentity {
                credential: credential.expose().to_owned(),
                task_arn: task_arn.to_owned(),
            }),
            ..EnrollRequest::default()
        };
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let other = "arn:aws:ecs:eu-west-1:123456789012:task/ci/ffff";
        let err = enroller.decide(&request(other), remote).await.unwrap_err();
        assert!(err.contains("minted for task"), "{err}");
        let pem = enroller.decide(&request(arn), remote).await.unwrap();
        let (_, cert) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = cert.parse_x509().unwrap();
        let name = cert
            .subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok().map(str::to_owned))
            .unwrap();
        assert_eq!(TaskBinding::from_agent_id(&name), Some(binding));
        let err = enroller.decide(&request(arn), remote).await.unwrap_err();
        assert!(err.contains("already used"), "{err}");
    }

    #[tokio::test]
    async fn an_identity_is_refused_when_aws_iid_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let enrollment = Enrollment {
            join_token: Secret::new("t"),
            aws_iid: None,
            revocations: std::sync::Arc::new(Revocations::in_memory()),
            tasks: None,
        };
        let enroller = Enroller::new(pki, enrollment, Duration::from_secs(3600));
        let signer = IidSigner::generate();
        let request = iid_request(&signer, "i-0member", std::time::SystemTime::now());
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            enroller.decide(&request, remote).await.unwrap_err(),
            AWS_IID_OFF
        );
    }

    #[tokio::test]
    async fn renewal_needs_the_instance_in_the_group_and_the_agent_unrevoked() {
        let dir = tempfile::tempdir().unwrap();
        let signer = IidSigner::generate();
        let enroller = iid_enroller(dir.path(), &signer, dir.path());
        let remote: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let now = std::time::SystemTime::now();
        for instance in ["i-0member", "i-0second"] {
            enroller
                .decide(&iid_request(&signer, instance, now), remote)
                .await
                .unwrap();
        }

        let (pem, valid_for) = enroller.renew("i-0member", &csr()).await.unwrap();
        assert_eq!(valid_for, Duration::from_secs(3600));
        assert!(pem.contains("BEGIN CERTIFICATE"));

        // A join-token agent is not named by an instance: no group check.
        enroller.renew("build-box-0a1b2c", &csr()).await.unwrap();

        enroller
            .revocations()
            .revoke("i-0member", "seen doing odd things")
            .unwrap();
        let err = enroller.renew("i-0member", &csr()).await.unwrap_err();
        assert!(err.contains("i-0member was revoked at"), "{err}");
        assert!(err.contains("seen doing odd things"), "{err}");

        // Enrolled, then gone from the group (the group holds only the
        // member and the second instance; a third enrolled earlier is not
        // there any more).
        let left = Enroller::new(
            Pki::load_or_create(dir.path(), &[]).unwrap(),
            Enrollment {
                join_token: Secret::new("t"),
                aws_iid: Some(AwsIidEnrollment {
                    verifier: IidVerifier::from_pem_set(
                        &format!("region: eu-west-1\n{}", signer.certificate_pem()),
                        "test",
                        Duration::from_secs(600),
                    )
                    .unwrap(),
                    membership: std::sync::Arc::new(Group(vec!["i-0member"])),
                    enrolled: std::sync::Arc::new(
                        EnrolledInstances::open(Some(dir.path().join("enrolled-instances")))
                            .unwrap(),
                    ),
                }),
                revocations: std::sync::Arc::new(Revocations::in_memory()),
                tasks: None,
            },
            Duration::from_secs(3600),
        );
        let err = left.renew("i-0second", &csr()).await.unwrap_err();
        assert!(
            err.contains("i-0second is no longer a running member"),
            "{err}"
        );
    }
}
