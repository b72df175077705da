//! A job's `services`: each image started on a network of the job's own,
//! reachable from the job by its default aliases (from the image name, as
//! gitlab-runner derives them) and its `alias`es, with its `entrypoint`,
//! `command` and variables; the job waits until each answers on one of its
//! exposed ports (a warning, not a failure, when one does not). Everything
//! is removed when the attempt ends, however it ends.
//!
//! Not responsible for the job's own containers (they join the network by
//! name) or for pulling images (the executor's `ensure_image`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountType, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListNetworksOptionsBuilder, LogsOptionsBuilder,
    StartContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use servitor_proto::agent::FailureKind;
use servitor_proto::job::{JobPayload, Service};

use super::docker::{
    remove_container, ContainerGuard, DockerError, ImageOptions, LABEL_AGENT, LABEL_ATTEMPT,
    LABEL_JOB_ID, LABEL_STEP,
};
use super::output::{JobOutput, ANSI_RESET, ANSI_YELLOW};

/// gitlab-runner's `wait_for_services_timeout` default.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports probed per service at most (gitlab-runner: the first 20).
const MAX_PORTS: usize = 20;
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Service log lines shown when a service does not answer.
const LOG_TAIL: &str = "50";

/// The services of one attempt, and the network they share with the job.
/// Dropping it removes everything in the background; [`Services::remove`]
/// does it in place.
#[derive(Debug)]
pub(crate) struct Services {
    docker: Docker,
    /// The job's network; the job's containers join it.
    pub network: String,
    containers: Vec<Started>,
    /// The `/certs/client` volume the job's containers share with the
    /// services, so `docker:dind` with TLS works as GitLab's docs set it up
    /// (gitlab-runner needs `volumes = ["/certs/client"]` for that).
    certs: Option<String>,
    removed: bool,
}

#[derive(Debug)]
struct Started {
    id: String,
    /// The image as the job named it, for log lines.
    image: String,
}

/// Where Docker-in-Docker's entrypoint writes the client certificates the
/// job's `docker` CLI reads (`DOCKER_TLS_CERTDIR=/certs`).
const CERTS_CLIENT: &str = "/certs/client";

/// What the executor gives each service container.
pub(crate) struct ServiceSettings<'a> {
    pub labels: &'a HashMap<String, String>,
    /// The attempt's work directory, mounted as in the job's containers
    /// (gitlab-runner mounts the builds directory into services too).
    pub work_dir: &'a str,
    /// Run services privileged (Docker-in-Docker needs it).
    pub privileged: bool,
}

/// Services that could not all start: what did start (to remove), and why.
#[derive(Debug)]
pub(crate) struct StartFailure {
    pub services: Services,
    pub kind: FailureKind,
    pub message: String,
}

impl Services {
    /// Creates the job's network and starts each service on it; an image is
    /// made present with `pull` first.
    ///
    /// # Errors
    /// A service that cannot be pulled, created or started, named. What was
    /// started is removed when the returned error's guard drops.
    pub(crate) async fn start<P, F>(
        docker: &Docker,
        job: &JobPayload,
        attempt: u32,
        settings: &ServiceSettings<'_>,
        out: &JobOutput,
        pull: P,
    ) -> Result<Self, StartFailure>
    where
        P: Fn(String, Vec<String>, Option<String>) -> F,
        F: std::future::Future<Output = Result<(), DockerError>>,
    {
        let suffix: String = (0..8)
            .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16)]))
            .collect();
        let network = format!("servitor-{}-{attempt}-{suffix}", job.id);
        let mut services = Services {
            docker: docker.clone(),
            network: network.clone(),
            containers: Vec::new(),
            certs: Some(format!("{network}-certs")),
            removed: false,
        };
        let fail = |services, kind, message| StartFailure {
            services,
            kind,
            message,
        };
        let created = docker
            .create_network(NetworkCreateRequest {
                name: network.clone(),
                driver: Some("bridge".to_owned()),
                labels: Some(settings.labels.clone()),
                ..Default::default()
            })
            .await;
        if let Err(e) = created {
            return Err(fail(
                services,
                FailureKind::RunnerSystem,
                format!("cannot create the job's network: {e}"),
            ));
        }
        let shared = services.shared_mounts();
        let variables = public_variables(job);
        let mut taken: HashSet<String> = HashSet::new();
        for (index, service) in job.services.iter().enumerate() {
            let image = job.expand(&service.name);
            if image.trim().is_empty() {
                return Err(fail(
                    services,
                    FailureKind::Configuration,
                    format!("services[{index}] names no image"),
                ));
            }
            let options =
                match ImageOptions::parse(&service.executor_opts, &format!("services[{index}]")) {
                    Ok(options) => options,
                    Err(message) => {
                        return Err(fail(services, FailureKind::Configuration, message))
                    }
                };
            let (name, version) = split_name_and_version(&image);
            out.info(&format!("Starting service {name}:{version} ..."))
                .await;
            let pulled = pull(
                image.clone(),
                service.pull_policy.clone(),
                options.platform.clone(),
            )
            .await;
            if let Err(e) = pulled {
                let kind = match e {
                    DockerError::UnknownPullPolicy(_)
                    | DockerError::PullPolicyNotAllowed { .. } => FailureKind::Configuration,
                    DockerError::ImageNotPresent { .. } | DockerError::Pull { .. } => {
                        FailureKind::ImagePull
                    }
                    _ => FailureKind::RunnerSystem,
                };
                return Err(fail(services, kind, format!("service {image:?}: {e}")));
            }
            let mut aliases = Vec::new();
            for alias in default_aliases(&image)
                .into_iter()
                .chain(user_aliases(&job.expand(&service.alias)))
            {
                if taken.contains(&alias) {
                    out.warning(&format!(
                        "Skipping alias {alias:?} for service {image:?} (services[{index}]): alias is already in use by another service."
                    ))
                    .await;
                } else if !aliases.contains(&alias) {
                    aliases.push(alias);
                }
            }
            taken.extend(aliases.iter().cloned());
            let container_name = format!(
                "{network}-{}-{index}",
                name.replace('/', "__").replace(':', "_")
            );
            match start_one(
                docker,
                service,
                &options,
                &image,
                &container_name,
                &network,
                aliases,
                service_env(job, service, &variables),
                settings,
                &shared,
            )
            .await
            {
                Ok(id) => services.containers.push(Started {
                    id,
                    image: image.clone(),
                }),
                Err(e) => {
                    return Err(fail(
                        services,
                        FailureKind::RunnerSystem,
                        format!("service {image:?} (services[{index}]) did not start: {e}"),
                    ))
                }
            }
        }
        Ok(services)
    }

    /// Waits, all at once, until each service answers on one of its exposed
    /// TCP ports (or `HEALTHCHECK_TCP_PORT`), up to `timeout`. A service
    /// that does not gets gitlab-runner's warning block with its logs.
    pub(crate) async fn wait(&self, job: &JobPayload, timeout: Duration, out: &JobOutput) {
        if self.containers.is_empty() {
            return;
        }
        out.info(&format!(
            "Waiting for services to be up and running (timeout {} seconds)...",
            timeout.as_secs()
        ))
        .await;
        let checks = self
            .containers
            .iter()
            .zip(&job.services)
            .map(|(started, service)| self.wait_one(started, service, timeout));
        let results = futures_util::future::join_all(checks).await;
        for (started, result) in self.containers.iter().zip(results) {
            if let Err(problem) = result {
                let logs = self.logs(&started.id).await;
                out.write(
                    format!(
                        "{ANSI_YELLOW}*** WARNING:{ANSI_RESET} Service {} probably didn't start properly.\n\nHealth check error:\n{problem}\n\nService container logs:\n{logs}\n{ANSI_YELLOW}*********{ANSI_RESET}\n\n",
                        started.image
                    )
                    .into(),
                )
                .await;
            }
        }
    }

    async fn wait_one(
        &self,
        started: &Started,
        service: &Service,
        timeout: Duration,
    ) -> Result<(), String> {
        let ports = self.ports(started, service).await?;
        let ip = self.address(&started.id).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for port in &ports {
                let addr = SocketAddr::new(ip, *port);
                let dial = tokio::net::TcpStream::connect(addr);
                if let Ok(Ok(_)) = tokio::time::timeout(PROBE_INTERVAL, dial).await {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                return Err(format!(
                    "service {} did not answer on {ip} port {} within {} seconds",
                    started.image,
                    list.join(", "),
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// `HEALTHCHECK_TCP_PORT`, else the image's exposed TCP ports, sorted.
    async fn ports(&self, started: &Started, service: &Service) -> Result<Vec<u16>, String> {
        if let Some(port) = service
            .variables
            .iter()
            .rev()
            .find(|v| v.key == "HEALTHCHECK_TCP_PORT")
            .and_then(|v| v.value.trim().parse().ok())
        {
            return Ok(vec![port]);
        }
        let inspect = self
            .docker
            .inspect_image(&started.image)
            .await
            .map_err(|e| format!("cannot inspect {}: {e}", started.image))?;
        let mut ports: Vec<u16> = inspect
            .config
            .and_then(|c| c.exposed_ports)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let (port, proto) = p.split_once('/').unwrap_or((p.as_str(), "tcp"));
                (proto == "tcp").then(|| port.parse().ok()).flatten()
            })
            .collect();
        ports.sort_unstable();
        ports.truncate(MAX_PORTS);
        if ports.is_empty() {
            return Err(format!("service {:?} has no exposed ports", started.image));
        }
        Ok(ports)
    }

    async fn address(&self, id: &str) -> Result<IpAddr, String> {
        let inspect = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| e.to_string())?;
        inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| "the service has no address on the job's network".to_owned())
    }

    async fn logs(&self, id: &str) -> String {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(LOG_TAIL)
            .build();
        let mut stream = self.docker.logs(id, Some(options));
        let mut text = String::new();
        let collect = async {
            while let Some(Ok(chunk)) = stream.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), collect).await;
        text
    }

    /// Volumes the job's containers share with the services.
    pub(crate) fn shared_mounts(&self) -> Vec<Mount> {
        self.certs
            .iter()
            .map(|volume| Mount {
                target: Some(CERTS_CLIENT.to_owned()),
                source: Some(volume.clone()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            })
            .collect()
    }

    /// Removes the services, the network and the shared volume.
    pub(crate) async fn remove(mut self) {
        self.removed = true;
        remove_all(
            &self.docker,
            std::mem::take(&mut self.containers),
            &self.network,
            self.certs.take(),
        )
        .await;
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let containers = std::mem::take(&mut self.containers);
        let (docker, network, certs) =
            (self.docker.clone(), self.network.clone(), self.certs.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { remove_all(&docker, containers, &network, certs).await });
        } else {
            tracing::warn!(%network, "no runtime left to remove a job's services; the agent removes them at its next start");
        }
    }
}

async fn remove_all(
    docker: &Docker,
    containers: Vec<Started>,
    network: &str,
    certs: Option<String>,
) {
    for started in containers {
        remove_container(docker, &started.id).await;
    }
    if let Some(volume) = certs {
        if let Err(e) = docker
            .remove_volume(
                &volume,
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await
        {
            tracing::debug!(volume, error = %e, "could not remove a job's certificate volume");
        }
    }
    match docker.remove_network(network).await {
        Ok(())
        | Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => tracing::warn!(network, error = %e, "failed to remove a job's network"),
    }
}

/// Removes the networks an agent left behind (after a crash); returns how
/// many.
pub(crate) async fn remove_leftover_networks(
    docker: &Docker,
    owner: &str,
) -> Result<usize, DockerError> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_AGENT}={owner}")])]);
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .map_err(DockerError::api("list networks"))?;
    let mut removed = 0;
    for network in networks.into_iter().filter_map(|n| n.name) {
        docker
            .remove_network(&network)
            .await
            .map_err(DockerError::api("remove leftover network"))?;
        removed += 1;
    }
    Ok(removed)
}

#[allow(clippy::too_many_arguments)] // one call site: the whole container spec
async fn start_one(
    docker: &Docker,
    service: &Service,
    options: &ImageOptions,
    image: &str,
    name: &str,
    network: &str,
    aliases: Vec<String>,
    env: Vec<String>,
    settings: &ServiceSettings<'_>,
    shared: &[Mount],
) -> Result<String, BollardError> {
    let mut labels = settings.labels.clone();
    labels.insert(LABEL_STEP.to_owned(), "service".to_owned());
    let mut mounts = vec![Mount {
        target: Some(settings.work_dir.to_owned()),
        source: Some(settings.work_dir.to_owned()),
        typ: Some(MountType::BIND),
        ..Default::default()
    }];
    mounts.extend(shared.iter().cloned());
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: (!service.entrypoint.is_empty()).then(|| service.entrypoint.clone()),
        cmd: (!service.command.is_empty()).then(|| service.command.clone()),
        env: Some(env),
        user: options.user.clone(),
        labels: Some(labels),
        host_config: Some(HostConfig {
            network_mode: Some(network.to_owned()),
            privileged: Some(settings.privileged),
            mounts: Some(mounts),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.to_owned(),
                EndpointSettings {
                    aliases: Some(aliases),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    };
    let mut create = CreateContainerOptionsBuilder::new().name(name);
    if let Some(platform) = &options.platform {
        create = create.platform(platform);
    }
    let created = docker.create_container(Some(create.build()), body).await?;
    let guard = ContainerGuard::new(docker.clone(), created.id.clone());
    docker
        .start_container(&created.id, None::<StartContainerOptions>)
        .await?;
    Ok(guard.keep())
}

/// The job variables services see: the public (and runner-added) ones, as
/// gitlab-runner passes them; masked project variables stay with the job.
fn public_variables(job: &JobPayload) -> Vec<String> {
    job.variables
        .iter()
        .filter(|v| v.public && !v.file)
        .map(|v| format!("{}={}", v.key, v.value))
        .collect()
}

/// A service's environment: the public job variables, then its own, with
/// its own expanded against the job's.
fn service_env(job: &JobPayload, service: &Service, public: &[String]) -> Vec<String> {
    let mut env = public.to_vec();
    env.extend(
        service
            .variables
            .iter()
            .map(|v| format!("{}={}", v.key, job.expand(&v.value))),
    );
    env
}

/// `(service, version)` of an image reference, as gitlab-runner's
/// `SplitNameAndVersion`: the registry host without its port plus the path,
/// and the tag, the digest, or `latest`.
pub(crate) fn split_name_and_version(image: &str) -> (String, String) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match rest[last_slash..].rfind(':') {
        Some(colon) => (
            &rest[..last_slash + colon],
            Some(&rest[last_slash + colon + 1..]),
        ),
        None => (rest, None),
    };
    let version = digest.or(tag).unwrap_or("latest").to_owned();
    let mut parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 1 {
        let host = parts[0];
        if host.contains('.') || host.contains(':') || host == "localhost" {
            parts[0] = host.split(':').next().unwrap_or(host);
        }
    }
    (parts.join("/"), version)
}

/// gitlab-runner's default aliases: `/` replaced by `__`, and by `-` when
/// that differs.
pub(crate) fn default_aliases(image: &str) -> Vec<String> {
    let (service, _) = split_name_and_version(image);
    let first = service.replace('/', "__");
    let second = service.replace('/', "-");
    if first == second {
        vec![first]
    } else {
        vec![first, second]
    }
}

/// `alias` holds several names separated by spaces or commas.
fn user_aliases(alias: &str) -> Vec<String> {
    alias
        .replace(',', " ")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Labels for everything the executor starts for an attempt.
pub(crate) fn attempt_labels(job_id: i64, attempt: u32, owner: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_JOB_ID.to_owned(), job_id.to_string()),
        (LABEL_ATTEMPT.to_owned(), attempt.to_string()),
        (LABEL_AGENT.to_owned(), owner.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_follow_gitlab_runner() {
        assert_eq!(
            default_aliases("tutum/wordpress:latest"),
            vec!["tutum__wordpress", "tutum-wordpress"]
        );
        assert_eq!(default_aliases("postgres:11.7"), vec!["postgres"]);
        assert_eq!(
            default_aliases("registry.example.com:4999/valkey/valkey"),
            vec![
                "registry.example.com__valkey__valkey",
                "registry.example.com-valkey-valkey"
            ]
        );
        assert_eq!(default_aliases("docker:24.0.5-dind"), vec!["docker"]);
        assert_eq!(
            split_name_and_version("redis@sha256:abc"),
            ("redis".to_owned(), "sha256:abc".to_owned())
        );
        assert_eq!(
            split_name_and_version("localhost:5000/app"),
            ("localhost/app".to_owned(), "latest".to_owned())
        );
        assert_eq!(user_aliases("db, pg  cache"), vec!["db", "pg", "cache"]);
    }
}
