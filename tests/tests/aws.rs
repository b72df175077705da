//! The `aws-asg` fleet end to end: the coordinator drives an Auto Scaling
//! group in moto's server through the real AWS SDK, and every instance moto
//! creates is "booted" by starting a real agent whose instance metadata
//! stand-in reports that instance's id, type and zone. Jobs come from the
//! GitLab stand-in and run for real.

use std::time::Duration;

use servitor_coordinator::config::{AwsFleetConfig, BudgetConfig, FleetProvider, PolicyConfig};
use servitor_coordinator::fleet::Fleet;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::aws::{metric, AwsHarness, AwsOptions, INSTANCE_TYPE, ZONE};
use servitor_tests::config::Tweak;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Held jobs → desired capacity → instances → agents join → jobs run in
/// Docker → idle → terminated by id with the desired capacity lowered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_scale_the_group_out_capped_then_idle_instances_are_terminated() {
    let h = AwsHarness::start(AwsOptions {
        executor: "docker",
        max_instances: 2,
        market: "spot",
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(h.group.describe().await.unwrap().0, 0, "starts empty");
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            h.standin
                .push_job(JobSpec::new(format!("build-{n}")).script(["sleep 2", "echo built"]))
                .await
                .unwrap(),
        );
    }
    // Three jobs, one slot per instance, at most two instances.
    let (desired, _) = h
        .group
        .wait_for("two instances", TIMEOUT, |d, i| d == 2 && i.len() == 2)
        .await
        .unwrap();
    assert_eq!(desired, 2);
    // While jobs run, their instances carry scale-in protection.
    h.group
        .wait_for("busy instances protected", TIMEOUT, |_, i| {
            i.iter().any(|i| i.protected)
        })
        .await
        .unwrap();
    let mut peak = 0;
    for id in &ids {
        let r = h.wait_final(*id, TIMEOUT).await.unwrap();
        assert_eq!(r.state, JobState::Success, "log:\n{}", r.trace_text());
        let text = r.trace_text();
        assert!(text.contains("built"), "{text}");
        let last = text.lines().last().unwrap_or_default().to_owned();
        assert!(
            last.contains(&format!("Ran on {INSTANCE_TYPE} (spot, {ZONE})"))
                && last.contains("estimated cost $"),
            "the last line names type, market and cost: {last:?}"
        );
        peak = peak.max(h.group.describe().await.unwrap().0);
    }
    assert!(peak <= 2, "never above max_instances: {peak}");
    // Idle past idle_time: terminated one by one, desired lowered with
    // each, so the group launches no replacement.
    let booted: Vec<String> = h
        .booter
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    h.group
        .wait_for("scale-in to zero", TIMEOUT, |d, i| d == 0 && i.is_empty())
        .await
        .unwrap();
    assert_eq!(booted.len(), 2, "no replacement was launched: {booted:?}");
    for id in &booted {
        assert_eq!(h.group.ec2_state(id).await.unwrap(), "terminated");
    }
    let m = h.metrics().await.unwrap();
    assert_eq!(
        metric(&m, "servitor_jobs_finished_total{outcome=\"success\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "servitor_fleet_scale_operations_total{operation=\"terminate\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "servitor_fleet_scale_operations_total{operation=\"protect\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    // The gauges follow the group at the next reconcile pass.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = h.metrics().await.unwrap();
        if metric(&m, "servitor_fleet_desired_capacity{runner=\"default\"}") == Some(0.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(&m, "servitor_job_queue_wait_seconds_count").is_some_and(|v| v >= 3.0),
        "{m}"
    );
}

/// An idle instance goes, a busy one stays protected through someone
/// lowering the desired capacity behind the coordinator's back, and loses
/// its protection (and then its place) once its job is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_instances_are_never_terminated_and_drift_is_corrected() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 2,
        idle_time: Duration::from_secs(1),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let short = h
        .standin
        .push_job(JobSpec::new("short").script(["echo quick"]))
        .await
        .unwrap();
    let long = h
        .standin
        .push_job(JobSpec::new("long").script(["sleep 12", "echo slow"]))
        .await
        .unwrap();
    let r = h.wait_final(short, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    // The idle instance is terminated; the busy one stays, protected.
    let (_, left) = h
        .group
        .wait_for("only the busy instance left", TIMEOUT, |d, i| {
            d == 1 && i.len() == 1 && i[0].protected
        })
        .await
        .unwrap();
    let busy = left[0].id.clone();
    assert!(
        h.standin.job(long).is_some_and(|r| !r.state.is_final()),
        "the long job still runs"
    );
    // Someone lowers the desired capacity: the group may not take the busy
    // instance, and the coordinator sets the capacity back.
    h.group.set_desired(0).await.unwrap();
    h.group
        .wait_for("desired capacity put back", TIMEOUT, |d, _| d == 1)
        .await
        .unwrap();
    assert_eq!(h.group.ec2_state(&busy).await.unwrap(), "running");
    let r = h.wait_final(long, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    assert!(r.trace_text().contains("slow"));
    h.group
        .wait_for("scale-in after the job", TIMEOUT, |d, i| {
            d == 0 && i.is_empty()
        })
        .await
        .unwrap();
    assert_eq!(h.group.ec2_state(&busy).await.unwrap(), "terminated");
    let m = h.metrics().await.unwrap();
    assert!(
        metric(
            &m,
            "servitor_fleet_scale_operations_total{operation=\"drift_correction\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

/// An instance whose agent never joins (broken image, wrong user-data) is
/// terminated after the boot timeout and replaced; the job still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_joins_is_reaped_and_replaced() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        boot_timeout: Duration::from_secs(3),
        broken: 1,
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("needs-a-good-instance").script(["echo ran"]))
        .await
        .unwrap();
    let r = h.wait_final(id, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    let seen = h.booter.seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "a replacement was launched: {seen:?}");
    let (broken, booted) = &seen[0];
    assert!(!booted);
    assert_eq!(h.group.ec2_state(broken).await.unwrap(), "terminated");
    let m = h.metrics().await.unwrap();
    assert!(
        metric(
            &m,
            "servitor_fleet_scale_operations_total{operation=\"reap\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

/// A restarted coordinator adopts the group as it finds it: the instance
/// running a job is neither terminated nor replaced, its agent comes back,
/// and the job ends once, green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_adopts_the_instances_it_finds() {
    let mut h = AwsHarness::start(AwsOptions {
        max_instances: 2,
        idle_time: Duration::from_secs(30),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("outlives-a-restart").script(["sleep 6", "echo done"]))
        .await
        .unwrap();
    let (_, before) = h
        .group
        .wait_for("one protected instance", TIMEOUT, |d, i| {
            d == 1 && i.len() == 1 && i[0].protected
        })
        .await
        .unwrap();
    h.restart().await.unwrap();
    let r = h.wait_final(id, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    let text = r.trace_text();
    assert!(text.contains("The coordinator restarted"), "{text}");
    assert_eq!(text.matches("\ndone\n").count(), 1, "ran once: {text}");
    let last = text.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.contains("Ran on m5.large (spot, us-east-1a)"),
        "{last}"
    );
    let (desired, after) = h.group.describe().await.unwrap();
    assert_eq!(desired, 1);
    assert_eq!(
        after.iter().map(|i| &i.id).collect::<Vec<_>>(),
        before.iter().map(|i| &i.id).collect::<Vec<_>>(),
        "the same instance, adopted"
    );
    assert_eq!(h.booter.seen.lock().unwrap().len(), 1, "nothing replaced");
}

/// The monthly cap holds scale-out: with prices the test sets (on-demand,
/// from the configuration's price table), only the instances the cap pays
/// for until the month ends are launched; waiting jobs say why, and all
/// run in the end on the instances there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_scale_out_and_waiting_jobs_say_so() {
    let price = 0.5;
    let hours =
        servitor_coordinator::fleet::budget::hours_left_in_month(std::time::SystemTime::now());
    // Room for two instances running until the month ends, not three.
    let cap = 2.5 * price * hours;
    let h = AwsHarness::start(AwsOptions {
        max_instances: 5,
        market: "on-demand",
        idle_time: Duration::from_secs(30),
        configure: Tweak::new(move |c| {
            c.budget = Some(BudgetConfig {
                monthly_usd: cap,
                on_demand_hourly_usd: [(INSTANCE_TYPE.to_owned(), price)].into(),
            });
        }),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(
            h.standin
                .push_job(JobSpec::new(format!("job-{n}")).script(["sleep 2", "echo ok"]))
                .await
                .unwrap(),
        );
    }
    h.group
        .wait_for("two instances", TIMEOUT, |d, _| d == 2)
        .await
        .unwrap();
    let mut waited = false;
    for id in &ids {
        let r = h.wait_final(*id, TIMEOUT).await.unwrap();
        assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
        waited |= r.trace_text().contains("Waiting for budget");
        assert!(
            h.group.describe().await.unwrap().0 <= 2,
            "the cap pays for two instances"
        );
        let last = r.trace_text().lines().last().unwrap_or_default().to_owned();
        assert!(last.contains("(on-demand, "), "{last}");
    }
    assert!(waited, "a job waiting for budget says so in its log");
    let m = h.metrics().await.unwrap();
    assert_eq!(metric(&m, "servitor_budget_monthly_usd"), Some(cap), "{m}");
    assert!(
        metric(&m, "servitor_estimated_spend_usd").is_some_and(|v| v > 0.0),
        "{m}"
    );
    let status = servitor_coordinator::admin::render_status(
        &servitor_coordinator::admin::connect(&h.coordinator().admin_socket)
            .await
            .unwrap()
            .status(servitor_proto::admin::StatusRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(status.contains("FLEET aws-asg"), "{status}");
    assert!(status.contains("ca_sha256 = \"sha256:"), "{status}");
    assert!(status.contains("this month"), "{status}");
}

/// A `[[fleet.policy]]` period in force keeps a warm instance with no jobs;
/// the group's Spot price is read through the real SDK; and completing a
/// termination lifecycle action goes through the fleet seam, which moto's
/// server does not implement (it answers 500), reported as a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_keeps_warm_capacity_and_prices_and_hooks_go_through_the_sdk() {
    let h = AwsHarness::start(AwsOptions {
        configure: Tweak::new(|c| {
            if let Some(aws) = &mut c.fleet_mut().aws {
                aws.lifecycle_hook = Some("servitor-drain".to_owned());
            }
            c.fleet_mut().policy.push(PolicyConfig {
                periods: vec!["* * * * *".to_owned()],
                idle_count: 1,
                idle_time: Duration::from_secs(600),
                ..PolicyConfig::default()
            });
        }),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let (_, warm) = h
        .group
        .wait_for("one warm instance", TIMEOUT, |d, i| d == 1 && i.len() == 1)
        .await
        .unwrap();
    let fleet = h.coordinator().aws_fleet.clone().unwrap();
    // moto prices every Spot offering at a constant $0.00001 an hour.
    let price = fleet.spot_price(INSTANCE_TYPE, ZONE).await.unwrap();
    assert_eq!(price, Some(0.00001));
    let err = fleet
        .complete_lifecycle_action(&warm[0].id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CompleteLifecycleAction failed for auto scaling group servitor-test"),
        "{err}"
    );
    // The warm instance stays while the period is in force.
    servitor_tests::two_fleet_passes(&h.coordinator().fleet_view)
        .await
        .unwrap();
    let (desired, now) = h.group.describe().await.unwrap();
    assert_eq!(desired, 1);
    assert_eq!(now[0].id, warm[0].id);
}

/// An instance that reached `max_use_count` takes no new job, finishes the
/// one it runs, and only then is terminated; the next job runs on its
/// replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_instance_finishes_its_job_before_it_is_replaced() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        idle_time: Duration::from_secs(30),
        configure: Tweak::new(|c| c.fleet_mut().max_use_count = 1),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let first = h
        .standin
        .push_job(JobSpec::new("first").script(["sleep 4", "echo first done"]))
        .await
        .unwrap();
    let second = h
        .standin
        .push_job(JobSpec::new("second").script(["echo second done"]))
        .await
        .unwrap();
    let r = h.wait_final(first, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    assert!(
        r.trace_text().contains("\nfirst done\n"),
        "{}",
        r.trace_text()
    );
    let r2 = h.wait_final(second, TIMEOUT).await.unwrap();
    assert_eq!(r2.state, JobState::Success, "{}", r2.trace_text());
    let seen = h.booter.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one replacement: {seen:?}");
    let (worn, fresh) = (&seen[0].0, &seen[1].0);
    assert!(r.trace_text().contains(&format!("on instance {worn}")));
    assert!(r2.trace_text().contains(&format!("on instance {fresh}")));
    assert_eq!(h.group.ec2_state(worn).await.unwrap(), "terminated");
}

/// A Spot notice on the instance running a job: the job is handed back and
/// runs again on a new instance (GitLab sees one job), and the doomed
/// instance is terminated as soon as it holds nothing, desired capacity
/// lowered, so the group does not replace it on top of the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_notice_moves_the_job_to_a_new_instance_and_lets_the_old_one_go() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 2,
        idle_time: Duration::from_secs(30),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("interrupted").script(["echo started", "sleep 6", "echo finished"]))
        .await
        .unwrap();
    h.standin
        .wait_for(id, "the job running", TIMEOUT, |r| {
            r.trace_text().contains("\nstarted\n")
        })
        .await
        .unwrap();
    let doomed = h.booter.seen.lock().unwrap()[0].0.clone();
    h.booter.spot_notice(&doomed).unwrap();
    let r = h.wait_final(id, TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert_eq!(h.group.ec2_state(&doomed).await.unwrap(), "terminated");
    let (desired, instances) = h.group.describe().await.unwrap();
    assert_eq!(desired, 1, "only the new instance: {instances:?}");
    assert_eq!(h.booter.seen.lock().unwrap().len(), 2);
    let m = h.metrics().await.unwrap();
    assert_eq!(
        metric(&m, "servitor_spot_interruptions_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "servitor_job_reruns_total"), Some(1.0), "{m}");
}

/// A group that does not exist is a configuration error (exit 64) that
/// names the group and the fix, before anything else is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_group_is_named_with_the_fix() {
    servitor_tests::aws::aws_environment();
    let moto = servitor_tests::aws::Moto::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let standin = servitor_testkit::gitlab::StandIn::start(Default::default())
        .await
        .unwrap();
    std::fs::write(
        dir.path().join(servitor_tests::config::RUNNER_TOKEN_FILE),
        servitor_testkit::gitlab::DEFAULT_RUNNER_TOKEN,
    )
    .unwrap();
    std::fs::write(
        dir.path().join(servitor_tests::config::JOIN_TOKEN_FILE),
        "join-token-0123456789",
    )
    .unwrap();
    let mut config =
        servitor_tests::config::local(dir.path(), &standin.url(), "127.0.0.1:0".parse().unwrap());
    config.fleet_mut().provider = FleetProvider::AwsAsg;
    config.fleet_mut().max_instances = 2;
    config.fleet_mut().aws = Some(AwsFleetConfig {
        group: "no-such-group".to_owned(),
        region: None,
        endpoint_url: Some(moto.url().to_owned()),
        lifecycle_hook: None,
    });
    let config = servitor_tests::config::write(&dir.path().join("c.toml"), &config).unwrap();
    let secrets = config.load_secrets().unwrap();
    let err = servitor_coordinator::start(
        config,
        secrets,
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("no-such-group") && message.contains("fix fleet.aws.group"),
        "{message}"
    );
    assert_eq!(err.exit_code(), 64, "{message}");
}

/// A `[[fleet.policy]]` period switching off changes `idle_count` back:
/// the warm instance its period kept is terminated once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_switching_off_lets_its_warm_instance_go() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let mut now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now % 60 > 40 {
        // Too close to the minute's end to see the instance come up first.
        tokio::time::sleep(Duration::from_secs(61 - now % 60)).await;
        now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
    }
    let (minute, hour) = (now / 60 % 60, now / 3600 % 24);
    let h = AwsHarness::start(AwsOptions {
        idle_time: Duration::from_secs(1),
        configure: Tweak::new(move |c| {
            c.fleet_mut().policy.push(PolicyConfig {
                periods: vec![format!("{minute} {hour} * * *")],
                timezone: "UTC".to_owned(),
                idle_count: 1,
                idle_time: Duration::from_secs(1),
                ..PolicyConfig::default()
            });
        }),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let (_, warm) = h
        .group
        .wait_for("a warm instance during the period", TIMEOUT, |d, i| {
            d == 1 && i.len() == 1
        })
        .await
        .unwrap();
    h.group
        .wait_for("scale-in after the period", TIMEOUT, |d, i| {
            d == 0 && i.is_empty()
        })
        .await
        .unwrap();
    let ended = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        ended / 60 % 60 != minute,
        "the instance stayed while its period was in force"
    );
    assert_eq!(h.group.ec2_state(&warm[0].id).await.unwrap(), "terminated");
}

/// A restarted coordinator that listens somewhere else: the instance it
/// adopts runs an agent that keeps dialling the old address. It counts as
/// capacity only for `agents.lost_grace`; then it is terminated as broken
/// and the job runs again, once and green, on an instance launched for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_instance_whose_agent_never_reconnects_is_replaced() {
    // Short, so the test is; the adopted instance is past its boot timeout
    // by the time its grace ends, so the grace is what counts.
    let lost_grace = Duration::from_secs(8);
    let mut h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        idle_time: Duration::from_secs(30),
        boot_timeout: Duration::from_secs(6),
        lost_grace,
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("outlives-its-instance").script([
            "echo started",
            "sleep 4",
            "echo finished",
        ]))
        .await
        .unwrap();
    h.standin
        .wait_for(id, "the job running", TIMEOUT, |r| {
            r.trace_text().contains("\nstarted\n")
        })
        .await
        .unwrap();
    let silent = h.booter.seen.lock().unwrap()[0].0.clone();
    // The new coordinator first sees the instance between these two.
    let restarting = tokio::time::Instant::now();
    h.restart_elsewhere().await.unwrap();
    let restarted = tokio::time::Instant::now();

    h.group
        .wait_for("the silent instance terminated", TIMEOUT, |_, i| {
            !i.iter()
                .any(|i| i.id == silent && i.lifecycle == "InService")
        })
        .await
        .unwrap();
    // Not before the grace; after it, seconds of slack for a pass and an
    // API call, not the minutes of a boot timeout.
    assert!(
        restarting.elapsed() >= lost_grace,
        "terminated {:?} after the restart began",
        restarting.elapsed()
    );
    assert!(
        restarted.elapsed() < lost_grace + Duration::from_secs(10),
        "terminated {:?} after the restart",
        restarted.elapsed()
    );
    let r = h.wait_final(id, TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert_eq!(text.matches("\nfinished\n").count(), 1, "{text}");
    let seen = h.booter.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one replacement: {seen:?}");
    assert!(
        text.contains(&format!("on instance {}", seen[1].0)),
        "{text}"
    );
    assert_eq!(h.group.ec2_state(&silent).await.unwrap(), "terminated");
    let m = h.metrics().await.unwrap();
    assert!(
        metric(
            &m,
            "servitor_fleet_scale_operations_total{operation=\"reap\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

/// No shared secret on the instances: agents enroll with their instance
/// identity document, the coordinator checks AWS's signature and that the
/// instance is in its group, and the job runs. Each instance is recorded,
/// so the same document cannot enroll a second agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_enroll_by_their_identity_with_no_token_on_them() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        aws_iid: true,
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("tokenless").script(["echo ran on an identified instance"]))
        .await
        .unwrap();
    let r = h.wait_final(id, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    let seen = h.booter.seen.lock().unwrap().clone();
    let (instance, booted) = seen.first().cloned().unwrap();
    assert!(booted);
    // The instance holds no join token: its agent's configuration names
    // none, and it enrolled by identity.
    let agent_config = std::fs::read_to_string(
        h.dir
            .path()
            .join("instances")
            .join(&instance)
            .join("agent.toml"),
    )
    .unwrap();
    assert!(
        agent_config.contains("enroll = \"aws-iid\""),
        "{agent_config}"
    );
    assert!(
        agent_config.contains("join_token_file = \"\""),
        "{agent_config}"
    );
    let enrolled =
        std::fs::read_to_string(h.dir.path().join("state").join("enrolled-instances")).unwrap();
    assert_eq!(enrolled.lines().collect::<Vec<_>>(), [instance.as_str()]);
}

/// An instance whose document AWS's key (the test's) did not sign is
/// refused, and its agent's log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_identity_is_refused_with_the_reason_on_the_instance() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        aws_iid: true,
        aws_iid_forged: true,
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    h.standin
        .push_job(JobSpec::new("never-runs").script(["echo no"]))
        .await
        .unwrap();
    servitor_tests::wait_until("the agent logs its refusal", TIMEOUT, || {
        h.booter.agent_logs().contains("instance identity refused")
    })
    .await
    .unwrap();
    let logs = h.booter.agent_logs();
    assert!(
        logs.contains("does not verify with AWS's certificate"),
        "{logs}"
    );
    let enrolled = h.dir.path().join("state").join("enrolled-instances");
    assert!(!enrolled.exists() || std::fs::read_to_string(enrolled).unwrap().is_empty());
}

/// An instance taken out of the group keeps running, but its agent's
/// certificate is not renewed: the agent hears why, the link ends when the
/// certificate runs out, and the agent stops for good (it cannot enroll a
/// second time) with a line naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_left_the_group_cannot_renew_and_is_cut_off_at_expiry() {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        idle_count: 1,
        aws_iid: true,
        configure: Tweak::new(|c| c.agents.cert_validity = Duration::from_secs(30)),
        ..AwsOptions::default()
    })
    .await
    .unwrap();
    servitor_tests::wait_until("an agent connects", TIMEOUT, || {
        !h.coordinator().core.agents().is_empty()
    })
    .await
    .unwrap();
    let instance = h.coordinator().core.agents()[0].agent_id.clone();
    h.booter.detach(&h.group, &instance).await.unwrap();

    let log_path = h
        .dir
        .path()
        .join("instances")
        .join(&instance)
        .join("agent.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    servitor_tests::wait_until("the agent stops", TIMEOUT, || {
        h.booter.exit_status(&instance).is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    let log = log();
    assert!(
        log.contains("the coordinator refused to renew the agent's certificate"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "instance {instance} is no longer a running member"
        )),
        "{log}"
    );
    assert!(
        log.contains("was not renewed over the link"),
        "the coordinator said why it closed the link: {log}"
    );
    assert!(log.contains("replace the instance"), "{log}");
    assert_eq!(
        h.booter.exit_status(&instance).unwrap().code(),
        Some(64),
        "systemd does not restart it: {log}"
    );
    assert!(
        h.coordinator()
            .core
            .agents()
            .iter()
            .all(|a| a.agent_id != instance),
        "the detached instance's agent is gone"
    );
}
