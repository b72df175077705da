//! Registry credentials for the pulls of a job's image and services, found
//! as gitlab-runner's docker executor finds them: from the job variable
//! `DOCKER_AUTH_CONFIG`, then the instance's own Docker client config, then
//! the registry logins GitLab sends with the job (`credentials[]`). The
//! first source that names a registry path wins; an image uses the longest
//! registry path that is a prefix of its normalised reference.
//!
//! Not responsible for pulling (the Docker executor does) nor for storing
//! anything: credentials live for one job and only go to the local engine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use serde::Deserialize;
use servitor_proto::job::JobPayload;
use tokio::io::AsyncWriteExt as _;

/// The job variable that carries a Docker client config.
pub const AUTH_CONFIG_VARIABLE: &str = "DOCKER_AUTH_CONFIG";
/// Docker Hub's canonical registry name.
const DOCKER_HUB: &str = "docker.io";
/// Names Docker Hub also goes by in client configs.
const DOCKER_HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];
/// How long a credential helper may take to answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// The username a credential helper gives for an identity token.
const IDENTITY_TOKEN_USER: &str = "<token>";

/// Why the job's registry credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the {AUTH_CONFIG_VARIABLE} variable is not a Docker client config ({0}); set it to the JSON of a ~/.docker/config.json, such as {{\"auths\": {{\"registry.example.com\": {{\"auth\": \"<base64 of user:password>\"}}}}}}")]
    NotAConfig(String),
    #[error("the {origin} entry for registry {registry:?} has an `auth` that is not base64 of user:password; write it as `echo -n user:password | base64`")]
    BadAuth { origin: String, registry: String },
    #[error("the {origin} names credential helper {helper:?}, which is not a plain program name; name the helper as `docker-credential-<name>` is installed, without a path")]
    BadHelper { origin: String, helper: String },
}

/// Where a login came from, as the job's log names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The `DOCKER_AUTH_CONFIG` job variable.
    JobVariable,
    /// The instance's Docker client config file.
    HostConfig(PathBuf),
    /// The job's `credentials[]` from GitLab.
    Payload,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::JobVariable => write!(f, "${AUTH_CONFIG_VARIABLE}"),
            Origin::HostConfig(path) => write!(f, "{}", path.display()),
            Origin::Payload => write!(f, "job payload (GitLab Registry)"),
        }
    }
}

/// How to get one registry's login.
#[derive(Clone, PartialEq, Eq)]
enum Secret {
    Password {
        username: String,
        password: String,
    },
    IdentityToken(String),
    /// Ask `docker-credential-<helper> get` for the server as written.
    Helper {
        helper: String,
        server: String,
    },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Password { username, .. } => write!(f, "Password({username}, ***)"),
            Secret::IdentityToken(_) => write!(f, "IdentityToken(***)"),
            Secret::Helper { helper, server } => write!(f, "Helper({helper}, {server})"),
        }
    }
}

#[derive(Clone, Debug)]
struct Login {
    secret: Secret,
    origin: Origin,
}

/// The login chosen for one image.
#[derive(Clone, Debug)]
pub struct Found {
    /// What goes to the engine with the pull.
    pub credentials: DockerCredentials,
    /// Where it came from, for the log line.
    pub origin: Origin,
}

/// The registry logins one job may use, by normalised registry path.
#[derive(Clone, Debug, Default)]
pub struct RegistryAuth {
    logins: HashMap<String, Login>,
}

/// A Docker client config file, as far as logins go.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ClientConfig {
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl RegistryAuth {
    /// The logins for `job`, with the instance's client config `host` (its
    /// path and text) between the job variable and the payload.
    ///
    /// # Errors
    /// [`AuthError`] when `DOCKER_AUTH_CONFIG` is not a client config or one
    /// of its entries is unusable: the job must not pull without the login
    /// its author gave.
    pub async fn for_job(
        job: &JobPayload,
        host: Option<(PathBuf, String)>,
    ) -> Result<Self, AuthError> {
        let mut auth = Self::default();
        if let Some(text) = job
            .variables
            .iter()
            .rev()
            .find(|v| v.key == AUTH_CONFIG_VARIABLE)
            .map(|v| v.value.as_str())
        {
            let config = parse_config(text).map_err(AuthError::NotAConfig)?;
            auth.add_config(config, &Origin::JobVariable).await?;
        }
        if let Some((path, text)) = host {
            let origin = Origin::HostConfig(path);
            // The instance's own config is the operator's: a broken one
            // is logged and skipped, not blamed on the job.
            match parse_config(&text) {
                Ok(config) => {
                    if let Err(e) = auth.add_config(config, &origin).await {
                        tracing::warn!(error = %e, "ignoring the Docker client config's logins");
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %origin, error = %e, "ignoring a Docker client config that does not parse");
                }
            }
        }
        for credential in job.credentials.iter().filter(|c| c.kind == "registry") {
            auth.add(
                &credential.url,
                Secret::Password {
                    username: credential.username.clone(),
                    password: credential.password.clone(),
                },
                &Origin::Payload,
            );
        }
        Ok(auth)
    }

    /// Keeps the first login for each registry path.
    fn add(&mut self, server: &str, secret: Secret, origin: &Origin) {
        let Some(path) = normalise_server(server) else {
            return;
        };
        self.logins.entry(path).or_insert_with(|| Login {
            secret,
            origin: origin.clone(),
        });
    }

    async fn add_config(&mut self, config: ClientConfig, origin: &Origin) -> Result<(), AuthError> {
        let ClientConfig {
            auths,
            creds_store,
            cred_helpers,
        } = config;
        // Sorted, so that two spellings of one registry resolve the same
        // way every time.
        let mut helpers: Vec<_> = cred_helpers.into_iter().collect();
        helpers.sort();
        for (server, helper) in helpers {
            check_helper(&helper, origin)?;
            self.add(&server.clone(), Secret::Helper { helper, server }, origin);
        }
        let mut auths: Vec<_> = auths.into_iter().collect();
        auths.sort_by(|a, b| a.0.cmp(&b.0));
        for (server, entry) in auths {
            let secret = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Secret::IdentityToken(token)
            } else if let Some(encoded) = entry.auth.filter(|a| !a.is_empty()) {
                decode_auth(&encoded).ok_or_else(|| AuthError::BadAuth {
                    origin: origin.to_string(),
                    registry: server.clone(),
                })?
            } else if let (Some(username), Some(password)) = (entry.username, entry.password) {
                Secret::Password { username, password }
            } else if let Some(helper) = &creds_store {
                // An entry without a secret: the store holds it.
                Secret::Helper {
                    helper: helper.clone(),
                    server: server.clone(),
                }
            } else {
                continue;
            };
            self.add(&server, secret, origin);
        }
        if let Some(helper) = creds_store {
            check_helper(&helper, origin)?;
            for server in list_helper(&helper).await {
                self.add(
                    &server.clone(),
                    Secret::Helper {
                        helper: helper.clone(),
                        server,
                    },
                    origin,
                );
            }
        }
        Ok(())
    }

    /// The login for `image`, if any source names its registry: the
    /// longest registry path that is a prefix of the image's.
    pub async fn for_image(&self, image: &str) -> Option<Found> {
        let path = normalise_image(image);
        let mut candidate = path.as_str();
        let login = loop {
            if let Some(login) = self.logins.get(candidate) {
                break login;
            }
            candidate = candidate.rsplit_once('/')?.0;
        };
        let registry = path.split('/').next().unwrap_or_default().to_owned();
        let credentials = match &login.secret {
            Secret::Password { username, password } => DockerCredentials {
                username: Some(username.clone()),
                password: Some(password.clone()),
                serveraddress: Some(registry),
                ..DockerCredentials::default()
            },
            Secret::IdentityToken(token) => DockerCredentials {
                identitytoken: Some(token.clone()),
                serveraddress: Some(registry),
                ..DockerCredentials::default()
            },
            Secret::Helper { helper, server } => match get_helper(helper, server).await {
                Ok(credentials) => DockerCredentials {
                    serveraddress: Some(registry),
                    ..credentials
                },
                Err(e) => {
                    tracing::warn!(helper, server, error = %e, "credential helper gave no login");
                    return None;
                }
            },
        };
        Some(Found {
            credentials,
            origin: login.origin.clone(),
        })
    }

    /// Whether no source named any registry.
    pub fn is_empty(&self) -> bool {
        self.logins.is_empty()
    }
}

/// The instance's Docker client config: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`, else the older `~/.dockercfg`; its path and
/// text, or `None` when there is none.
pub async fn host_config() -> Option<(PathBuf, String)> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        candidates.push(Path::new(&dir).join("config.json"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let home = Path::new(&home);
        candidates.push(home.join(".docker").join("config.json"));
        candidates.push(home.join(".dockercfg"));
    }
    for path in candidates {
        if let Ok(text) = tokio::fs::read_to_string(&path).await {
            return Some((path, text));
        }
    }
    None
}

/// Reads a client config: `config.json`'s shape, or `.dockercfg`'s (the
/// `auths` map at the top).
fn parse_config(text: &str) -> Result<ClientConfig, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let object = value.as_object().ok_or("it is not a JSON object")?;
    let modern = ["auths", "credsStore", "credHelpers"]
        .iter()
        .any(|key| object.contains_key(*key));
    if modern {
        serde_json::from_value(value).map_err(|e| e.to_string())
    } else {
        let auths = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok(ClientConfig {
            auths,
            ..ClientConfig::default()
        })
    }
}

fn decode_auth(encoded: &str) -> Option<Secret> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (username, password) = text.split_once(':')?;
    Some(Secret::Password {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

fn check_helper(helper: &str, origin: &Origin) -> Result<(), AuthError> {
    let plain = !helper.is_empty()
        && helper
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !helper.starts_with('.');
    if plain {
        Ok(())
    } else {
        Err(AuthError::BadHelper {
            origin: origin.to_string(),
            helper: helper.to_owned(),
        })
    }
}

/// Runs `docker-credential-<helper> <action>` with `input` on stdin.
async fn run_helper(helper: &str, action: &str, input: &str) -> Result<Vec<u8>, String> {
    let program = format!("docker-credential-{helper}");
    let mut child = tokio::process::Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| format!("cannot write to {program}: {e}"))?;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|e| format!("{program} failed: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {action} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output.stdout)
}

/// The servers a credential store holds logins for.
async fn list_helper(helper: &str) -> Vec<String> {
    match run_helper(helper, "list", "").await {
        Ok(stdout) => serde_json::from_slice::<HashMap<String, String>>(&stdout)
            .map(|servers| servers.into_keys().collect())
            .unwrap_or_default(),
        Err(e) => {
            tracing::warn!(helper, error = %e, "cannot list the credential store's logins");
            Vec::new()
        }
    }
}

async fn get_helper(helper: &str, server: &str) -> Result<DockerCredentials, String> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let stdout = run_helper(helper, "get", server).await?;
    let answer: Answer = serde_json::from_slice(&stdout)
        .map_err(|e| format!("docker-credential-{helper} get answered no login: {e}"))?;
    Ok(if answer.username == IDENTITY_TOKEN_USER {
        DockerCredentials {
            identitytoken: Some(answer.secret),
            ..DockerCredentials::default()
        }
    } else {
        DockerCredentials {
            username: Some(answer.username),
            password: Some(answer.secret),
            ..DockerCredentials::default()
        }
    })
}

/// A registry path as configs write it (`https://index.docker.io/v1/`,
/// `Registry.example.com:5000/group`) in the form image references are
/// matched in (`docker.io`, `registry.example.com:5000/group`).
fn normalise_server(server: &str) -> Option<String> {
    let server = server.trim();
    let server = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let server = server.trim_end_matches('/');
    let server = server
        .strip_suffix("/v1")
        .or_else(|| server.strip_suffix("/v2"))
        .unwrap_or(server);
    let (host, path) = match server.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (server, None),
    };
    if host.is_empty() {
        return None;
    }
    let mut host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        host = DOCKER_HUB.to_owned();
    }
    Some(match path {
        Some(path) if !path.is_empty() => format!("{host}/{path}"),
        _ => host,
    })
}

/// An image reference without its tag or digest, with its registry made
/// explicit as Docker does: `alpine` is `docker.io/library/alpine`.
fn normalise_image(image: &str) -> String {
    let name = image.split('@').next().unwrap_or(image);
    let name = match name.rsplit_once(':') {
        Some((head, tag)) if !tag.contains('/') => head,
        _ => name,
    };
    let (first, rest) = match name.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    let is_registry = first.contains('.') || first.contains(':') || first == "localhost";
    match rest {
        Some(rest) if is_registry => {
            let host = normalise_server(first).unwrap_or_else(|| first.to_owned());
            format!("{host}/{rest}")
        }
        Some(_) => format!("{DOCKER_HUB}/{name}"),
        None => format!("{DOCKER_HUB}/library/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servitor_proto::job::{Credential, JobVariable};

    fn job(auth_config: Option<&str>, credentials: &[(&str, &str, &str)]) -> JobPayload {
        JobPayload {
            variables: auth_config
                .map(|text| JobVariable {
                    key: AUTH_CONFIG_VARIABLE.to_owned(),
                    value: text.to_owned(),
                    ..JobVariable::default()
                })
                .into_iter()
                .collect(),
            credentials: credentials
                .iter()
                .map(|(url, username, password)| Credential {
                    kind: "registry".to_owned(),
                    url: (*url).to_owned(),
                    username: (*username).to_owned(),
                    password: (*password).to_owned(),
                })
                .collect(),
            ..JobPayload::default()
        }
    }

    fn basic(user: &str, password: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    }

    async fn login(auth: &RegistryAuth, image: &str) -> Option<(String, Origin)> {
        auth.for_image(image)
            .await
            .map(|found| (found.credentials.username.unwrap_or_default(), found.origin))
    }

    #[test]
    fn images_normalise_as_docker_names_them() {
        assert_eq!(normalise_image("alpine"), "docker.io/library/alpine");
        assert_eq!(normalise_image("alpine:3.20"), "docker.io/library/alpine");
        assert_eq!(
            normalise_image("bitnami/redis:7"),
            "docker.io/bitnami/redis"
        );
        assert_eq!(
            normalise_image("Registry.Example.com:5000/group/app:1@sha256:abc"),
            "registry.example.com:5000/group/app"
        );
        assert_eq!(normalise_image("localhost/app"), "localhost/app");
        assert_eq!(
            normalise_image("index.docker.io/library/alpine"),
            "docker.io/library/alpine"
        );
    }

    #[test]
    fn servers_normalise_as_configs_write_them() {
        assert_eq!(
            normalise_server("https://index.docker.io/v1/").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            normalise_server("registry.example.com:5000/group/").as_deref(),
            Some("registry.example.com:5000/group")
        );
        assert_eq!(normalise_server("  ").as_deref(), None);
    }

    #[tokio::test]
    async fn the_job_variable_wins_over_the_host_config_and_the_payload() {
        let variable = format!(
            r#"{{"auths": {{"registry.example.com": {{"auth": "{}"}}}}}}"#,
            basic("from-variable", "a")
        );
        let host = format!(
            r#"{{"auths": {{"registry.example.com": {{"auth": "{}"}},
                            "other.example.com": {{"username": "from-host", "password": "b"}}}}}}"#,
            basic("host-loses", "x")
        );
        let auth = RegistryAuth::for_job(
            &job(
                Some(&variable),
                &[
                    ("registry.example.com", "payload-loses", "y"),
                    ("other.example.com", "payload-loses", "y"),
                    ("gitlab.example.com:5050", "gitlab-ci-token", "job-token"),
                ],
            ),
            Some((PathBuf::from("/root/.docker/config.json"), host)),
        )
        .await
        .unwrap();
        assert_eq!(
            login(&auth, "registry.example.com/app:1").await,
            Some(("from-variable".to_owned(), Origin::JobVariable))
        );
        assert_eq!(
            login(&auth, "other.example.com/app").await,
            Some((
                "from-host".to_owned(),
                Origin::HostConfig(PathBuf::from("/root/.docker/config.json"))
            ))
        );
        let found = auth
            .for_image("gitlab.example.com:5050/group/app:1")
            .await
            .unwrap();
        assert_eq!(found.origin, Origin::Payload);
        assert_eq!(found.credentials.password.as_deref(), Some("job-token"));
        assert_eq!(
            found.credentials.serveraddress.as_deref(),
            Some("gitlab.example.com:5050")
        );
        assert_eq!(login(&auth, "alpine:3").await, None);
    }

    #[tokio::test]
    async fn the_longest_registry_path_that_is_a_prefix_wins() {
        let variable = format!(
            r#"{{"auths": {{"registry.example.com": {{"auth": "{}"}},
                            "registry.example.com/team": {{"auth": "{}"}},
                            "https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
            basic("whole-registry", "a"),
            basic("team", "b"),
            basic("hub", "c")
        );
        let auth = RegistryAuth::for_job(&job(Some(&variable), &[]), None)
            .await
            .unwrap();
        assert_eq!(
            login(&auth, "registry.example.com/team/app")
                .await
                .unwrap()
                .0,
            "team"
        );
        assert_eq!(
            login(&auth, "registry.example.com/teammate/app")
                .await
                .unwrap()
                .0,
            "whole-registry"
        );
        assert_eq!(login(&auth, "alpine").await.unwrap().0, "hub");
    }

    #[tokio::test]
    async fn a_bad_job_variable_fails_with_the_fix_and_a_bad_host_config_is_skipped() {
        let err = RegistryAuth::for_job(&job(Some("user:password"), &[]), None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("DOCKER_AUTH_CONFIG"), "{err}");
        assert!(err.to_string().contains("\"auths\""), "{err}");
        let err = RegistryAuth::for_job(
            &job(
                Some(r#"{"auths": {"registry.example.com": {"auth": "%%%"}}}"#),
                &[],
            ),
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AuthError::BadAuth { .. }), "{err}");
        let err = RegistryAuth::for_job(
            &job(
                Some(r#"{"credHelpers": {"r.example.com": "../../bin/sh"}}"#),
                &[],
            ),
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AuthError::BadHelper { .. }), "{err}");
        let auth = RegistryAuth::for_job(
            &job(None, &[("r.example.com", "u", "p")]),
            Some((PathBuf::from("/x"), "not json".to_owned())),
        )
        .await
        .unwrap();
        assert_eq!(
            login(&auth, "r.example.com/app").await,
            Some(("u".to_owned(), Origin::Payload))
        );
    }

    #[tokio::test]
    async fn the_old_dockercfg_shape_is_read() {
        let host = format!(
            r#"{{"r.example.com": {{"auth": "{}", "email": "a@b"}}}}"#,
            basic("old", "p")
        );
        let auth = RegistryAuth::for_job(&job(None, &[]), Some((PathBuf::from("/x"), host)))
            .await
            .unwrap();
        assert_eq!(login(&auth, "r.example.com/app").await.unwrap().0, "old");
    }
}
