//! The lease state machine: where each held job is, as plain data. No I/O.
//!
//! A job moves `Queued → Assigned(agent, attempt) → Running(agent, attempt) →
//! Finished`; losing its agent moves it back to `Queued` with `attempt + 1`.
//! Every event names the attempt it is about, and an event for any attempt
//! but the current one is refused as stale: that is the fence that keeps a
//! superseded attempt from ever reporting.
//!
//! [`Lease`] keeps its attempt and state private: the only ways to move it
//! are [`Lease::apply`], which checks the fence, and [`Lease::restore`],
//! which takes what the lease book says. [`book::LeaseBook`] is the state
//! machine of every held job and connected agent built on it: inputs in,
//! effects out, no I/O and no clock of its own.
//!
//! Not responsible for persistence or for talking to GitLab or agents (the
//! `core` carries out the book's effects).

pub mod book;

use crate::store::LeaseRecord;

/// Where a held job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Waiting for an agent with a free slot.
    Queued,
    /// Sent to an agent that has not acknowledged it yet.
    Assigned { agent: String },
    /// The agent started it.
    Running { agent: String },
    /// The result is known; the final GitLab update is under way.
    Finished,
}

impl LeaseState {
    /// Short name for status displays.
    pub fn name(&self) -> &'static str {
        match self {
            LeaseState::Queued => "queued",
            LeaseState::Assigned { .. } => "assigned",
            LeaseState::Running { .. } => "running",
            LeaseState::Finished => "finished",
        }
    }

    /// The agent holding the current attempt, if any.
    pub fn agent(&self) -> Option<&str> {
        match self {
            LeaseState::Assigned { agent } | LeaseState::Running { agent } => Some(agent),
            _ => None,
        }
    }
}

/// Something that happened to a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Assign {
        agent: String,
    },
    Started {
        agent: String,
        attempt: u32,
    },
    Finished {
        agent: String,
        attempt: u32,
    },
    /// The agent refused the assignment before starting it: queue the same
    /// attempt again (it never ran, so it costs no attempt).
    Refused {
        agent: String,
        attempt: u32,
    },
    /// The agent went away while holding the attempt; run it again elsewhere.
    Lost {
        attempt: u32,
    },
    /// The attempt was lost and the job ends with it (it used all its
    /// attempts, or it opted out of re-runs).
    GiveUp {
        attempt: u32,
    },
}

/// Why an event was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "event for attempt {got} but the job is on attempt {current}: stale attempt fenced off"
    )]
    StaleAttempt { got: u32, current: u32 },
    #[error("event from agent {got} but attempt is held by {holder}")]
    WrongAgent { got: String, holder: String },
    #[error("event {event} does not apply to a job that is {state}")]
    Invalid {
        event: &'static str,
        state: &'static str,
    },
    #[error("job has used all {max} attempts")]
    AttemptsExhausted { max: u32 },
}

/// One held job's lease. Its fields are private so that nothing moves it
/// past the attempt fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    attempt: u32,
    state: LeaseState,
    max_attempts: u32,
}

impl Lease {
    /// A freshly taken job: queued, first attempt.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            attempt: 1,
            state: LeaseState::Queued,
            max_attempts: max_attempts.max(1),
        }
    }

    /// A job as the lease book had it before a restart: finished if its
    /// result is known, else still with the agent that had it (which may
    /// come back and report it), else queued.
    pub fn restore(max_attempts: u32, record: &LeaseRecord, finished: bool) -> Self {
        let state = match (&record.agent, finished) {
            (_, true) => LeaseState::Finished,
            (Some(agent), false) => LeaseState::Running {
                agent: agent.clone(),
            },
            (None, false) => LeaseState::Queued,
        };
        Self {
            attempt: record.attempt.max(1),
            state,
            max_attempts: max_attempts.max(1),
        }
    }

    /// The current attempt: the only one whose events are accepted.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn state(&self) -> &LeaseState {
        &self.state
    }

    /// What the lease book keeps of this lease.
    pub fn record(&self) -> LeaseRecord {
        LeaseRecord {
            attempt: self.attempt,
            agent: self.state.agent().map(str::to_owned),
        }
    }

    /// Whether `agent` holds `attempt` and it is the current one.
    pub fn held_by(&self, attempt: u32, agent: &str) -> bool {
        self.attempt == attempt && self.state.agent() == Some(agent)
    }

    /// Applies an event, or says why it does not apply (leaving the lease as
    /// it was).
    ///
    /// # Errors
    /// Stale attempts, events from an agent that does not hold the attempt,
    /// events that make no sense in the current state, and a lost attempt
    /// when no attempts are left.
    pub fn apply(&mut self, event: LeaseEvent) -> Result<(), LeaseError> {
        let state_name = self.state.name();
        match (&self.state, event) {
            (LeaseState::Queued, LeaseEvent::Assign { agent }) => {
                self.state = LeaseState::Assigned { agent };
            }
            (
                LeaseState::Assigned { agent: holder } | LeaseState::Running { agent: holder },
                LeaseEvent::Started { agent, attempt },
            ) => {
                self.check(attempt, holder, &agent)?;
                self.state = LeaseState::Running { agent };
            }
            (
                LeaseState::Assigned { agent: holder } | LeaseState::Running { agent: holder },
                LeaseEvent::Finished { agent, attempt },
            ) => {
                self.check(attempt, holder, &agent)?;
                self.state = LeaseState::Finished;
            }
            (LeaseState::Assigned { agent: holder }, LeaseEvent::Refused { agent, attempt }) => {
                self.check(attempt, holder, &agent)?;
                self.state = LeaseState::Queued;
            }
            (
                LeaseState::Assigned { .. } | LeaseState::Running { .. },
                LeaseEvent::Lost { attempt },
            ) => {
                if attempt != self.attempt {
                    return Err(LeaseError::StaleAttempt {
                        got: attempt,
                        current: self.attempt,
                    });
                }
                if self.attempt >= self.max_attempts {
                    return Err(LeaseError::AttemptsExhausted {
                        max: self.max_attempts,
                    });
                }
                self.attempt += 1;
                self.state = LeaseState::Queued;
            }
            (
                LeaseState::Assigned { .. } | LeaseState::Running { .. },
                LeaseEvent::GiveUp { attempt },
            ) if attempt == self.attempt => {
                self.state = LeaseState::Finished;
            }
            (_, event) => {
                let event = match event {
                    LeaseEvent::Assign { .. } => "assign",
                    LeaseEvent::Started { attempt, .. }
                    | LeaseEvent::Finished { attempt, .. }
                    | LeaseEvent::Refused { attempt, .. }
                    | LeaseEvent::Lost { attempt }
                    | LeaseEvent::GiveUp { attempt }
                        if attempt != self.attempt =>
                    {
                        return Err(LeaseError::StaleAttempt {
                            got: attempt,
                            current: self.attempt,
                        })
                    }
                    LeaseEvent::Started { .. } => "started",
                    LeaseEvent::Finished { .. } => "finished",
                    LeaseEvent::Refused { .. } => "refused",
                    LeaseEvent::Lost { .. } => "lost",
                    LeaseEvent::GiveUp { .. } => "give up",
                };
                return Err(LeaseError::Invalid {
                    event,
                    state: state_name,
                });
            }
        }
        Ok(())
    }

    fn check(&self, attempt: u32, holder: &str, agent: &str) -> Result<(), LeaseError> {
        if attempt != self.attempt {
            return Err(LeaseError::StaleAttempt {
                got: attempt,
                current: self.attempt,
            });
        }
        if holder != agent {
            return Err(LeaseError::WrongAgent {
                got: agent.to_owned(),
                holder: holder.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(a: &str) -> LeaseEvent {
        LeaseEvent::Assign { agent: a.into() }
    }
    fn started(a: &str, n: u32) -> LeaseEvent {
        LeaseEvent::Started {
            agent: a.into(),
            attempt: n,
        }
    }
    fn finished(a: &str, n: u32) -> LeaseEvent {
        LeaseEvent::Finished {
            agent: a.into(),
            attempt: n,
        }
    }

    #[test]
    fn happy_path() {
        let mut l = Lease::new(3);
        l.apply(assign("a")).unwrap();
        l.apply(started("a", 1)).unwrap();
        l.apply(finished("a", 1)).unwrap();
        assert_eq!(l.state, LeaseState::Finished);
    }

    #[test]
    fn lost_attempt_requeues_and_fences_the_old_one() {
        let mut l = Lease::new(3);
        l.apply(assign("a")).unwrap();
        l.apply(started("a", 1)).unwrap();
        l.apply(LeaseEvent::Lost { attempt: 1 }).unwrap();
        assert_eq!((l.attempt, &l.state), (2, &LeaseState::Queued));
        l.apply(assign("b")).unwrap();
        // The old agent comes back and reports its attempt: refused.
        assert_eq!(
            l.apply(finished("a", 1)),
            Err(LeaseError::StaleAttempt { got: 1, current: 2 })
        );
        // Another agent cannot speak for b's attempt.
        assert!(matches!(
            l.apply(started("c", 2)),
            Err(LeaseError::WrongAgent { .. })
        ));
        l.apply(started("b", 2)).unwrap();
        l.apply(finished("b", 2)).unwrap();
        // Nothing after the end.
        assert!(l.apply(finished("b", 2)).is_err());
        assert_eq!(l.state, LeaseState::Finished);
    }

    #[test]
    fn refusal_requeues_the_same_attempt_and_only_from_the_holder() {
        let mut l = Lease::new(1);
        l.apply(assign("a")).unwrap();
        assert!(matches!(
            l.apply(LeaseEvent::Refused {
                agent: "b".into(),
                attempt: 1
            }),
            Err(LeaseError::WrongAgent { .. })
        ));
        l.apply(LeaseEvent::Refused {
            agent: "a".into(),
            attempt: 1,
        })
        .unwrap();
        assert_eq!((l.attempt, &l.state), (1, &LeaseState::Queued));
        // A started job cannot be refused any more.
        l.apply(assign("b")).unwrap();
        l.apply(started("b", 1)).unwrap();
        assert!(l
            .apply(LeaseEvent::Refused {
                agent: "b".into(),
                attempt: 1
            })
            .is_err());
    }

    #[test]
    fn attempts_run_out() {
        let mut l = Lease::new(2);
        l.apply(assign("a")).unwrap();
        l.apply(LeaseEvent::Lost { attempt: 1 }).unwrap();
        l.apply(assign("b")).unwrap();
        assert_eq!(
            l.apply(LeaseEvent::Lost { attempt: 2 }),
            Err(LeaseError::AttemptsExhausted { max: 2 })
        );
    }

    #[test]
    fn table_of_invalid_events() {
        let cases: Vec<(LeaseState, LeaseEvent)> = vec![
            (LeaseState::Queued, started("a", 1)),
            (LeaseState::Queued, finished("a", 1)),
            (LeaseState::Queued, LeaseEvent::Lost { attempt: 1 }),
            (LeaseState::Assigned { agent: "a".into() }, assign("b")),
            (LeaseState::Finished, assign("a")),
            (LeaseState::Finished, LeaseEvent::Lost { attempt: 1 }),
            (LeaseState::Queued, LeaseEvent::GiveUp { attempt: 1 }),
            (
                LeaseState::Running { agent: "a".into() },
                LeaseEvent::GiveUp { attempt: 2 },
            ),
        ];
        for (state, event) in cases {
            let agent = state.agent().map(str::to_owned);
            let record = LeaseRecord { attempt: 1, agent };
            let mut l = Lease::restore(3, &record, state == LeaseState::Finished);
            if let LeaseState::Assigned { agent } = &state {
                // Restored leases are running; reach Assigned the usual way.
                l = Lease::new(3);
                l.apply(assign(agent)).unwrap();
            }
            assert!(
                l.apply(event.clone()).is_err(),
                "{state:?} + {event:?} should be refused"
            );
            assert_eq!(l.state, state, "a refused event leaves the lease unchanged");
        }
    }
}
