//! One task per connected agent: reads its control stream into the core,
//! writes the core's messages back, and routes each attempt's output stream
//! to the job it belongs to — or stops it, if the attempt is stale.
//!
//! Not responsible for TLS or enrollment (`link`), nor for deciding anything
//! about jobs (`core`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use servitor_proto::agent::{
    agent_message, coordinator_message, renewed, AgentMessage, Assign, CoordinatorMessage, Hello,
    OutputHeader, Renew, Renewed, Welcome,
};
use servitor_proto::frame::{read_frame_limited, write_frame, FrameReader};
use servitor_proto::link::{close_code, HEARTBEAT_INTERVAL, MISSED_HEARTBEATS, STALE_ATTEMPT_CODE};
use servitor_runtime::link::code;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cache::CacheStore;
use crate::core::{AgentHello, Core, JobEvent};
use crate::link::{AgentConnection, LinkServer};
use servitor_proto::job::JobPayload;

/// How long a new connection has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most pieces of an output stream taken at once. The stream hands data
/// over in pieces of about one packet; what has arrived together goes on
/// to the job as one piece, so a busy stream costs the job one wake-up and
/// one journal record per read, not per packet.
const OUTPUT_GATHER: usize = 64;
/// Most messages waiting for an agent that does not read them (answers to
/// its own requests among them) before its link is closed.
const MAX_QUEUED_TO_AGENT: usize = 4096;
/// How often a blocked write to an agent looks at what waits behind it.
const QUEUE_CHECK: Duration = Duration::from_secs(1);
/// Why a session ended when the agent finished its control stream.
const CLEAN_GOODBYE: &str = "agent closed its control stream";
/// Why a session ended when the operator revoked the agent.
const REVOKED: &str = "agent revoked";
/// Why a session ended when the agent's certificate ran out.
const CERTIFICATE_EXPIRED: &str = "certificate expired";
/// Least time between two renewals one session may start: an agent
/// renews once in a third of its certificate's life (at least 30 s), and
/// retries a refusal at most every second; a flood costs one signature a
/// second, not one per message.
const RENEW_MIN_GAP: Duration = Duration::from_secs(1);

/// When a session may renew: one request at a time, and
/// [`RENEW_MIN_GAP`] apart.
#[derive(Debug, Default)]
struct RenewalGate {
    last: Option<tokio::time::Instant>,
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl RenewalGate {
    /// Admits a request at `now`, or says why not. The flag it returns is
    /// cleared when the request is answered.
    fn admit(
        &mut self,
        now: tokio::time::Instant,
    ) -> Result<Arc<std::sync::atomic::AtomicBool>, String> {
        use std::sync::atomic::Ordering;
        if self.busy.load(Ordering::Acquire) {
            return Err(
                "a renewal of this agent is already under way; wait for its answer".to_owned(),
            );
        }
        if let Some(last) = self.last {
            let since = now.saturating_duration_since(last);
            if since < RENEW_MIN_GAP {
                return Err(format!(
                    "renewals come at most one a second; this one came {}ms after the last",
                    since.as_millis()
                ));
            }
        }
        self.last = Some(now);
        self.busy.store(true, Ordering::Release);
        Ok(self.busy.clone())
    }
}

/// What every agent session needs besides the core.
#[derive(Clone, Debug)]
pub struct Serving {
    /// How long a silent agent keeps its attempts.
    pub lost_grace: Duration,
    /// The runners agents may take jobs for, in the configuration's order.
    pub runners: Arc<[AgentRunner]>,
}

/// A runner, as its agents are served.
#[derive(Clone, Debug)]
pub struct AgentRunner {
    pub name: String,
    /// Where its agents reach GitLab with job tokens (artifacts,
    /// dependencies).
    pub gitlab_url: String,
    /// Where its jobs' caches live; each assignment carries access to its
    /// own.
    pub cache: Option<Arc<CacheStore>>,
}

/// The runner an agent's hello names: the only one when it names none.
///
/// # Errors
/// The refusal the agent is told: the name is unknown, or missing where
/// there are several; it lists the runners served.
pub fn resolve_runner<'r>(
    runners: &'r [AgentRunner],
    asked: &str,
) -> Result<&'r AgentRunner, String> {
    let served = || {
        runners
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (asked, runners) {
        ("", [only]) => Ok(only),
        ("", _) => Err(format!(
            "this coordinator serves several runners ({}); set runner to one of them in the agent's configuration",
            served()
        )),
        (name, _) => runners.iter().find(|r| r.name == name).ok_or_else(|| {
            format!(
                "this coordinator serves no runner {name:?}; it serves {}",
                served()
            )
        }),
    }
}

/// Accepts authenticated agent connections until `stop`, one task each.
pub async fn serve_agents(
    core: Arc<Core>,
    link: Arc<LinkServer>,
    serving: Serving,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            conn = link.accept() => match conn {
                Some(c) => c,
                None => return,
            },
        };
        let span = tracing::info_span!("agent", agent = %conn.agent_id, remote = %conn.remote);
        let core = core.clone();
        let stop = stop.clone();
        let inner_tracker = tracker.clone();
        let serving = serving.clone();
        let link = link.clone();
        tracker.spawn(
            async move {
                serve_agent(core, link, conn, serving, stop, inner_tracker).await;
            }
            .instrument(span),
        );
    }
}

async fn serve_agent(
    core: Arc<Core>,
    link: Arc<LinkServer>,
    conn: AgentConnection,
    serving: Serving,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let Serving {
        lost_grace,
        runners,
    } = serving;
    let agent_id = conn.agent_id.clone();
    let connection = conn.connection.clone();
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, recv) = connection.accept_bi().await?;
        // An agent's messages are small; a larger frame is refused unread.
        let mut frames =
            FrameReader::with_limit(recv, servitor_proto::frame::MAX_AGENT_MESSAGE_BYTES);
        let hello: Option<AgentMessage> = frames.next().await?;
        Ok::<_, SessionError>((send, frames, hello))
    })
    .await;
    let (mut send, mut frames, hello) = match opened {
        Ok(Ok((
            send,
            frames,
            Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }),
        ))) => (send, frames, h),
        Ok(Ok(_)) => {
            tracing::warn!("agent did not start with hello; closing");
            connection.close(code(close_code::PROTOCOL_VIOLATION), b"expected hello");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "agent session failed before hello");
            return;
        }
        Err(_) => {
            tracing::warn!("agent sent no hello in time; closing");
            connection.close(code(close_code::TIMEOUT), b"hello timeout");
            return;
        }
    };
    if hello.protocol_version != servitor_proto::link::PROTOCOL_VERSION {
        tracing::error!(
            theirs = hello.protocol_version,
            ours = servitor_proto::link::PROTOCOL_VERSION,
            "agent speaks another protocol version; upgrade the agent image"
        );
        connection.close(
            code(close_code::PROTOCOL_VIOLATION),
            b"protocol version mismatch",
        );
        return;
    }
    let Hello {
        instance,
        executor,
        capacity,
        free_slots,
        running,
        reporting,
        runner,
        ..
    } = hello;
    // The agent of a task started for one job: its certificate says which,
    // whatever its hello says.
    let binding = crate::link::task::TaskBinding::from_agent_id(&agent_id);
    let runner = binding.as_ref().map_or(runner, |b| b.runner.clone());
    let runner = match resolve_runner(&runners, &runner) {
        Ok(r) => r.clone(),
        Err(reason) => {
            tracing::warn!(runner = %runner, %reason, "refused an agent: its runner is not served here");
            connection.close(code(close_code::UNKNOWN_RUNNER), reason.as_bytes());
            return;
        }
    };
    let cache = runner.cache.clone();
    let gitlab_url = runner.gitlab_url.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<CoordinatorMessage>();
    let replies = tx.clone();
    let running_count = running.len();
    let (session, stale) = core
        .agent_connected(
            AgentHello {
                agent: agent_id.clone(),
                runner: runner.name.clone(),
                only_job: binding.map(|b| b.job_id),
                instance: instance.unwrap_or_default(),
                executor,
                capacity,
                free_slots,
                running,
                reporting,
                remote: conn.remote,
            },
            tx,
        )
        .await;
    tracing::info!(capacity, running = running_count, runner = %runner.name, "agent connected");
    let welcome = CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Welcome(Welcome {
            agent_id: agent_id.clone(),
            stale,
            heartbeat_interval_ms: u32::try_from(HEARTBEAT_INTERVAL.as_millis())
                .unwrap_or(u32::MAX),
        })),
    };

    // Output streams: one per attempt.
    let outputs = {
        let core = core.clone();
        let connection = connection.clone();
        let agent_id = agent_id.clone();
        tracker.spawn(
            async move {
                while let Ok(stream) = connection.accept_uni().await {
                    let core = core.clone();
                    let agent_id = agent_id.clone();
                    tokio::spawn(route_output(core, agent_id, stream).in_current_span());
                }
            }
            .in_current_span(),
        )
    };

    // Writer: the core's messages to the agent, in order.
    let writer_connection = connection.clone();
    let writer = tracker.spawn(
        async move {
            if write_frame(&mut send, &welcome).await.is_err() {
                return;
            }
            while let Some(mut message) = rx.recv().await {
                if let Some(coordinator_message::Msg::Assign(assign)) = &mut message.msg {
                    // The agent's runner took the job: its GitLab and cache.
                    assign.gitlab_url.clone_from(&gitlab_url);
                    if let Some(cache) = &cache {
                        grant_cache(cache, assign).await;
                    }
                }
                // An agent that stops reading its control stream while it
                // keeps asking for answers is cut off before the answers
                // waiting for it grow without bound.
                let write = write_frame(&mut send, &message);
                tokio::pin!(write);
                let written = loop {
                    tokio::select! {
                        written = &mut write => break written,
                        () = tokio::time::sleep(QUEUE_CHECK) => {
                            if rx.len() > MAX_QUEUED_TO_AGENT {
                                tracing::warn!(queued = rx.len(), "agent does not read its control stream; closing its link");
                                writer_connection.close(
                                    code(close_code::PROTOCOL_VIOLATION),
                                    b"the agent does not read its control stream",
                                );
                                return;
                            }
                        }
                    }
                };
                if let Err(e) = written {
                    tracing::debug!(error = %e, "control stream write failed");
                    return;
                }
            }
        }
        .in_current_span(),
    );

    // The link lasts as long as the agent's certificate: renewals move the
    // end, a revocation brings it forward to now.
    let (renewed_tx, mut renewed_rx) = mpsc::unbounded_channel::<SystemTime>();
    let mut renewals = RenewalGate::default();
    let mut expires = conn.cert_expires;
    let mut expiry = deadline(expires);
    let mut revocations = link.revocations().subscribe();
    // Revoked between the handshake and now?
    revocations.mark_changed();

    // Reader: the agent's messages into the core. Silence longer than a few
    // heartbeats means a frozen agent even if QUIC still answers.
    let silence_limit = HEARTBEAT_INTERVAL * MISSED_HEARTBEATS;
    let (ended, close, detail) = loop {
        tokio::select! {
            () = stop.cancelled() => break ("coordinator stopping", close_code::DONE, String::new()),
            () = tokio::time::sleep_until(expiry) => break (
                CERTIFICATE_EXPIRED,
                close_code::CERTIFICATE_EXPIRED,
                format!(
                    "the agent's certificate expired at {} and was not renewed over the link",
                    humantime::format_rfc3339_seconds(expires)
                ),
            ),
            Ok(()) = revocations.changed() => {
                if let Some(revoked) = link.revocations().get(&agent_id) {
                    break (REVOKED, close_code::REVOKED, format!("agent {agent_id} was {}", revoked.describe()));
                }
            }
            Some(renewed) = renewed_rx.recv() => {
                expires = renewed;
                expiry = deadline(expires);
            }
            frame = tokio::time::timeout(silence_limit, frames.next::<AgentMessage>()) => match frame {
                Ok(Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Renew(renew)) }))) => {
                    match renewals.admit(tokio::time::Instant::now()) {
                        Ok(busy) => {
                            let answered = renew_certificate(link.clone(), agent_id.clone(), renew, replies.clone(), renewed_tx.clone());
                            tracker.spawn(
                                async move {
                                    answered.await;
                                    busy.store(false, std::sync::atomic::Ordering::Release);
                                }
                                .in_current_span(),
                            );
                        }
                        Err(reason) => {
                            tracing::warn!(%reason, "refused a renewal request");
                            let _ = replies.send(CoordinatorMessage {
                                msg: Some(coordinator_message::Msg::Renewed(Renewed {
                                    result: Some(renewed::Result::Refused(reason)),
                                    valid_for_secs: 0,
                                })),
                            });
                        }
                    }
                }
                Ok(Ok(Some(message))) => core.agent_message(&agent_id, session, message).await,
                Ok(Ok(None)) => break (CLEAN_GOODBYE, close_code::DONE, String::new()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "agent control stream failed");
                    break ("control stream failed", close_code::DONE, String::new());
                }
                Err(_) => break ("agent stopped sending heartbeats", close_code::DONE, String::new()),
            },
        }
    };
    if detail.is_empty() {
        tracing::info!(reason = ended, "agent disconnected");
        connection.close(code(close), ended.as_bytes());
    } else {
        tracing::warn!(reason = %detail, "closed the agent's link");
        connection.close(code(close), detail.as_bytes());
    }
    writer.abort();
    outputs.abort();
    core.agent_disconnected(&agent_id, session);
    if stop.is_cancelled() {
        // Shutting down: leases survive, nothing is given up.
        return;
    }
    if ended == CLEAN_GOODBYE {
        // The agent left on purpose (drained, or stopping): it is not coming
        // back, so whatever it still held runs elsewhere now.
        core.agent_lost(&agent_id, session, &format!("agent {agent_id} left"))
            .await;
        return;
    }
    if ended == REVOKED || ended == CERTIFICATE_EXPIRED {
        // This agent id cannot connect again: an agent that may come back
        // does so under a new id, after enrolling anew.
        core.agent_lost(&agent_id, session, &detail).await;
        return;
    }
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(lost_grace) => {
            let reason = format!("agent {agent_id} was out of touch for {}", humantime::format_duration(lost_grace));
            if core.agent_lost(&agent_id, session, &reason).await {
                tracing::warn!("agent did not come back; its jobs run again elsewhere");
            }
        }
    }
}

/// The Tokio instant at a wall-clock time (now, if it has passed).
fn deadline(at: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Answers one renewal request, off the reader so heartbeats keep flowing
/// while the group is asked about the instance.
async fn renew_certificate(
    link: Arc<LinkServer>,
    agent_id: String,
    renew: Renew,
    replies: mpsc::UnboundedSender<CoordinatorMessage>,
    renewed: mpsc::UnboundedSender<SystemTime>,
) {
    let answer = match link.renew(&agent_id, &renew.csr_pem).await {
        Ok(renewal) => {
            let _ = renewed.send(renewal.expires);
            Renewed {
                result: Some(renewed::Result::CertificatePem(renewal.certificate_pem)),
                valid_for_secs: renewal.valid_for.as_secs(),
            }
        }
        Err(reason) => Renewed {
            result: Some(renewed::Result::Refused(reason)),
            valid_for_secs: 0,
        },
    };
    // The session may have ended meanwhile; then nobody waits for this.
    let _ = replies.send(CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Renewed(answer)),
    });
}

/// Reads one attempt's output stream into its job, or stops it if the
/// attempt is not the job's current one.
async fn route_output(core: Arc<Core>, agent_id: String, mut stream: quinn::RecvStream) {
    let header: OutputHeader =
        match read_frame_limited(&mut stream, servitor_proto::frame::MAX_OUTPUT_HEADER_BYTES).await
        {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "output stream without a valid header");
                let _ = stream.stop(code(STALE_ATTEMPT_CODE));
                return;
            }
        };
    let Some(attempt) = header.attempt else {
        let _ = stream.stop(code(STALE_ATTEMPT_CODE));
        return;
    };
    let Some(events) = core.output_target(&agent_id, attempt) else {
        tracing::warn!(%attempt, "output of a stale attempt refused; stopping it");
        let _ = stream.stop(code(STALE_ATTEMPT_CODE));
        core.stop_stale(&agent_id, attempt);
        return;
    };
    let mut offset = header.offset;
    let mut pieces = vec![Bytes::new(); OUTPUT_GATHER];
    loop {
        match stream.read_chunks(&mut pieces).await {
            Ok(Some(n)) => {
                let bytes = gather(&mut pieces[..n]);
                let len = bytes.len() as u64;
                let sent = events.send(JobEvent::Output {
                    attempt: attempt.attempt,
                    offset,
                    bytes,
                });
                offset += len;
                if sent.is_err() {
                    let _ = stream.stop(code(STALE_ATTEMPT_CODE));
                    return;
                }
            }
            Ok(None) => {
                let _ = events.send(JobEvent::OutputEnd {
                    attempt: attempt.attempt,
                });
                return;
            }
            Err(e) => {
                tracing::debug!(%attempt, error = %e, "output stream ended early");
                return;
            }
        }
    }
}

/// The pieces read, as one.
fn gather(pieces: &mut [Bytes]) -> Bytes {
    if let [one] = pieces {
        return std::mem::take(one);
    }
    let mut all = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for piece in pieces {
        all.extend_from_slice(&std::mem::take(piece));
    }
    all.freeze()
}

/// Errors of a session before it is established.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Frame(#[from] servitor_proto::frame::FrameError),
}

/// Adds access to the job's caches to an assignment, signed as it leaves
/// (so URLs count from the moment the job starts, as gitlab-runner's do).
async fn grant_cache(cache: &CacheStore, assign: &mut Assign) {
    if let Ok(job) = JobPayload::from_json(&assign.job_json) {
        if !job.cache.is_empty() {
            assign.caches = cache.access(&job).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn renewals_come_one_at_a_time_and_a_second_apart() {
        let mut gate = RenewalGate::default();
        let start = tokio::time::Instant::now();
        let busy = gate.admit(start).unwrap();
        let e = gate.admit(start + Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("already under way"), "{e}");
        busy.store(false, std::sync::atomic::Ordering::Release);
        let e = gate.admit(start + Duration::from_millis(400)).unwrap_err();
        assert!(e.contains("at most one a second"), "{e}");
        let again = gate.admit(start + Duration::from_millis(1000)).unwrap();
        again.store(false, std::sync::atomic::Ordering::Release);
    }
}
