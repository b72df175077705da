#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! An agent whose job containers could get an instance metadata token
//! refuses to start, and says which launch-template setting fixes it.

use std::process::Stdio;

use servitor_agent::config::{AgentConfig, ExecutorKind};
use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};
use servitor_tests::{ensure_test_image, TEST_IMAGE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_containers_reach_instance_metadata_refuses_to_start() {
    ensure_test_image().await.unwrap();
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let gateway = servitor_testkit::image::bridge_gateway(&docker)
        .await
        .unwrap();
    // Metadata where containers reach it: EC2 with hop limit 2.
    let imds = ImdsStandIn::start_at(InstanceSpec::default(), (gateway, 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not needed before the check").unwrap();
    std::fs::write(dir.path().join("join-token"), "t").unwrap();
    let mut config = AgentConfig::new(
        "127.0.0.1:9".to_owned(),
        dir.path().join("ca.pem"),
        dir.path().join("join-token"),
    );
    config.executor.kind = ExecutorKind::Docker;
    config.executor.default_image = Some(TEST_IMAGE.to_owned());
    config.executor.work_dir = dir.path().join("builds");
    config.instance.imds_endpoint = Some(imds.url());
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let output = tokio::process::Command::new(servitor_tests::agent_binary().unwrap())
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(i32::from(servitor_runtime::exit::CONFIG)),
        "{stderr}"
    );
    assert!(stderr.contains("HttpPutResponseHopLimit = 1"), "{stderr}");
    assert!(stderr.contains("allow_container_metadata"), "{stderr}");
    assert!(imds.token_puts() > 0, "the probe asked for a token");
}
