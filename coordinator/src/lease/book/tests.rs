//! Table tests of the lease book: each scenario is a list of inputs, each
//! with the time it happens and the effects it must produce, in order.
//! Time is injected, nothing sleeps, nothing is sent anywhere.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::agent::{
    agent_message::Msg, coordinator_message, AgentMessage, AttemptRef, CancelMode, Draining,
    Finished, InstanceFacts, Interrupting, Pull, Rejected, Started,
};
use servitor_proto::job::{JobPayload, JobVariable};
use tokio::time::Instant;

use super::*;

fn payload(id: i64) -> (Arc<JobPayload>, Bytes) {
    let payload = JobPayload {
        id,
        token: "t".into(),
        ..JobPayload::default()
    };
    (Arc::new(payload), Bytes::from_static(b"{}"))
}

/// The runner of the tests that use one.
const RUNNER: &str = "default";

fn hold(id: i64) -> Input {
    hold_for(id, RUNNER)
}

fn hold_for(id: i64, runner: &str) -> Input {
    let (payload, raw) = payload(id);
    Input::Hold {
        payload,
        raw,
        runner: runner.into(),
    }
}

fn restore(id: i64, attempt: u32, agent: Option<&str>, finished: bool) -> Input {
    let (payload, raw) = payload(id);
    Input::Restore {
        payload,
        raw,
        runner: RUNNER.into(),
        lease: LeaseRecord {
            attempt,
            agent: agent.map(str::to_owned),
        },
        finished,
    }
}

fn hello(agent: &str, instance: &str, free: u32) -> AgentHello {
    AgentHello {
        agent: agent.into(),
        runner: RUNNER.into(),
        only_job: None,
        instance: InstanceFacts {
            instance_id: instance.into(),
            ..InstanceFacts::default()
        },
        executor: "shell".into(),
        capacity: free.max(1),
        free_slots: free,
        running: Vec::new(),
        reporting: Vec::new(),
        remote: "127.0.0.1:1".parse().expect("address"),
    }
}

fn connect(agent: &str, free: u32) -> Input {
    Input::Connected(hello(agent, "", free))
}

fn message(agent: &str, session: u64, msg: Msg) -> Input {
    Input::Message {
        agent: agent.into(),
        session,
        message: AgentMessage { msg: Some(msg) },
    }
}

fn pull(agent: &str, session: u64, free: u32) -> Input {
    message(agent, session, Msg::Pull(Pull { free_slots: free }))
}

fn started(agent: &str, session: u64, job: i64, attempt: u32) -> Input {
    message(
        agent,
        session,
        Msg::Started(Started {
            attempt: Some(AttemptRef::new(job, attempt)),
        }),
    )
}

fn finished(agent: &str, session: u64, job: i64, attempt: u32) -> Input {
    message(
        agent,
        session,
        Msg::Finished(Finished {
            attempt: Some(AttemptRef::new(job, attempt)),
            exit_code: Some(0),
            ..Finished::default()
        }),
    )
}

fn lost(agent: &str, session: u64) -> Input {
    Input::Lost {
        agent: agent.into(),
        session,
        reason: "gone".into(),
    }
}

/// "7/1" for job 7, attempt 1.
fn short(attempt: Option<AttemptRef>) -> String {
    attempt.map_or_else(|| "?".into(), |a| format!("{}/{}", a.job_id, a.attempt))
}

/// One effect in a line a person reads: what the table compares.
fn line(effect: &Effect) -> String {
    match effect {
        Effect::Persist(change) => match change {
            Change::Hold { job_id, .. } => format!("persist hold {job_id}"),
            Change::Lease { job_id, lease } => format!(
                "persist lease {job_id} attempt {} agent {}",
                lease.attempt,
                lease.agent.as_deref().unwrap_or("-")
            ),
            Change::Result { job_id, .. } => format!("persist result {job_id}"),
            Change::Remove { job_id } => format!("persist remove {job_id}"),
            Change::Append { job_id, .. } => format!("persist append {job_id}"),
            Change::Spend { .. } => "persist spend".into(),
        },
        Effect::Event { job_id, event } => match event {
            JobEvent::Assigned { attempt, agent, .. } => {
                format!("event {job_id} assigned {attempt} to {agent}")
            }
            JobEvent::Started { attempt } => format!("event {job_id} started {attempt}"),
            JobEvent::Finished { attempt, .. } => format!("event {job_id} finished {attempt}"),
            JobEvent::Lost { attempt, next, .. } => {
                format!("event {job_id} lost {attempt} {next:?}")
            }
            JobEvent::Notice(_) => format!("event {job_id} notice"),
            JobEvent::Refused { reason } => format!("event {job_id} refused: {reason}"),
            JobEvent::Output { .. } | JobEvent::OutputEnd { .. } => {
                format!("event {job_id} output")
            }
        },
        Effect::Send {
            agent,
            session,
            message,
        } => {
            let what = match &message.msg {
                Some(coordinator_message::Msg::Assign(a)) => {
                    format!("assign {}", short(a.attempt))
                }
                Some(coordinator_message::Msg::Cancel(c)) => {
                    format!("cancel {} {}", short(c.attempt), c.mode().as_str_name())
                }
                Some(coordinator_message::Msg::Ack(a)) => {
                    format!("ack {}", short(a.attempt))
                }
                Some(coordinator_message::Msg::Drain(d)) => {
                    format!("drain exit_when_idle={}", d.exit_when_idle)
                }
                other => format!("{other:?}"),
            };
            format!("send {agent}#{session} {what}")
        }
        Effect::Count(metric) => match metric {
            Metric::QueueWait(d) => format!("count queue-wait {}s", d.as_secs()),
            Metric::Rerun => "count rerun".into(),
            Metric::SpotInterruption => "count spot-interruption".into(),
        },
    }
}

/// Feeds each input at its second and compares its effects with the table.
fn play(book: &mut LeaseBook, steps: Vec<(u64, Input, Vec<&str>)>) -> Vec<Reply> {
    let t0 = Instant::now();
    let mut replies = Vec::new();
    for (i, (at, input, want)) in steps.into_iter().enumerate() {
        let shown = format!("{input:?}");
        let step = book.handle(t0 + Duration::from_secs(at), input);
        let got: Vec<String> = step.effects.iter().map(line).collect();
        assert_eq!(got, want, "step {i} at {at}s: {shown}");
        replies.push(step.reply);
    }
    replies
}

#[test]
fn never_assigns_more_than_asked() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(1),
                vec![
                    "persist hold 1",
                    "count queue-wait 0s",
                    "persist lease 1 attempt 1 agent a",
                    "event 1 assigned 1 to a",
                    "send a#1 assign 1/1",
                ],
            ),
            (1, hold(2), vec!["persist hold 2"]),
            (1, hold(3), vec!["persist hold 3"]),
            // A repeated pull before the agent acknowledged adds no credit.
            (2, pull("a", 1, 1), vec![]),
            // Started spends the slot of the earlier pull: nothing more yet.
            (3, started("a", 1, 1, 1), vec!["event 1 started 1"]),
            // A pull with a free slot again: the next job, which waited 4 s.
            (
                5,
                pull("a", 1, 1),
                vec![
                    "count queue-wait 4s",
                    "persist lease 2 attempt 1 agent a",
                    "event 2 assigned 1 to a",
                    "send a#1 assign 2/1",
                ],
            ),
        ],
    );
    assert_eq!(book.demand(RUNNER), 3);
}

/// Two runners, each with its fleet: a job runs only on an agent of the
/// runner that took it, and a job waiting for its runner's agents holds up
/// none of the other runner's jobs queued behind it.
#[test]
fn jobs_run_only_on_their_runners_agents() {
    let mut book = LeaseBook::new(3);
    let connect_to = |agent: &str, runner: &str| {
        Input::Connected(AgentHello {
            runner: runner.into(),
            ..hello(agent, "", 1)
        })
    };
    play(
        &mut book,
        vec![
            (0, connect_to("small-1", "small"), vec![]),
            // The large runner has no agent yet: its job waits...
            (0, hold_for(1, "large"), vec!["persist hold 1"]),
            // ...and the small runner's job behind it goes to its own agent.
            (
                1,
                hold_for(2, "small"),
                vec![
                    "persist hold 2",
                    "count queue-wait 0s",
                    "persist lease 2 attempt 1 agent small-1",
                    "event 2 assigned 1 to small-1",
                    "send small-1#1 assign 2/1",
                ],
            ),
            // A free agent of another runner never takes it.
            (2, connect_to("small-2", "small"), vec![]),
            (
                3,
                connect_to("large-1", "large"),
                vec![
                    "count queue-wait 3s",
                    "persist lease 1 attempt 1 agent large-1",
                    "event 1 assigned 1 to large-1",
                    "send large-1#3 assign 1/1",
                ],
            ),
        ],
    );
    assert_eq!(book.demand("large"), 1);
    assert_eq!(book.demand("small"), 1);
    assert_eq!(book.demand("fargate"), 0);
    let runners: Vec<(String, String)> = book
        .jobs(Instant::now())
        .into_iter()
        .map(|j| (j.runner, j.agent.unwrap_or_default()))
        .collect();
    assert_eq!(
        runners,
        vec![
            ("large".to_owned(), "large-1".to_owned()),
            ("small".to_owned(), "small-1".to_owned())
        ]
    );
}

/// The agent of a task started for one job takes that job and no other,
/// even when another job of its runner waits ahead of it.
#[test]
fn an_agent_bound_to_a_job_takes_only_that_job() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, hold(1), vec!["persist hold 1"]),
            (0, hold(2), vec!["persist hold 2"]),
            (
                1,
                Input::Connected(AgentHello {
                    only_job: Some(2),
                    ..hello("task-2", "", 1)
                }),
                vec![
                    "count queue-wait 1s",
                    "persist lease 2 attempt 1 agent task-2",
                    "event 2 assigned 1 to task-2",
                    "send task-2#1 assign 2/1",
                ],
            ),
            // Done with its job and free again: job 1 is not its to take.
            (2, started("task-2", 1, 2, 1), vec!["event 2 started 1"]),
            (3, pull("task-2", 1, 1), vec![]),
        ],
    );
    assert_eq!(book.demand(RUNNER), 2);
}

/// A queued job its runner cannot run leaves the queue and fails with the
/// reason; one an agent already has is not taken from it.
#[test]
fn a_refused_job_leaves_the_queue_with_its_reason() {
    let mut book = LeaseBook::new(3);
    let refuse = |job_id| Input::Refuse {
        job_id,
        reason: "no such size".into(),
    };
    let replies = play(
        &mut book,
        vec![
            (0, hold(1), vec!["persist hold 1"]),
            (0, refuse(1), vec!["event 1 refused: no such size"]),
            (1, connect("a", 1), vec![]),
            (
                1,
                hold(2),
                vec![
                    "persist hold 2",
                    "count queue-wait 0s",
                    "persist lease 2 attempt 1 agent a",
                    "event 2 assigned 1 to a",
                    "send a#1 assign 2/1",
                ],
            ),
            (2, refuse(2), vec![]),
        ],
    );
    assert_eq!(replies[1], Reply::Applied(true));
    assert_eq!(replies[4], Reply::Applied(false));
}

#[test]
fn the_agent_with_most_credit_goes_first() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (0, connect("b", 2), vec![]),
            (
                0,
                hold(1),
                vec![
                    "persist hold 1",
                    "count queue-wait 0s",
                    "persist lease 1 attempt 1 agent b",
                    "event 1 assigned 1 to b",
                    "send b#2 assign 1/1",
                ],
            ),
            // Credit now ties at one each: the name decides.
            (
                0,
                hold(2),
                vec![
                    "persist hold 2",
                    "count queue-wait 0s",
                    "persist lease 2 attempt 1 agent a",
                    "event 2 assigned 1 to a",
                    "send a#1 assign 2/1",
                ],
            ),
        ],
    );
}

#[test]
fn a_tie_goes_to_the_lowest_name_whatever_order_agents_came_in() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("c", 1), vec![]),
            (0, connect("b", 1), vec![]),
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(1),
                vec![
                    "persist hold 1",
                    "count queue-wait 0s",
                    "persist lease 1 attempt 1 agent a",
                    "event 1 assigned 1 to a",
                    "send a#3 assign 1/1",
                ],
            ),
            (
                0,
                hold(2),
                vec![
                    "persist hold 2",
                    "count queue-wait 0s",
                    "persist lease 2 attempt 1 agent b",
                    "event 2 assigned 1 to b",
                    "send b#2 assign 2/1",
                ],
            ),
        ],
    );
}

#[test]
fn lost_agent_requeues_to_another_and_fences_the_old() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (1, started("a", 1, 7, 1), vec!["event 7 started 1"]),
            (
                2,
                Input::Disconnected {
                    agent: "a".into(),
                    session: 1,
                },
                vec![],
            ),
            (
                10,
                lost("a", 1),
                vec![
                    "count rerun",
                    "persist lease 7 attempt 2 agent -",
                    "event 7 lost 1 Requeued",
                ],
            ),
            (
                11,
                connect("b", 1),
                vec![
                    "count queue-wait 1s",
                    "persist lease 7 attempt 2 agent b",
                    "event 7 assigned 2 to b",
                    "send b#2 assign 7/2",
                ],
            ),
        ],
    );
    assert!(book.accepts_output("b", AttemptRef::new(7, 2)));
    assert!(!book.accepts_output("a", AttemptRef::new(7, 1)));
    // The old agent comes back and reports its attempt: acknowledged so it
    // forgets it, but nothing reaches the job or the lease book.
    play(
        &mut book,
        vec![
            (12, connect("a", 0), vec![]),
            (13, finished("a", 3, 7, 1), vec!["send a#3 ack 7/1"]),
            // And a stale start is stopped.
            (
                13,
                started("a", 3, 7, 1),
                vec!["send a#3 cancel 7/1 CANCEL_MODE_ABORT"],
            ),
        ],
    );
}

#[test]
fn a_result_is_persisted_before_its_ack_and_reported_once() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (1, started("a", 1, 7, 1), vec!["event 7 started 1"]),
            (
                5,
                finished("a", 1, 7, 1),
                vec!["persist result 7", "send a#1 ack 7/1", "event 7 finished 1"],
            ),
            // Sent again after a reconnect: acknowledged, not reported twice.
            (6, finished("a", 1, 7, 1), vec!["send a#1 ack 7/1"]),
            (7, Input::Release { job_id: 7 }, vec!["persist remove 7"]),
        ],
    );
    assert_eq!(book.demand(RUNNER), 0);
    let agents = book.agents(Instant::now());
    assert_eq!(agents[0].busy, 0, "the finished attempt freed its slot");
}

#[test]
fn restored_attempt_the_agent_no_longer_has_runs_again_unless_it_reports_it() {
    let mut book = LeaseBook::new(3);
    let mut a = hello("a", "", 0);
    a.reporting = vec![AttemptRef::new(2, 1)];
    a.running = vec![AttemptRef::new(3, 1)];
    play(
        &mut book,
        vec![
            (0, restore(1, 1, Some("a"), false), vec![]),
            (0, restore(2, 1, Some("a"), false), vec![]),
            (0, restore(3, 1, Some("a"), false), vec![]),
            // Job 1: the agent neither runs nor reports it: lost, queued
            // again. Job 2: its result is on the way. Job 3: still running.
            (
                1,
                Input::Connected(a),
                vec![
                    "count rerun",
                    "persist lease 1 attempt 2 agent -",
                    "event 1 lost 1 Requeued",
                ],
            ),
        ],
    );
    assert!(book.accepts_output("a", AttemptRef::new(3, 1)));
}

#[test]
fn restored_attempts_whose_agent_stays_away_expire_and_finished_ones_stay() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, restore(1, 2, Some("gone"), false), vec![]),
            (0, restore(2, 1, Some("gone"), true), vec![]),
            (0, restore(3, 1, None, false), vec![]),
            (
                60,
                Input::ExpireMissing {
                    reason: "grace over".into(),
                },
                vec![
                    "count rerun",
                    "persist lease 1 attempt 3 agent -",
                    "event 1 lost 2 Requeued",
                ],
            ),
            // Queued since the restart at 0 s: job 3 first, then job 1,
            // queued again at 60 s.
            (
                61,
                connect("b", 2),
                vec![
                    "count queue-wait 61s",
                    "persist lease 3 attempt 1 agent b",
                    "event 3 assigned 1 to b",
                    "send b#1 assign 3/1",
                    "count queue-wait 1s",
                    "persist lease 1 attempt 3 agent b",
                    "event 1 assigned 3 to b",
                    "send b#1 assign 1/3",
                ],
            ),
        ],
    );
    assert_eq!(book.demand(RUNNER), 2, "the finished job needs no slot");
}

#[test]
fn reconnecting_agent_keeps_its_attempt_and_stale_ones_are_named() {
    let mut book = LeaseBook::new(3);
    let mut again = hello("a", "", 0);
    again.running = vec![AttemptRef::new(7, 1), AttemptRef::new(99, 4)];
    let replies = play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (
                1,
                Input::Disconnected {
                    agent: "a".into(),
                    session: 1,
                },
                vec![],
            ),
            (2, Input::Connected(again), vec![]),
            // The old session's grace timer fires: nothing is lost.
            (30, lost("a", 1), vec![]),
        ],
    );
    assert_eq!(
        replies[3],
        Reply::Connected {
            session: 2,
            stale: vec![AttemptRef::new(99, 4)]
        }
    );
    assert_eq!(replies[4], Reply::Applied(false));
    assert!(book.accepts_output("a", AttemptRef::new(7, 1)));
}

#[test]
fn an_interruption_hands_the_attempts_back_and_dooms_the_instance() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, Input::Connected(hello("a", "i-1", 2)), vec![]),
            (
                0,
                hold(1),
                vec![
                    "persist hold 1",
                    "count queue-wait 0s",
                    "persist lease 1 attempt 1 agent a",
                    "event 1 assigned 1 to a",
                    "send a#1 assign 1/1",
                ],
            ),
            (
                0,
                hold(2),
                vec![
                    "persist hold 2",
                    "count queue-wait 0s",
                    "persist lease 2 attempt 1 agent a",
                    "event 2 assigned 1 to a",
                    "send a#1 assign 2/1",
                ],
            ),
            (1, started("a", 1, 1, 1), vec!["event 1 started 1"]),
            (
                5,
                message(
                    "a",
                    1,
                    Msg::Interrupting(Interrupting {
                        reason: "spot notice".into(),
                        ..Interrupting::default()
                    }),
                ),
                vec![
                    "count spot-interruption",
                    "send a#1 cancel 1/1 CANCEL_MODE_ABORT",
                    "send a#1 cancel 2/1 CANCEL_MODE_ABORT",
                    "count rerun",
                    "persist lease 1 attempt 2 agent -",
                    "event 1 lost 1 Requeued",
                    "count rerun",
                    "persist lease 2 attempt 2 agent -",
                    "event 2 lost 1 Requeued",
                ],
            ),
            // The interrupted agent asks for work again: it gets none.
            (6, pull("a", 1, 2), vec![]),
            (
                7,
                connect("b", 1),
                vec![
                    "count queue-wait 2s",
                    "persist lease 1 attempt 2 agent b",
                    "event 1 assigned 2 to b",
                    "send b#2 assign 1/2",
                ],
            ),
        ],
    );
    let t0 = Instant::now();
    assert!(book.doomed_instances(t0).contains("i-1"));
    // Remembered for a day after the notice, then forgotten.
    assert!(book
        .doomed_instances(t0 + Duration::from_secs(25 * 3600))
        .is_empty());
}

#[test]
fn a_draining_agent_takes_no_more_work() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, Input::Connected(hello("a", "i-1", 1)), vec![]),
            (
                0,
                message(
                    "a",
                    1,
                    Msg::Draining(Draining {
                        reason: "SIGTERM".into(),
                    }),
                ),
                vec![],
            ),
            (1, hold(1), vec!["persist hold 1"]),
        ],
    );
    assert!(book.doomed_instances(Instant::now()).contains("i-1"));
}

#[test]
fn a_refusal_queues_the_same_attempt_again_for_another_agent() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            // The refusal spends a's credit: it is not offered the job again.
            (
                1,
                message(
                    "a",
                    1,
                    Msg::Rejected(Rejected {
                        attempt: Some(AttemptRef::new(7, 1)),
                        reason: "image not allowed".into(),
                    }),
                ),
                vec!["persist lease 7 attempt 1 agent -"],
            ),
            (
                2,
                connect("b", 1),
                vec![
                    "count queue-wait 2s",
                    "persist lease 7 attempt 1 agent b",
                    "event 7 assigned 1 to b",
                    "send b#2 assign 7/1",
                ],
            ),
        ],
    );
}

#[test]
fn a_job_that_opts_out_of_reruns_fails_at_its_first_loss() {
    let mut book = LeaseBook::new(3);
    let (payload, raw) = payload(7);
    let mut opted_out = (*payload).clone();
    opted_out.variables.push(JobVariable {
        key: RERUN_VARIABLE.into(),
        value: "false".into(),
        ..JobVariable::default()
    });
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                Input::Hold {
                    payload: Arc::new(opted_out),
                    raw,
                    runner: RUNNER.into(),
                },
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (5, lost("a", 1), vec!["event 7 lost 1 NoRerun"]),
            (6, connect("b", 1), vec![]),
        ],
    );
    assert_eq!(book.demand(RUNNER), 0);
}

#[test]
fn a_job_fails_once_its_attempts_run_out() {
    let mut book = LeaseBook::new(2);
    play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (
                1,
                lost("a", 1),
                vec![
                    "count rerun",
                    "persist lease 7 attempt 2 agent -",
                    "event 7 lost 1 Requeued",
                ],
            ),
            (
                2,
                connect("b", 1),
                vec![
                    "count queue-wait 1s",
                    "persist lease 7 attempt 2 agent b",
                    "event 7 assigned 2 to b",
                    "send b#2 assign 7/2",
                ],
            ),
            (3, lost("b", 2), vec!["event 7 lost 2 Exhausted"]),
        ],
    );
    assert_eq!(book.demand(RUNNER), 0);
}

#[test]
fn releasing_a_running_job_aborts_it_and_cancel_reaches_its_agent() {
    let mut book = LeaseBook::new(3);
    let replies = play(
        &mut book,
        vec![
            (0, connect("a", 1), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (
                1,
                Input::Cancel {
                    job_id: 7,
                    mode: CancelMode::Graceful,
                    reason: "canceled in GitLab".into(),
                },
                vec!["send a#1 cancel 7/1 CANCEL_MODE_GRACEFUL"],
            ),
            (2, hold(8), vec!["persist hold 8"]),
            (3, Input::Unqueue { job_id: 8 }, vec![]),
            (4, Input::Unqueue { job_id: 7 }, vec![]),
            (
                5,
                Input::Release { job_id: 7 },
                vec!["persist remove 7", "send a#1 cancel 7/1 CANCEL_MODE_ABORT"],
            ),
        ],
    );
    assert_eq!(replies[2], Reply::Applied(true));
    assert_eq!(replies[4], Reply::Applied(true), "job 8 was queued");
    assert_eq!(replies[5], Reply::Applied(false), "job 7 was not");
}

#[test]
fn drain_if_idle_leaves_a_busy_instance_alone() {
    let mut book = LeaseBook::new(3);
    let drain = |only_idle| Input::Drain {
        instance: "i-1".into(),
        exit_when_idle: true,
        reason: "scale in".into(),
        only_idle,
    };
    let replies = play(
        &mut book,
        vec![
            (0, Input::Connected(hello("a", "i-1", 1)), vec![]),
            (
                0,
                hold(7),
                vec![
                    "persist hold 7",
                    "count queue-wait 0s",
                    "persist lease 7 attempt 1 agent a",
                    "event 7 assigned 1 to a",
                    "send a#1 assign 7/1",
                ],
            ),
            (1, drain(true), vec![]),
            (
                2,
                finished("a", 1, 7, 1),
                vec!["persist result 7", "send a#1 ack 7/1", "event 7 finished 1"],
            ),
            (3, drain(true), vec!["send a#1 drain exit_when_idle=true"]),
            (
                4,
                Input::Drain {
                    instance: "i-2".into(),
                    exit_when_idle: false,
                    reason: "scale in".into(),
                    only_idle: true,
                },
                vec![],
            ),
        ],
    );
    assert_eq!(replies[2], Reply::Drained(Drained::Busy));
    assert_eq!(replies[4], Reply::Drained(Drained::Yes));
    assert_eq!(replies[5], Reply::Drained(Drained::NoAgent));
}

#[test]
fn waiting_jobs_are_told_once_why() {
    let mut book = LeaseBook::new(3);
    let notify = || Input::NotifyWaiting {
        runner: RUNNER.into(),
        text: "waiting for budget".into(),
    };
    play(
        &mut book,
        vec![
            (0, hold(1), vec!["persist hold 1"]),
            (1, notify(), vec!["event 1 notice"]),
            (2, notify(), vec![]),
        ],
    );
}

#[test]
fn messages_from_an_old_session_are_ignored() {
    let mut book = LeaseBook::new(3);
    play(
        &mut book,
        vec![
            (0, connect("a", 0), vec![]),
            (1, connect("a", 0), vec![]),
            (2, hold(1), vec!["persist hold 1"]),
            // Session 1 is gone: its pull gives it nothing.
            (3, pull("a", 1, 1), vec![]),
            (
                3,
                pull("a", 2, 1),
                vec![
                    "count queue-wait 1s",
                    "persist lease 1 attempt 1 agent a",
                    "event 1 assigned 1 to a",
                    "send a#2 assign 1/1",
                ],
            ),
        ],
    );
}
