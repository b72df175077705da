//! Everything both ends of the agent link must agree on, apart from the
//! messages themselves: protocol identity, timings, close and stream codes,
//! the coordinator's certificate name and how a CA pin is written.
//!
//! Plain constants, no I/O: the QUIC transport built from them lives in
//! `servitor_runtime::link`, and each end applies them in its own link code.

use std::time::Duration;

/// Version of the agent link protocol, sent in `Hello` and `EnrollRequest`.
/// Bump it when a change is not wire-compatible with the previous release.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol id of the agent link, so a stray TLS client is refused early.
pub const ALPN: &[u8] = b"servitor/1";

/// The name the coordinator's server certificate always carries, whatever
/// address the agent dials; agents verify against it by default.
pub const DEFAULT_SERVER_NAME: &str = "servitor-coordinator";

/// How a CA pin is written: this prefix, then the hex SHA-256 of the CA
/// certificate's DER (what the coordinator prints as its CA pin).
pub const PIN_PREFIX: &str = "sha256:";

/// How often an idle link sends a QUIC keep-alive. Well under
/// [`IDLE_TIMEOUT`] so one or two lost packets never end a healthy link.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A link silent for this long is dead. Short, because a lost agent must be
/// noticed quickly: its jobs go back to the queue only once it is.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

// Several keep-alives must fit in the idle timeout, or a single lost packet
// would end a healthy link.
const _: () = assert!(KEEP_ALIVE_INTERVAL.as_secs() * 3 <= IDLE_TIMEOUT.as_secs());

/// Heartbeat cadence the coordinator asks of agents in its hello reply. QUIC
/// keep-alives already detect a dead path; heartbeats also catch a frozen
/// agent process, whose kernel keeps answering QUIC for it.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Heartbeats the coordinator may miss in a row before it calls the agent
/// silent and closes its session.
pub const MISSED_HEARTBEATS: u32 = 3;

/// Longest the enrollment exchange may take once connected; the coordinator
/// gives up on an unauthenticated connection after the same time.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// QUIC application error code with which the coordinator stops an attempt's
/// output stream: the attempt is no longer wanted (superseded or unknown).
pub const STALE_ATTEMPT_CODE: u32 = 1;

/// Application close codes on the agent link, so each end can tell the
/// other why it hung up.
pub mod close_code {
    /// Nothing wrong: enrollment finished, or the side is done.
    pub const DONE: u32 = 0;
    /// The coordinator refused the enrollment (the reason travelled in the
    /// `EnrollResponse`).
    pub const ENROLLMENT_REFUSED: u32 = 1;
    /// The peer did something the protocol does not allow.
    pub const PROTOCOL_VIOLATION: u32 = 2;
    /// The peer took too long.
    pub const TIMEOUT: u32 = 3;
    /// The coordinator is shutting down.
    pub const SHUTTING_DOWN: u32 = 4;
    /// The operator revoked the agent's certificate (the reason follows).
    pub const REVOKED: u32 = 5;
    /// The agent's certificate ran out without being renewed.
    pub const CERTIFICATE_EXPIRED: u32 = 6;
    /// The agent named a runner the coordinator does not serve, or none
    /// where it serves several (the reason names the ones it serves).
    pub const UNKNOWN_RUNNER: u32 = 7;
}

/// The environment variable the coordinator puts a Fargate task's one-task
/// enrollment credential in.
pub const TASK_CREDENTIAL_VARIABLE: &str = "SERVITOR_TASK_CREDENTIAL";

/// Agent certificates start this far before they are issued, so a peer
/// whose clock runs a little behind does not reject one issued a moment ago.
/// Their life, for renewal, counts from the end of it.
pub const CERTIFICATE_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// An agent asks for a new certificate over its link once no more than this
/// share of its current one's life is left: a third, so a renewal refused
/// for a passing reason (the cloud API failing) has time to be tried again.
pub const RENEW_WHEN_REMAINING_PERCENT: u32 = 34;
