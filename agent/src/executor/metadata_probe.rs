//! Whether a job's container can reach the instance metadata service. If
//! it can get an IMDSv2 token, a job can read the instance's user-data and
//! any role credentials: the agent then refuses to run jobs. The probe is a
//! short container of the default job image, on Docker's default bridge as
//! jobs are, asking for a token the way an SDK would (`PUT
//! /latest/api/token`) with whatever the image has: curl, nc, busybox's nc
//! or bash's `/dev/tcp`.
//!
//! Not responsible for what to do about the answer (the agent's start-up
//! decides) nor for the agent's own metadata reads (`imds`).

use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, LogsOptionsBuilder, StartContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::docker::{ContainerGuard, DockerError};

/// How long the probe container may take in all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks for a token with the first tool the image has; prints one verdict.
/// Each try waits up to 6 s: on a correctly set-up instance the answer never
/// comes (hop limit 1 drops it) and the agent waits that long once at start,
/// but a busy host must not be taken for a blocked one: calling metadata
/// blocked when it is not is the unsafe mistake. `nc -w` waits for the
/// answer after the request is sent: without it busybox's `nc` quits when
/// its input ends, which on a busy host came before the answer and read as
/// blocked.
const PROBE_SCRIPT: &str = r#"h=$1; p=$2
req=$(printf 'PUT /latest/api/token HTTP/1.0\r\nHost: %s\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n' "$h")
answer() { if head -n 1 | grep -q ' 200'; then echo SERVITOR-REACHABLE; else echo SERVITOR-BLOCKED; fi; }
if command -v curl >/dev/null 2>&1; then
  if curl -s -f -m 6 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "http://$h:$p/latest/api/token" >/dev/null; then echo SERVITOR-REACHABLE; else echo SERVITOR-BLOCKED; fi
elif command -v nc >/dev/null 2>&1; then
  printf '%s\n' "$req" | timeout 6 nc -w 6 "$h" "$p" 2>/dev/null | answer
elif command -v busybox >/dev/null 2>&1 && busybox nc 2>&1 | grep -qi usage; then
  printf '%s\n' "$req" | timeout 6 busybox nc -w 6 "$h" "$p" 2>/dev/null | answer
elif command -v bash >/dev/null 2>&1; then
  timeout 6 bash -c 'exec 3<>/dev/tcp/$0/$1 && printf "%s\n" "$2" >&3 && cat <&3' "$h" "$p" "$req" 2>/dev/null | answer
else
  echo SERVITOR-UNKNOWN
fi
"#;

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetadataReach {
    /// A container got a token: jobs can read instance metadata.
    Reachable,
    /// A container could not get one.
    Blocked,
    /// The probe could not tell (no tool in the image, or it failed), why.
    Unknown(String),
}

/// Runs the probe in a container of `image` against the metadata service at
/// `endpoint` (`http://host[:port]`), pulling the image when it is missing.
///
/// # Errors
/// When the engine cannot create or run the container.
pub async fn probe(
    docker: &Docker,
    image: &str,
    endpoint: &str,
) -> Result<MetadataReach, DockerError> {
    let Some((host, port)) = host_and_port(endpoint) else {
        return Ok(MetadataReach::Unknown(format!(
            "the metadata endpoint {endpoint:?} is not http://host[:port]"
        )));
    };
    match tokio::time::timeout(PROBE_TIMEOUT, run(docker, image, &host, port)).await {
        Ok(result) => result,
        Err(_) => Ok(MetadataReach::Unknown(format!(
            "the probe container did not finish within {PROBE_TIMEOUT:?}"
        ))),
    }
}

async fn run(
    docker: &Docker,
    image: &str,
    host: &str,
    port: u16,
) -> Result<MetadataReach, DockerError> {
    if docker.inspect_image(image).await.is_err() {
        let mut pull = docker.create_image(
            Some(CreateImageOptionsBuilder::new().from_image(image).build()),
            None,
            None,
        );
        while let Some(item) = pull.next().await {
            if let Err(e) = item {
                return Ok(MetadataReach::Unknown(format!("cannot pull {image}: {e}")));
            }
        }
    }
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        // The image's own entrypoint may not take a shell command.
        entrypoint: Some(vec!["sh".to_owned()]),
        cmd: Some(vec![
            "-c".to_owned(),
            PROBE_SCRIPT.to_owned(),
            "sh".to_owned(),
            host.to_owned(),
            port.to_string(),
        ]),
        ..Default::default()
    };
    let created = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .map_err(DockerError::api("create the metadata probe container"))?;
    let guard = ContainerGuard::new(docker.clone(), created.id.clone());
    docker
        .start_container(&created.id, None::<StartContainerOptions>)
        .await
        .map_err(DockerError::api("start the metadata probe container"))?;
    let mut wait = docker.wait_container(&created.id, None::<WaitContainerOptions>);
    while wait.next().await.is_some() {}
    let mut logs = docker.logs(
        &created.id,
        Some(LogsOptionsBuilder::new().stdout(true).stderr(true).build()),
    );
    let mut output = String::new();
    while let Some(Ok(chunk)) = logs.next().await {
        output.push_str(&chunk.to_string());
    }
    guard.remove().await;
    Ok(if output.contains("SERVITOR-REACHABLE") {
        MetadataReach::Reachable
    } else if output.contains("SERVITOR-BLOCKED") {
        MetadataReach::Blocked
    } else if output.contains("SERVITOR-UNKNOWN") {
        MetadataReach::Unknown(format!(
            "image {image} has none of curl, nc, busybox or bash to ask with"
        ))
    } else {
        MetadataReach::Unknown(format!("the probe said: {}", output.trim()))
    })
}

/// `http://host[:port][/…]` → host and port (80 by default).
fn host_and_port(endpoint: &str) -> Option<(String, u16)> {
    let rest = endpoint.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((authority.to_owned(), 80)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};

    const TEST_IMAGE: &str = "servitor-test-job:latest";

    async fn docker() -> Docker {
        let docker = Docker::connect_with_defaults().unwrap();
        servitor_testkit::image::ensure_local_image(&docker, TEST_IMAGE)
            .await
            .unwrap();
        docker
    }

    #[tokio::test]
    async fn a_container_that_gets_a_token_is_reported_and_one_that_cannot_is_not() {
        let docker = docker().await;
        // Where containers can reach it: a token is issued.
        let gateway = servitor_testkit::image::bridge_gateway(&docker)
            .await
            .unwrap();
        let reachable = ImdsStandIn::start_at(InstanceSpec::default(), (gateway, 0).into())
            .await
            .unwrap();
        assert_eq!(
            probe(&docker, TEST_IMAGE, &reachable.url()).await.unwrap(),
            MetadataReach::Reachable
        );
        // On the host's loopback, as with hop limit 1: no token.
        let hidden = ImdsStandIn::start(InstanceSpec::default()).await.unwrap();
        assert_eq!(
            probe(&docker, TEST_IMAGE, &hidden.url()).await.unwrap(),
            MetadataReach::Blocked
        );
    }

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(
            host_and_port("http://169.254.169.254"),
            Some(("169.254.169.254".to_owned(), 80))
        );
        assert_eq!(
            host_and_port("http://127.0.0.1:8080/"),
            Some(("127.0.0.1".to_owned(), 8080))
        );
        assert_eq!(host_and_port("https://x"), None);
    }
}
