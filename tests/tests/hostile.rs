#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Hostile agents against the whole coordinator: an enrolled agent (a real
//! certificate from the join token) that lies about attempts, writes output
//! for attempts that are not its own, sends frames larger than any message
//! may be, opens thousands of streams, or floods its control stream without
//! reading the answers. Each gets a refusal or a closed link, and a real
//! agent's job beside it finishes once, with its whole log and nothing of
//! the hostile agent's in it.

use std::time::Duration;

use servitor_agent::link::{connect, CaTrust, Link, LinkSettings};
use servitor_proto::agent::{
    agent_message, coordinator_message, AgentMessage, AttemptRef, CoordinatorMessage, Finished,
    Heartbeat, Hello, Outcome, OutputHeader, Renew, Started,
};
use servitor_proto::frame::{write_frame, FrameReader};
use servitor_runtime::secret::Secret;
use servitor_testkit::gitlab::{JobRecord, JobSpec, JobState};
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const PROMPT: Duration = Duration::from_secs(15);

async fn harness() -> Harness {
    Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 1,
        capacity_per_instance: 1,
        ..HarnessOptions::default()
    })
    .await
    .unwrap()
}

/// Enrolls as an agent of its own with the harness's join token.
async fn enroll(h: &Harness, name: &str) -> Link {
    let c = h.coordinator();
    let settings = LinkSettings::new(
        c.link_addr.to_string(),
        CaTrust::Pem(std::fs::read_to_string(&c.ca_pem_path).unwrap()),
        Secret::new(
            std::fs::read_to_string(h.dir.path().join(servitor_tests::config::JOIN_TOKEN_FILE))
                .unwrap(),
        ),
        name,
    );
    connect(&settings).await.unwrap()
}

/// The control stream after a hello with no free slot (so nothing real is
/// given to it), and the welcome.
async fn hello(
    link: &Link,
    running: Vec<AttemptRef>,
) -> (
    quinn::SendStream,
    FrameReader<quinn::RecvStream>,
    CoordinatorMessage,
) {
    let (mut send, recv) = link.connection.open_bi().await.unwrap();
    let hello = AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: servitor_proto::link::PROTOCOL_VERSION,
            agent_name: "hostile".into(),
            capacity: 1,
            free_slots: 0,
            running,
            executor: "shell".into(),
            ..Hello::default()
        })),
    };
    write_frame(&mut send, &hello).await.unwrap();
    let mut frames = FrameReader::new(recv);
    let welcome: CoordinatorMessage = tokio::time::timeout(PROMPT, frames.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (send, frames, welcome)
}

async fn say(send: &mut quinn::SendStream, msg: agent_message::Msg) {
    write_frame(send, &AgentMessage { msg: Some(msg) })
        .await
        .unwrap();
}

/// A job that runs long enough for the hostile agent to act, printing
/// its own lines.
fn real_job() -> JobSpec {
    JobSpec::new("real").script([
        "i=0; while [ $i -lt 30 ]; do echo \"real line $i\"; sleep 0.1; i=$((i+1)); done",
        "printf 'real end'",
    ])
}

fn assert_clean(r: &JobRecord) {
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(!text.contains("HOSTILE"), "{text}");
    for i in 0..30 {
        assert!(
            text.contains(&format!("real line {i}\n")),
            "line {i} missing:\n{text}"
        );
    }
    assert!(text.contains("real end"), "{text}");
    assert_eq!(r.checksum_ok, Some(true), "{text}");
    let finals = r
        .updates
        .iter()
        .filter(|u| u.status == 200 && matches!(u.state.as_str(), "success" | "failed"))
        .count();
    assert_eq!(finals, 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_claiming_another_agents_attempt_is_told_it_is_stale_and_changes_nothing() {
    let h = harness().await;
    let id = h.standin.push_job(real_job()).await.unwrap();
    h.wait_trace(id, "real line 2", JOB_TIMEOUT).await.unwrap();
    let stolen = AttemptRef {
        job_id: id,
        attempt: 1,
    };
    let link = enroll(&h, "hostile-claims").await;
    // It says it runs the attempt another agent runs…
    let (mut send, _frames, welcome) = hello(&link, vec![stolen]).await;
    let Some(coordinator_message::Msg::Welcome(welcome)) = welcome.msg else {
        panic!("no welcome: {welcome:?}");
    };
    assert!(welcome.stale.contains(&stolen), "{welcome:?}");
    // …reports it started and finished it, failed…
    say(
        &mut send,
        agent_message::Msg::Started(Started {
            attempt: Some(stolen),
        }),
    )
    .await;
    say(
        &mut send,
        agent_message::Msg::Finished(Finished {
            attempt: Some(stolen),
            outcome: Outcome::Failed.into(),
            exit_code: Some(3),
            message: "HOSTILE finish".into(),
            ..Finished::default()
        }),
    )
    .await;
    // …and writes output for it, and for an attempt that never existed.
    for attempt in [
        stolen,
        AttemptRef {
            job_id: id,
            attempt: 7,
        },
        AttemptRef {
            job_id: 999_999,
            attempt: 1,
        },
    ] {
        let mut out = link.connection.open_uni().await.unwrap();
        write_frame(
            &mut out,
            &OutputHeader {
                attempt: Some(attempt),
                offset: 0,
            },
        )
        .await
        .unwrap();
        let _ = out.write_all(b"HOSTILE output\n").await;
        let _ = out.finish();
    }
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    assert_clean(&r);
    assert!(h.standin.job(999_999).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_any_agent_message_closes_the_link_unread() {
    let h = harness().await;
    let link = enroll(&h, "hostile-frame").await;
    let (mut send, _frames, _) = hello(&link, Vec::new()).await;
    // A length prefix of 8 MiB: more than any agent message, less than the
    // frame limit of the coordinator's own messages.
    let mut prefix = Vec::new();
    prost::encoding::encode_varint(8 * 1024 * 1024, &mut prefix);
    send.write_all(&prefix).await.unwrap();
    let _ = send.write_all(&[0_u8; 64 * 1024]).await;
    let closed = tokio::time::timeout(PROMPT, link.connection.closed())
        .await
        .expect("the coordinator closes the link");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    // The coordinator goes on: a real job runs.
    let id = h.standin.push_job(real_job()).await.unwrap();
    assert_clean(&h.wait_final(id, JOB_TIMEOUT).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_and_a_flood_of_messages_cost_the_others_nothing() {
    let h = harness().await;
    let link = enroll(&h, "hostile-flood").await;
    let (mut send, _frames, _) = hello(&link, Vec::new()).await;
    let id = h.standin.push_job(real_job()).await.unwrap();
    // Thousands of output streams that never finish their header: QUIC's
    // stream limit makes most of them wait on the hostile side.
    let connection = link.connection.clone();
    let streams = tokio::spawn(async move {
        let mut opened = 0_u32;
        let mut held = Vec::new();
        for _ in 0..5_000 {
            match tokio::time::timeout(Duration::from_millis(200), connection.open_uni()).await {
                Ok(Ok(mut s)) => {
                    let _ = s.write_all(&[0x85]).await;
                    held.push(s);
                    opened += 1;
                }
                _ => break,
            }
        }
        (opened, held)
    });
    // A flood of heartbeats and pulls on the control stream.
    for n in 0..20_000_u32 {
        let msg = if n % 2 == 0 {
            agent_message::Msg::Heartbeat(Heartbeat::default())
        } else {
            agent_message::Msg::Pull(servitor_proto::agent::Pull { free_slots: 0 })
        };
        say(&mut send, msg).await;
    }
    let (opened, _held) = streams.await.unwrap();
    assert!(
        opened < 5_000,
        "the coordinator let {opened} streams open at once"
    );
    assert_clean(&h.wait_final(id, JOB_TIMEOUT).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_asks_and_never_reads_the_answers_is_cut_off() {
    let h = harness().await;
    let link = enroll(&h, "hostile-deaf").await;
    let (mut send, frames, _) = hello(&link, Vec::new()).await;
    // Never reads: each refused renewal's answer waits for it.
    let flood = tokio::spawn(async move {
        let mut sent = 0_u32;
        loop {
            let renew = AgentMessage {
                msg: Some(agent_message::Msg::Renew(Renew {
                    csr_pem: "HOSTILE not a request".repeat(200),
                })),
            };
            if write_frame(&mut send, &renew).await.is_err() {
                return sent;
            }
            sent += 1;
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(120), link.connection.closed())
        .await
        .expect("the coordinator closes the link of an agent that does not read");
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("{closed:?}");
    };
    assert_eq!(
        close.error_code,
        quinn::VarInt::from_u32(servitor_proto::link::close_code::PROTOCOL_VIOLATION)
    );
    assert!(
        String::from_utf8_lossy(&close.reason).contains("does not read"),
        "{close:?}"
    );
    let sent = flood.await.unwrap();
    assert!(sent > 4_096, "closed after only {sent} requests");
    drop(frames);
    let id = h.standin.push_job(real_job()).await.unwrap();
    assert_clean(&h.wait_final(id, JOB_TIMEOUT).await.unwrap());
}
