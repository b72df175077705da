//! Where jobs' caches live, and the access each assignment carries: for
//! each `cache[]` entry of a job, the keys to restore from (the primary,
//! then the fallbacks) and where to save the primary, as pre-signed S3 URLs
//! (the coordinator holds the credentials; instances need none) or as
//! files in a directory on this machine (the local fleet).
//!
//! Keys and object names follow gitlab-runner exactly (variables expanded,
//! keys sanitised, `<path>/runner/<short token>/project/<id>/<key>`), so a
//! team can share caches with the gitlab-runner fleets it already has.
//!
//! Not responsible for archives or transfers (the agent's), nor for
//! deciding which entries apply to a job's result (the agent applies
//! `policy` and `when`).

use std::path::PathBuf;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::presigning::PresigningConfig;
use servitor_proto::agent::{CacheAccess, CacheObject};
use servitor_proto::job::{Cache, JobPayload};

use crate::config::{CacheConfig, CacheKind};

/// URLs stay valid this much longer than the job's timeout: the job may
/// wait for an instance first.
const URL_SLACK: Duration = Duration::from_secs(3600);
/// S3 refuses pre-signed URLs valid for longer than a week.
const URL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why the cache store could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cache: {0}")]
pub struct CacheError(String);

/// Where the objects are.
#[derive(Debug)]
enum Backend {
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
    },
    Local {
        dir: PathBuf,
    },
}

/// The cache storage jobs' assignments point into.
#[derive(Debug)]
pub struct CacheStore {
    backend: Backend,
    /// `[cache] path`.
    prefix: String,
    /// `runner/<short token>`, or empty for a shared cache.
    namespace: String,
}

impl CacheStore {
    /// The store `config` names, for the runner with `runner_token`.
    pub async fn new(config: &CacheConfig, runner_token: &str) -> Result<Self, CacheError> {
        let backend = match (config.kind, &config.s3, &config.local) {
            (CacheKind::S3, Some(s3), _) => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(region) = &s3.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                let shared = loader.load().await;
                let mut builder = aws_sdk_s3::config::Builder::from(&shared);
                if let Some(url) = &s3.endpoint_url {
                    builder = builder.endpoint_url(url.clone()).force_path_style(true);
                }
                Backend::S3 {
                    client: aws_sdk_s3::Client::from_conf(builder.build()),
                    bucket: s3.bucket.clone(),
                }
            }
            (CacheKind::Local, _, Some(local)) => Backend::Local {
                dir: local.dir.clone(),
            },
            _ => {
                return Err(CacheError(
                    "the [cache] table names no storage; run check-config".into(),
                ))
            }
        };
        Ok(Self::with_backend(
            backend,
            config.path.clone(),
            config.shared,
            runner_token,
        ))
    }

    /// A store in `dir` on this machine (the local fleet's default).
    pub fn local(dir: PathBuf, runner_token: &str) -> Self {
        Self::with_backend(Backend::Local { dir }, String::new(), false, runner_token)
    }

    fn with_backend(backend: Backend, prefix: String, shared: bool, runner_token: &str) -> Self {
        let namespace = if shared {
            String::new()
        } else {
            format!("runner/{}", shorten_token(runner_token))
        };
        Self {
            backend,
            prefix,
            namespace,
        }
    }

    /// Where the agent reads and writes each of `job`'s caches. Entries
    /// with nothing to cache get none. A key that cannot be signed is left
    /// out with a warning for the log: a cache never fails a job.
    pub async fn access(&self, job: &JobPayload) -> Vec<CacheAccess> {
        let expires = (job.runner_info.timeout() + URL_SLACK).min(URL_MAX);
        let mut all = Vec::new();
        for (index, entry) in job.cache.iter().enumerate() {
            if entry.paths.is_empty() && !entry.untracked {
                continue;
            }
            let keys = keys_for(job, entry);
            let mut access = CacheAccess {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                warnings: keys.warnings,
                ..CacheAccess::default()
            };
            let Some(primary) = keys.primary else {
                all.push(access);
                continue;
            };
            for key in std::iter::once(&primary).chain(&keys.fallbacks) {
                match self.object(job, key, Op::Get, expires).await {
                    Ok(object) => access.restore.push(object),
                    Err(e) => access
                        .warnings
                        .push(format!("cache key {key:?} cannot be read: {e}")),
                }
            }
            match self.object(job, &primary, Op::Put, expires).await {
                Ok(object) => access.save = Some(object),
                Err(e) => access
                    .warnings
                    .push(format!("cache key {primary:?} cannot be written: {e}")),
            }
            all.push(access);
        }
        all
    }

    async fn object(
        &self,
        job: &JobPayload,
        key: &str,
        op: Op,
        expires: Duration,
    ) -> Result<CacheObject, String> {
        let name = object_name(&self.prefix, &self.namespace, job.job_info.project_id, key);
        match &self.backend {
            Backend::Local { dir } => Ok(CacheObject {
                key: key.to_owned(),
                path: dir.join(&name).to_string_lossy().into_owned(),
                ..CacheObject::default()
            }),
            Backend::S3 { client, bucket } => {
                let config = PresigningConfig::expires_in(expires).map_err(|e| e.to_string())?;
                let signed = match op {
                    Op::Get => client
                        .get_object()
                        .bucket(bucket)
                        .key(&name)
                        .presigned(config)
                        .await
                        .map_err(|e| e.to_string())?,
                    Op::Put => client
                        .put_object()
                        .bucket(bucket)
                        .key(&name)
                        .metadata("cachekey", key)
                        .presigned(config)
                        .await
                        .map_err(|e| e.to_string())?,
                };
                Ok(CacheObject {
                    key: key.to_owned(),
                    url: signed.uri().to_owned(),
                    headers: signed
                        .headers()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    path: String::new(),
                })
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Get,
    Put,
}

/// A job cache entry's keys, as gitlab-runner computes them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Keys {
    /// `None` when the key sanitises to nothing.
    primary: Option<String>,
    fallbacks: Vec<String>,
    warnings: Vec<String>,
}

/// The primary key (variables expanded, or `<job name>/<ref>` when
/// empty), the entry's `fallback_keys`, then `CACHE_FALLBACK_KEY` unless it
/// names a protected cache; each sanitised.
fn keys_for(job: &JobPayload, entry: &Cache) -> Keys {
    let mut keys = Keys::default();
    let mut raw = job.expand(&entry.key);
    if raw.is_empty() {
        raw = format!("{}/{}", job.job_info.name, job.git_info.git_ref);
    }
    keys.primary = sanitize_into(&raw, &mut keys.warnings);
    for fallback in &entry.fallback_keys {
        if let Some(key) = sanitize_into(&job.expand(fallback), &mut keys.warnings) {
            keys.fallbacks.push(key);
        }
    }
    if let Some(global) = job.variable("CACHE_FALLBACK_KEY").filter(|k| !k.is_empty()) {
        if global
            .trim_end_matches(|c: char| c == '.' || c.is_whitespace())
            .ends_with("-protected")
        {
            keys.warnings.push(format!(
                "CACHE_FALLBACK_KEY {global:?} not allowed to end in \"-protected\""
            ));
        } else if let Some(key) = sanitize_into(global, &mut keys.warnings) {
            keys.fallbacks.push(key);
        }
    }
    keys
}

fn sanitize_into(raw: &str, warnings: &mut Vec<String>) -> Option<String> {
    match sanitize_key(raw) {
        Some(key) => {
            if key != raw {
                warnings.push(format!("cache key {raw:?} sanitized to {key:?}"));
            }
            Some(key)
        }
        None => {
            warnings.push(format!("cache key {raw:?} could not be sanitized"));
            None
        }
    }
}

/// gitlab-runner's `cachekey.Sanitize`: `%2F`/`%2E` and `\` decoded to
/// `/` and `.`, the path cleaned as if rooted (no `..` above the top), the
/// leading `/` dropped, trailing blanks trimmed from the last segments
/// (dropping segments left empty). `None` when nothing is left.
pub fn sanitize_key(raw: &str) -> Option<String> {
    let decoded = raw
        .replace("%2f", "/")
        .replace("%2F", "/")
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace('\\', "/");
    let mut parts: Vec<&str> = Vec::new();
    for part in decoded.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    while let Some(last) = parts.last_mut() {
        let trimmed = last.trim_end();
        if trimmed.is_empty() {
            parts.pop();
        } else {
            *last = trimmed;
            break;
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// gitlab-runner's `ShortenToken`: the token without its type prefix,
/// first 9 characters.
pub fn shorten_token(token: &str) -> String {
    let mut rest = token;
    for prefix in ["glrtr-", "glrt-", "glcbt-"] {
        if let Some(stripped) = rest.strip_prefix(prefix) {
            rest = stripped;
            break;
        }
    }
    for prefix in ["t1_", "t2_", "t3_"] {
        if let Some(stripped) = rest.strip_prefix(prefix) {
            rest = stripped;
            break;
        }
    }
    if rest.starts_with("GR")
        && rest
            .get(2..9)
            .is_some_and(|hex| hex.chars().all(|c| c.is_ascii_hexdigit()))
    {
        rest = rest.get(9..).unwrap_or_default();
    }
    rest.chars().take(9).collect()
}

/// `<prefix>/<namespace>/project/<id>/<key>`, empty parts left out.
fn object_name(prefix: &str, namespace: &str, project_id: i64, key: &str) -> String {
    let project = format!("project/{project_id}");
    [prefix.trim_matches('/'), namespace, &project, key]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use servitor_proto::job::{GitInfo, JobInfo, JobVariable};

    #[test]
    fn keys_are_sanitised_as_gitlab_runner_does() {
        let cases = [
            ("default", Some("default")),
            ("feature%2Fone", Some("feature/one")),
            ("a\\b", Some("a/b")),
            ("../../etc/passwd", Some("etc/passwd")),
            ("/lead/", Some("lead")),
            ("key  /  ", Some("key")),
            ("%2e%2e", None),
            ("  ", None),
        ];
        for (raw, want) in cases {
            assert_eq!(sanitize_key(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn object_names_follow_gitlab_runners_layout() {
        assert_eq!(
            object_name(
                "",
                &format!("runner/{}", shorten_token("longtoken")),
                10,
                "key"
            ),
            "runner/longtoken/project/10/key"
        );
        assert_eq!(
            object_name("whatever", "runner/longtoken", 10, "key"),
            "whatever/runner/longtoken/project/10/key"
        );
        assert_eq!(object_name("", "", 10, "key"), "project/10/key");
        assert_eq!(shorten_token("glrt-t1_abcdefghijkl"), "abcdefghi");
        assert_eq!(shorten_token("glrt-abcdefghijkl"), "abcdefghi");
        assert_eq!(shorten_token("GR1348941abcdefghijkl"), "abcdefghi");
        assert_eq!(shorten_token("short"), "short");
    }

    fn job(variables: &[(&str, &str)]) -> JobPayload {
        JobPayload {
            id: 1,
            token: "t".into(),
            job_info: JobInfo {
                name: "rspec".into(),
                project_id: 7,
                ..JobInfo::default()
            },
            git_info: GitInfo {
                git_ref: "main".into(),
                ..GitInfo::default()
            },
            variables: variables
                .iter()
                .map(|(k, v)| JobVariable {
                    key: (*k).into(),
                    value: (*v).into(),
                    ..JobVariable::default()
                })
                .collect(),
            ..JobPayload::default()
        }
    }

    #[test]
    fn fallbacks_come_after_the_primary_and_protected_global_keys_are_refused() {
        let entry = Cache {
            key: "deps-$CI_COMMIT_REF_SLUG".into(),
            paths: vec!["vendor/".into()],
            fallback_keys: vec!["deps-main".into()],
            ..Cache::default()
        };
        let keys = keys_for(
            &job(&[
                ("CI_COMMIT_REF_SLUG", "feature"),
                ("CACHE_FALLBACK_KEY", "deps-base"),
            ]),
            &entry,
        );
        assert_eq!(keys.primary.as_deref(), Some("deps-feature"));
        assert_eq!(keys.fallbacks, vec!["deps-main", "deps-base"]);
        assert!(keys.warnings.is_empty());

        let keys = keys_for(&job(&[("CACHE_FALLBACK_KEY", "x-protected")]), &entry);
        assert_eq!(keys.fallbacks, vec!["deps-main"]);
        assert!(
            keys.warnings[0].contains("-protected"),
            "{:?}",
            keys.warnings
        );

        let unnamed = Cache {
            paths: vec!["x".into()],
            ..Cache::default()
        };
        assert_eq!(
            keys_for(&job(&[]), &unnamed).primary.as_deref(),
            Some("rspec/main")
        );
    }

    #[tokio::test]
    async fn the_local_store_points_at_files_in_its_directory() {
        let store = CacheStore::local(PathBuf::from("/var/cache/servitor"), "glrt-abcdefghijkl");
        let mut payload = job(&[]);
        payload.cache = vec![
            Cache {
                key: "deps".into(),
                paths: vec!["vendor/".into()],
                fallback_keys: vec!["base".into()],
                ..Cache::default()
            },
            // Nothing to cache: no access.
            Cache {
                key: "empty".into(),
                ..Cache::default()
            },
        ];
        let access = store.access(&payload).await;
        assert_eq!(access.len(), 1);
        let paths: Vec<&str> = access[0].restore.iter().map(|o| o.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "/var/cache/servitor/runner/abcdefghi/project/7/deps",
                "/var/cache/servitor/runner/abcdefghi/project/7/base"
            ]
        );
        assert_eq!(
            access[0].save.as_ref().unwrap().path,
            "/var/cache/servitor/runner/abcdefghi/project/7/deps"
        );
    }
}
