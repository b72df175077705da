//! The interruption watcher: polls an [`InstanceMetadata`] and sends each
//! distinct interruption once, with the deadline the agent has to hand its
//! jobs back by.
//!
//! Not responsible for acting on an interruption, and never turns a failed
//! poll into one: failures are logged (rate-limited) and polling goes on
//! under the shared [`Backoff`].

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{ImdsError, InstanceMetadata, Notices, SpotAction};
use servitor_runtime::backoff::Backoff;

/// How often to poll. AWS recommends every 5 seconds and
/// aws-node-termination-handler polls every 2; we poll every second so that
/// a notice is acted on within about a second on average (the target is a
/// job running again elsewhere within 2 s of the notice). Three small reads
/// a second are far below the per-instance IMDS throttle.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The time the agent assumes it has once the Auto Scaling group marks the
/// instance for leaving service. Instance metadata gives no deadline for
/// that; we allow what a Spot interruption gives (two minutes), so both
/// take the same path.
pub const ASG_ASSUMED_NOTICE: Duration = Duration::from_secs(120);
/// Longest wait between polls while the service keeps failing: a notice
/// found this late still leaves most of the two minutes.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Floor for the interval, so a zero from a caller cannot become a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Interruptions are rare (a handful per instance life); the buffer only
/// has to cover a receiver that is briefly busy.
const EVENT_BUFFER: usize = 8;
/// While polls keep failing, repeat the warning at most this often.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The Auto Scaling target state that means the instance is being
/// terminated.
const ASG_TERMINATED: &str = "Terminated";
/// Prefix of the warm pool states (`Warmed:Stopped`, `Warmed:Hibernated`,
/// ...): the instance is leaving service for the warm pool.
const ASG_WARMED_PREFIX: &str = "Warmed:";
/// The Auto Scaling target state of an instance in service.
const ASG_IN_SERVICE: &str = "InService";

/// A reason the instance is about to be taken away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// EC2 will reclaim the Spot instance at `deadline`.
    Spot {
        /// `terminate`, `stop` or `hibernate`.
        action: String,
        deadline: SystemTime,
    },
    /// EC2 recommends moving work off this instance; no deadline.
    Rebalance { notice_time: SystemTime },
    /// The Auto Scaling group is moving the instance out of service (to
    /// `Terminated` or to the warm pool). The deadline is assumed:
    /// [`ASG_ASSUMED_NOTICE`] after the state was first seen.
    AsgTerminating { state: String, deadline: SystemTime },
}

impl Interruption {
    /// When the instance goes away, if this interruption says.
    pub fn deadline(&self) -> Option<SystemTime> {
        match self {
            Interruption::Spot { deadline, .. } | Interruption::AsgTerminating { deadline, .. } => {
                Some(*deadline)
            }
            Interruption::Rebalance { .. } => None,
        }
    }

    /// How long is left at `now` until the deadline (zero once it passed).
    pub fn time_left(&self, now: SystemTime) -> Option<Duration> {
        self.deadline()
            .map(|deadline| deadline.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// Polls `imds` every `interval` (pass [`POLL_INTERVAL`]; tests pass less)
/// and sends each distinct interruption once. The task stops when `cancel`
/// fires or the receiver is dropped.
///
/// # Panics
/// Outside a Tokio runtime.
pub fn watch<M>(
    imds: M,
    interval: Duration,
    cancel: CancellationToken,
) -> mpsc::Receiver<Interruption>
where
    M: InstanceMetadata + 'static,
{
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let span = tracing::info_span!("imds_watch");
    tokio::spawn(run(imds, interval, cancel, tx).instrument(span));
    rx
}

async fn run<M: InstanceMetadata>(
    imds: M,
    interval: Duration,
    cancel: CancellationToken,
    tx: mpsc::Sender<Interruption>,
) {
    let interval = interval.max(MIN_INTERVAL);
    // The floor is the healthy interval, so a failing service is never
    // polled faster than a healthy one.
    let mut backoff = Backoff::try_new(interval, BACKOFF_MAX.max(interval))
        .expect("the interval is above zero and not above the maximum");
    let mut seen = Seen::default();
    let mut failures = FailureLog::default();
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => return,
            () = tx.closed() => return,
            polled = imds.poll_notices() => polled,
        };
        let delay = match polled {
            Ok(notices) => {
                if let Some(failed) = failures.recovered() {
                    tracing::info!(failed_polls = failed, "instance metadata readable again");
                }
                // Safe to reset at once: the floor is the healthy interval.
                backoff.reset();
                for event in seen.news(&notices, SystemTime::now()) {
                    log_event(&event);
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        sent = tx.send(event) => if sent.is_err() { return },
                    }
                }
                interval
            }
            Err(e) => {
                if let Some(suppressed) = failures.failed(Instant::now()) {
                    log_failure(&e, suppressed);
                }
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tx.closed() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn log_event(event: &Interruption) {
    let left = event.time_left(SystemTime::now());
    match event {
        Interruption::Spot { action, .. } => {
            tracing::warn!(action = %action, time_left = ?left, "spot interruption notice");
        }
        Interruption::Rebalance { .. } => tracing::info!("rebalance recommendation"),
        Interruption::AsgTerminating { state, .. } => {
            tracing::warn!(state = %state, time_left = ?left, "auto scaling group is taking the instance out of service");
        }
    }
}

fn log_failure(e: &ImdsError, suppressed: u64) {
    if e.is_retryable() {
        tracing::warn!(error = %e, suppressed, "cannot poll instance metadata for interruption notices");
    } else {
        tracing::error!(error = %e, suppressed, "cannot poll instance metadata for interruption notices");
    }
}

/// What has been reported so far; decides what in a poll is new.
#[derive(Debug, Default)]
struct Seen {
    spot: Option<SpotAction>,
    rebalance: Option<SystemTime>,
    /// The leaving state last reported; cleared when the instance is seen
    /// back in service, so leaving again is reported again.
    asg: Option<String>,
}

impl Seen {
    fn news(&mut self, notices: &Notices, now: SystemTime) -> Vec<Interruption> {
        let mut news = Vec::new();
        if let Some(spot) = &notices.spot_action {
            if self.spot.as_ref() != Some(spot) {
                self.spot = Some(spot.clone());
                news.push(Interruption::Spot {
                    action: spot.action.clone(),
                    deadline: spot.time,
                });
            }
        }
        if let Some(notice_time) = notices.rebalance {
            if self.rebalance != Some(notice_time) {
                self.rebalance = Some(notice_time);
                news.push(Interruption::Rebalance { notice_time });
            }
        }
        match notices.target_lifecycle_state.as_deref() {
            Some(state) if leaves_service(state) && self.asg.as_deref() != Some(state) => {
                self.asg = Some(state.to_owned());
                news.push(Interruption::AsgTerminating {
                    state: state.to_owned(),
                    deadline: now + ASG_ASSUMED_NOTICE,
                });
            }
            Some(ASG_IN_SERVICE) => self.asg = None,
            // Already reported; or Standby, Detached, absent: the instance
            // keeps running.
            _ => {}
        }
        news
    }
}

fn leaves_service(state: &str) -> bool {
    state == ASG_TERMINATED || state.starts_with(ASG_WARMED_PREFIX)
}

/// Rate limit for the failure warning.
#[derive(Debug, Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    /// Failures since the last warning that were not logged.
    suppressed: u64,
    /// Failures since the last success.
    failing: u64,
}

impl FailureLog {
    /// Records a failure; returns how many were suppressed before it when
    /// this one should be logged.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failing += 1;
        let due = self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= FAILURE_LOG_EVERY);
        if due {
            self.last_logged = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Records a success; returns how many polls had failed, if any.
    fn recovered(&mut self) -> Option<u64> {
        let failed = std::mem::take(&mut self.failing);
        self.last_logged = None;
        self.suppressed = 0;
        (failed > 0).then_some(failed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::super::Imds;
    use super::*;
    use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};

    /// Fast polling for tests; production uses [`POLL_INTERVAL`].
    const TEST_INTERVAL: Duration = Duration::from_millis(100);
    /// Long enough for many polls at [`TEST_INTERVAL`].
    const WAIT: Duration = Duration::from_secs(5);
    /// Enough polls at [`TEST_INTERVAL`] to see a repeat if there were one.
    const QUIET: Duration = Duration::from_millis(600);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn asg(state: &str) -> Notices {
        Notices {
            target_lifecycle_state: Some(state.to_owned()),
            ..Notices::default()
        }
    }

    #[test]
    fn spot_and_rebalance_are_reported_once_each() {
        let mut seen = Seen::default();
        let notices = Notices {
            spot_action: Some(SpotAction {
                action: "terminate".into(),
                time: at(1_000),
            }),
            rebalance: Some(at(900)),
            target_lifecycle_state: None,
        };
        assert_eq!(
            seen.news(&notices, at(950)),
            vec![
                Interruption::Spot {
                    action: "terminate".into(),
                    deadline: at(1_000)
                },
                Interruption::Rebalance {
                    notice_time: at(900)
                },
            ]
        );
        assert!(seen.news(&notices, at(952)).is_empty());
        // A notice that vanishes and comes back unchanged is the same one.
        assert!(seen.news(&Notices::default(), at(954)).is_empty());
        assert!(seen.news(&notices, at(956)).is_empty());
        // A changed notice is a new one.
        let mut later = notices.clone();
        later.rebalance = Some(at(2_000));
        assert_eq!(
            seen.news(&later, at(2_001)),
            vec![Interruption::Rebalance {
                notice_time: at(2_000)
            }]
        );
    }

    #[test]
    fn asg_states() {
        let now = at(10);
        let deadline = now + ASG_ASSUMED_NOTICE;
        for (state, reported) in [
            ("InService", false),
            ("Standby", false),
            ("Detached", false),
            ("Terminated", true),
            ("Warmed:Stopped", true),
            ("Warmed:Hibernated", true),
            ("Warmed:Running", true),
            ("Warmed:Terminated", true),
        ] {
            let news = Seen::default().news(&asg(state), now);
            let expected = if reported {
                vec![Interruption::AsgTerminating {
                    state: state.into(),
                    deadline,
                }]
            } else {
                vec![]
            };
            assert_eq!(news, expected, "{state}");
        }
    }

    #[test]
    fn asg_leaving_again_after_service_is_reported_again() {
        let mut seen = Seen::default();
        assert_eq!(seen.news(&asg("Warmed:Stopped"), at(1)).len(), 1);
        assert!(seen.news(&asg("Warmed:Stopped"), at(2)).is_empty());
        // A failed or absent read does not forget the state.
        assert!(seen.news(&Notices::default(), at(3)).is_empty());
        assert!(seen.news(&asg("Warmed:Stopped"), at(4)).is_empty());
        assert!(seen.news(&asg("InService"), at(5)).is_empty());
        assert_eq!(seen.news(&asg("Terminated"), at(6)).len(), 1);
        assert!(seen.news(&asg("Terminated"), at(7)).is_empty());
    }

    #[test]
    fn time_left() {
        let spot = Interruption::Spot {
            action: "terminate".into(),
            deadline: at(120),
        };
        assert_eq!(spot.time_left(at(100)), Some(Duration::from_secs(20)));
        assert_eq!(spot.time_left(at(200)), Some(Duration::ZERO));
        let rebalance = Interruption::Rebalance { notice_time: at(1) };
        assert_eq!(rebalance.time_left(at(0)), None);
    }

    #[test]
    fn failure_warnings_are_rate_limited() {
        let mut log = FailureLog::default();
        let start = Instant::now();
        assert_eq!(log.failed(start), Some(0));
        assert_eq!(log.failed(start + Duration::from_secs(2)), None);
        assert_eq!(log.failed(start + Duration::from_secs(4)), None);
        assert_eq!(log.failed(start + FAILURE_LOG_EVERY), Some(2));
        assert_eq!(log.recovered(), Some(4));
        assert_eq!(log.recovered(), None);
        // After a recovery the next failure is logged at once.
        assert_eq!(log.failed(start + FAILURE_LOG_EVERY), Some(0));
    }

    async fn watched() -> (ImdsStandIn, mpsc::Receiver<Interruption>, CancellationToken) {
        let standin = ImdsStandIn::start(InstanceSpec::default())
            .await
            .expect("stand-in starts");
        let imds = Imds::new(Some(&standin.url())).expect("valid endpoint");
        let cancel = CancellationToken::new();
        let rx = watch(imds, TEST_INTERVAL, cancel.clone());
        (standin, rx, cancel)
    }

    async fn next(rx: &mut mpsc::Receiver<Interruption>) -> Interruption {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an interruption within the wait")
            .expect("the watcher is running")
    }

    async fn assert_quiet(rx: &mut mpsc::Receiver<Interruption>) {
        if let Ok(event) = tokio::time::timeout(QUIET, rx.recv()).await {
            panic!("unexpected {event:?}");
        }
    }

    #[tokio::test]
    async fn spot_notice_is_sent_once_with_its_deadline() {
        let (standin, mut rx, cancel) = watched().await;
        assert_quiet(&mut rx).await;
        standin.set_spot_action("terminate", Duration::from_secs(120));
        let event = next(&mut rx).await;
        let Interruption::Spot { action, deadline } = &event else {
            panic!("expected a spot interruption, got {event:?}");
        };
        assert_eq!(action, "terminate");
        let left = event.time_left(SystemTime::now()).expect("has a deadline");
        assert!(
            left > Duration::from_secs(110) && left <= Duration::from_secs(120),
            "{left:?} until {deadline:?}"
        );
        assert_quiet(&mut rx).await;
        cancel.cancel();
        assert!(tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("stops")
            .is_none());
    }

    #[tokio::test]
    async fn rebalance_is_sent_once() {
        let (standin, mut rx, cancel) = watched().await;
        standin.set_rebalance();
        let event = next(&mut rx).await;
        assert!(matches!(event, Interruption::Rebalance { .. }), "{event:?}");
        assert_quiet(&mut rx).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn asg_termination_is_sent_and_in_service_is_not() {
        let (standin, mut rx, cancel) = watched().await;
        standin.set_target_lifecycle_state("InService");
        assert_quiet(&mut rx).await;
        standin.set_target_lifecycle_state("Terminated");
        let event = next(&mut rx).await;
        let Interruption::AsgTerminating { state, .. } = &event else {
            panic!("expected an auto scaling interruption, got {event:?}");
        };
        assert_eq!(state, "Terminated");
        let left = event.time_left(SystemTime::now()).expect("has a deadline");
        assert!(left <= ASG_ASSUMED_NOTICE && left > ASG_ASSUMED_NOTICE - Duration::from_secs(10));
        assert_quiet(&mut rx).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn expired_tokens_are_replaced_and_polling_goes_on() {
        let (standin, mut rx, cancel) = watched().await;
        assert_quiet(&mut rx).await;
        assert_eq!(standin.token_puts(), 1);
        standin.expire_tokens();
        standin.set_spot_action("hibernate", Duration::ZERO);
        let event = next(&mut rx).await;
        assert!(
            matches!(&event, Interruption::Spot { action, .. } if action == "hibernate"),
            "{event:?}"
        );
        assert!(standin.token_puts() >= 2, "{}", standin.token_puts());
        cancel.cancel();
    }

    #[tokio::test]
    async fn unreachable_service_is_retried_until_it_answers() {
        let address = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address")
        };
        let imds = Imds::new(Some(&format!("http://{address}"))).expect("valid endpoint");
        let cancel = CancellationToken::new();
        let mut rx = watch(imds, TEST_INTERVAL, cancel.clone());
        // Several polls fail; none of them is an interruption.
        assert_quiet(&mut rx).await;
        let standin = ImdsStandIn::start_at(InstanceSpec::default(), address)
            .await
            .expect("stand-in starts on the same port");
        standin.set_rebalance();
        let event = next(&mut rx).await;
        assert!(matches!(event, Interruption::Rebalance { .. }), "{event:?}");
        cancel.cancel();
    }
}
