//! Fetches a job's sources on the host with the `git` CLI, the way
//! gitlab-runner's fetch strategy does: `git init`, a remote without
//! credentials, `git fetch` of the job's refspecs at its depth, and a
//! detached checkout of the job's commit.
//!
//! The job token never reaches the remote's configuration, a command line or
//! the job log: it travels as an HTTP `Authorization` header given to git
//! through its environment. Git may not prompt for anything nor ask a
//! credential helper of the host. `GIT_STRATEGY` (clone, fetch, none,
//! empty), `GIT_CHECKOUT`, `GIT_CLEAN_FLAGS`, `GIT_FETCH_EXTRA_FLAGS` and
//! submodules (`GIT_SUBMODULE_*`) follow gitlab-runner; LFS is not
//! handled here.

use std::path::Path;
use std::process::Stdio;

use servitor_proto::job::JobPayload;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::output::JobOutput;
use super::process::ProcessGroup;

/// How much of a commit id the log shows, as gitlab-runner does.
const SHORT_SHA_LEN: usize = 8;

/// Lines of git's output kept to explain a failure.
const ERROR_TAIL_LINES: usize = 20;

/// The user GitLab expects with a job token (`gitlab-ci-token`).
const JOB_TOKEN_USER: &str = "gitlab-ci-token";

/// What replaces a secret that shows up in git's output.
const MASK: &str = "[MASKED]";

/// Why the sources could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("cannot run git: {0}; install git on the agent's host")]
    GitMissing(#[source] std::io::Error),
    #[error("cannot create project directory {path}: {source}; check the agent's work directory")]
    ProjectDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("git {step} failed: {reason}")]
    Git { step: &'static str, reason: String },
}

/// The repository URL split into what may be shown and what must not.
#[derive(Clone, PartialEq, Eq)]
struct RepoUrl {
    /// The URL without user information: safe for logs and `.git/config`.
    display: String,
    /// `scheme://host[:port]/`, the prefix git's per-URL config matches.
    origin: Option<String>,
    /// User and password from the URL's user information.
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoUrl")
            .field("display", &self.display)
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .finish()
    }
}

impl RepoUrl {
    fn parse(url: &str) -> Self {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Self {
                display: url.to_owned(),
                origin: None,
                credentials: None,
            };
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        let credentials = userinfo.map(|info| match info.split_once(':') {
            Some((user, password)) => (percent_decode(user), percent_decode(password)),
            None => (percent_decode(info), String::new()),
        });
        Self {
            display: format!("{scheme}://{host}{path}"),
            origin: Some(format!("{scheme}://{host}/")),
            credentials,
        }
    }

    /// Replaces the password wherever it appears in `text`.
    fn scrub(&self, text: &str) -> String {
        match &self.credentials {
            Some((_, password)) if !password.is_empty() => text.replace(password.as_str(), MASK),
            _ => text.to_owned(),
        }
    }
}

/// Decodes `%XX` escapes of URL user information; anything malformed is kept.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(value) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 with padding, for a Basic `Authorization` header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Fetches `job`'s sources into `project_dir`, writing progress to `out`.
///
/// With `GIT_STRATEGY=none`, or without a repository URL, it only creates
/// the project directory.
///
/// # Errors
/// Fails when git is missing, the directory cannot be created, or a git step
/// fails; the message says why (authentication, unknown host, missing
/// commit) and never contains the job token.
pub async fn fetch(
    job: &JobPayload,
    project_dir: &Path,
    out: &JobOutput,
) -> Result<(), SourcesError> {
    let create_dir = || async {
        tokio::fs::create_dir_all(project_dir)
            .await
            .map_err(|source| SourcesError::ProjectDir {
                path: project_dir.to_path_buf(),
                source,
            })
    };
    let strategy = Strategy::of(job, out).await;
    match strategy {
        Strategy::None => {
            out.info("Skipping Git repository setup").await;
            return create_dir().await;
        }
        Strategy::Empty => {
            out.info("Skipping Git repository setup and creating an empty build directory")
                .await;
            remove_dir(project_dir).await?;
            return create_dir().await;
        }
        Strategy::Clone | Strategy::Fetch => {}
    }
    let git_info = &job.git_info;
    if git_info.repo_url.is_empty() {
        out.info("Skipping Git repository setup: the job has no repository URL")
            .await;
        return create_dir().await;
    }
    let url = RepoUrl::parse(&git_info.repo_url);
    let git = Git {
        dir: project_dir,
        url: &url,
        out,
    };

    if git_info.depth > 0 {
        out.info(&format!(
            "Fetching changes with git depth set to {}...",
            git_info.depth
        ))
        .await;
    } else {
        out.info("Fetching changes...").await;
    }
    if strategy == Strategy::Clone {
        remove_dir(project_dir).await?;
    }
    create_dir().await?;
    // A directory kept from an earlier run is fetched into, as
    // gitlab-runner's fetch strategy does.
    let existing = tokio::fs::metadata(project_dir.join(".git")).await.is_ok();
    git.run(
        "init",
        &["-c", "init.defaultBranch=main", "init", "--quiet"],
    )
    .await?;
    if existing {
        out.line(&format!(
            "Reinitialized existing Git repository in {}/.git/",
            project_dir.display()
        ))
        .await;
        git.run(
            "remote set-url",
            &["remote", "set-url", "origin", &url.display],
        )
        .await?;
    } else {
        out.line(&format!(
            "Initialized empty Git repository in {}/.git/",
            project_dir.display()
        ))
        .await;
        out.line("Created fresh repository.").await;
        git.run("remote add", &["remote", "add", "origin", &url.display])
            .await?;
    }

    let refspecs = refspecs(job);
    let depth = git_info.depth.to_string();
    let mut args = vec!["fetch", "origin", "--no-recurse-submodules"];
    args.extend(refspecs.iter().map(String::as_str));
    if git_info.depth > 0 {
        args.extend(["--depth", depth.as_str()]);
    }
    let extra = flags(job, "GIT_FETCH_EXTRA_FLAGS", "--prune --quiet");
    args.extend(extra.iter().map(String::as_str));
    git.run("fetch", &args).await?;

    if job.variable("GIT_CHECKOUT") == Some("false") {
        out.info("Skipping Git checkout").await;
    } else {
        let target = if git_info.sha.is_empty() {
            "FETCH_HEAD"
        } else {
            git_info.sha.as_str()
        };
        let short: String = target.chars().take(SHORT_SHA_LEN).collect();
        out.info(&format!(
            "Checking out {short} as detached HEAD (ref is {})...",
            git_info.git_ref
        ))
        .await;
        git.run(
            "checkout",
            &[
                "-c",
                "submodule.recurse=false",
                "checkout",
                "-f",
                "-q",
                target,
            ],
        )
        .await?;
        let clean = flags(job, "GIT_CLEAN_FLAGS", "-ffdx");
        if !clean.is_empty() {
            let mut args = vec!["clean"];
            args.extend(clean.iter().map(String::as_str));
            git.run("clean", &args).await?;
        }
    }
    out.line("").await;
    submodules(job, &git).await
}

/// gitlab-runner's `GIT_STRATEGY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Clone,
    Fetch,
    None,
    Empty,
}

impl Strategy {
    /// The job's strategy; an unknown value is warned about and the
    /// default (fetch when GitLab allows it, else clone) used.
    async fn of(job: &JobPayload, out: &JobOutput) -> Self {
        let default = if job.allow_git_fetch {
            (Strategy::Fetch, "fetch")
        } else {
            (Strategy::Clone, "clone")
        };
        match job.variable("GIT_STRATEGY").unwrap_or_default() {
            "" => default.0,
            "clone" => Strategy::Clone,
            "fetch" => Strategy::Fetch,
            "none" => Strategy::None,
            "empty" => Strategy::Empty,
            other => {
                out.warning(&format!(
                    "GIT_STRATEGY: expected either 'clone', 'fetch', 'none' or 'empty' got {other:?}, using default value {:?}",
                    default.1
                ))
                .await;
                default.0
            }
        }
    }
}

/// A flags variable split into words: `default` when unset, nothing when
/// `none`.
fn flags(job: &JobPayload, key: &str, default: &str) -> Vec<String> {
    match job.variable(key) {
        Some("none") => Vec::new(),
        Some(value) if !value.trim().is_empty() => {
            value.split_whitespace().map(str::to_owned).collect()
        }
        _ => default.split_whitespace().map(str::to_owned).collect(),
    }
}

async fn remove_dir(dir: &Path) -> Result<(), SourcesError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SourcesError::ProjectDir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// `GIT_SUBMODULE_STRATEGY` (`none`, `normal`, `recursive`) with
/// `GIT_SUBMODULE_DEPTH`, `GIT_SUBMODULE_UPDATE_FLAGS` and
/// `GIT_SUBMODULE_PATHS`, in gitlab-runner's commands and words. Submodules
/// on the same GitLab are fetched with the job token like the project.
async fn submodules(job: &JobPayload, git: &Git<'_>) -> Result<(), SourcesError> {
    let out = git.out;
    let recursive = match job.variable("GIT_SUBMODULE_STRATEGY").unwrap_or("none") {
        "" | "none" => {
            out.info("Skipping Git submodules setup").await;
            return Ok(());
        }
        "normal" => false,
        "recursive" => true,
        other => {
            return Err(SourcesError::Git {
                step: "submodules",
                reason: format!(
                "GIT_SUBMODULE_STRATEGY {other:?}: expected either 'normal', 'recursive' or 'none'"
            ),
            })
        }
    };
    let depth = job
        .variable("GIT_SUBMODULE_DEPTH")
        .and_then(|d| d.trim().parse::<i64>().ok())
        .unwrap_or(job.git_info.depth);
    let mut heading = String::from("Updating/initializing submodules");
    if recursive {
        heading.push_str(" recursively");
    }
    if depth > 0 {
        heading.push_str(&format!(" with git depth set to {depth}"));
    }
    out.info(&format!("{heading}...")).await;
    let paths: Vec<String> = job
        .variable("GIT_SUBMODULE_PATHS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let with_paths = |mut args: Vec<String>| {
        if !paths.is_empty() {
            args.push("--".to_owned());
            args.extend(paths.iter().cloned());
        }
        args
    };
    let rec: &[&str] = if recursive { &["--recursive"] } else { &[] };
    let run = |step: &'static str, args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git.run(step, &args).await
    };
    run(
        "submodule init",
        with_paths(strings(&["submodule", "init"])),
    )
    .await?;
    let mut sync = strings(&["submodule", "sync"]);
    sync.extend(strings(rec));
    run("submodule sync", with_paths(sync.clone())).await?;
    let clean = flags(job, "GIT_CLEAN_FLAGS", "-ffdx");
    if !clean.is_empty() {
        let mut args = strings(&["submodule", "foreach"]);
        args.extend(strings(rec));
        args.push(format!("git clean {}", clean.join(" ")));
        run("submodule clean", args).await?;
    }
    let mut update = strings(&["submodule", "update", "--init"]);
    update.extend(strings(rec));
    if depth > 0 {
        update.push("--depth".to_owned());
        update.push(depth.to_string());
    }
    update.extend(flags(job, "GIT_SUBMODULE_UPDATE_FLAGS", ""));
    run("submodule update", with_paths(update)).await?;
    out.info("Updated submodules").await;
    Ok(())
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The job's refspecs, or the ones GitLab would send for its ref.
fn refspecs(job: &JobPayload) -> Vec<String> {
    let info = &job.git_info;
    if !info.refspecs.is_empty() {
        return info.refspecs.clone();
    }
    if info.depth > 0 && !info.git_ref.is_empty() {
        let r = &info.git_ref;
        if info.ref_type == "tag" {
            vec![format!("+refs/tags/{r}:refs/tags/{r}")]
        } else {
            vec![format!("+refs/heads/{r}:refs/remotes/origin/{r}")]
        }
    } else {
        vec![
            "+refs/heads/*:refs/remotes/origin/*".to_owned(),
            "+refs/tags/*:refs/tags/*".to_owned(),
        ]
    }
}

/// Runs git in one project directory.
struct Git<'a> {
    dir: &'a Path,
    url: &'a RepoUrl,
    out: &'a JobOutput,
}

impl Git<'_> {
    /// The configuration every git command gets through the environment
    /// (`GIT_CONFIG_COUNT`, git 2.31+): no credential helper or askpass
    /// program of the host, and the job token as a Basic `Authorization`
    /// header sent only to the repository's own origin.
    fn config(&self) -> Vec<(String, String)> {
        let mut config = vec![
            ("credential.helper".to_owned(), String::new()),
            ("core.askPass".to_owned(), String::new()),
        ];
        if let (Some(origin), Some((user, password))) = (&self.url.origin, &self.url.credentials) {
            let user = if user.is_empty() {
                JOB_TOKEN_USER
            } else {
                user
            };
            let token = base64(format!("{user}:{password}").as_bytes());
            config.push((
                format!("http.{origin}.extraHeader"),
                format!("Authorization: Basic {token}"),
            ));
        }
        config
    }

    async fn run(&self, step: &'static str, args: &[&str]) -> Result<(), SourcesError> {
        let mut command = tokio::process::Command::new("git");
        command
            .arg("-C")
            .arg(self.dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never")
            .env_remove("GIT_ASKPASS")
            .env_remove("SSH_ASKPASS")
            .kill_on_drop(true)
            .process_group(0);
        let config = self.config();
        command.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (key, value)) in config.iter().enumerate() {
            command.env(format!("GIT_CONFIG_KEY_{i}"), key);
            command.env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        let mut child = command.spawn().map_err(SourcesError::GitMissing)?;
        let group = child.id().map(ProcessGroup::new);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (status, mut tail, err_tail) =
            tokio::join!(child.wait(), self.relay(stdout), self.relay(stderr));
        tail.extend(err_tail);
        if let Some(group) = group {
            group.release();
        }
        let status = status.map_err(SourcesError::GitMissing)?;
        if status.success() {
            return Ok(());
        }
        Err(SourcesError::Git {
            step,
            reason: explain_failure(&tail, &self.url.display, status.code()),
        })
    }

    /// Copies a pipe of git's into the job log line by line, with the token
    /// masked, and returns its last lines.
    async fn relay<R: AsyncRead + Unpin>(&self, pipe: Option<R>) -> Vec<String> {
        let mut tail = Vec::new();
        let Some(pipe) = pipe else { return tail };
        let mut lines = BufReader::new(pipe).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    let line = self.url.scrub(&line);
                    self.out.line(&line).await;
                    if tail.len() == ERROR_TAIL_LINES {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
                Ok(None) => return tail,
                Err(e) => {
                    tracing::warn!(error = %e, "failed to read git output");
                    return tail;
                }
            }
        }
    }
}

/// One line naming the problem behind a failed git command.
fn explain_failure(tail: &[String], url: &str, code: Option<i32>) -> String {
    let text = tail.join("\n");
    let has = |needle: &str| text.contains(needle);
    if has("Authentication failed")
        || has("could not read Username")
        || has("could not read Password")
        || has("HTTP Basic: Access denied")
        || has("The requested URL returned error: 401")
        || has("The requested URL returned error: 403")
    {
        format!("authentication failed for {url}: GitLab refused the job token (the job may be finished or canceled, or its token may not read this project)")
    } else if has("Could not resolve host") {
        format!("cannot resolve the host of {url}; check DNS and the network of the agent's host")
    } else if has("does not appear to be a git repository")
        || has("repository not found")
        || has("Repository not found")
        || has("returned error: 404")
    {
        format!("repository {url} not found")
    } else if has("reference is not a tree")
        || has("did not match any file")
        || has("unknown revision")
    {
        "the job's commit is not in the fetched refs; it may have been force-pushed away".to_owned()
    } else {
        let last = tail.iter().rev().find(|l| !l.trim().is_empty());
        match (last, code) {
            (Some(line), _) => line.trim().to_owned(),
            (None, Some(code)) => format!("exit code {code}"),
            (None, None) => "killed by a signal".to_owned(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use servitor_proto::job::GitInfo;
    use tokio::sync::mpsc;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .output()
            .expect("these tests need git on the host: install git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A bare repository with two commits on `main`; returns its `file://`
    /// URL and the commit ids, oldest first.
    fn upstream(root: &Path) -> (String, Vec<String>) {
        let work = root.join("work");
        let bare = root.join("upstream.git");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        let mut shas = Vec::new();
        for (i, content) in ["first", "second"].into_iter().enumerate() {
            std::fs::write(work.join("file.txt"), content).unwrap();
            git(&work, &["add", "file.txt"]);
            git(&work, &["commit", "-q", "-m", &format!("commit {i}")]);
            shas.push(git(&work, &["rev-parse", "HEAD"]));
        }
        git(
            root,
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
        );
        (format!("file://{}", bare.display()), shas)
    }

    fn job(url: &str, sha: &str, depth: i64) -> JobPayload {
        JobPayload {
            id: 1,
            token: "t".into(),
            // GitLab's default: the fetch strategy.
            allow_git_fetch: true,
            git_info: GitInfo {
                repo_url: url.into(),
                git_ref: "main".into(),
                sha: sha.into(),
                ref_type: "branch".into(),
                refspecs: vec!["+refs/heads/main:refs/remotes/origin/main".into()],
                depth,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    async fn fetch_collecting(job: &JobPayload, dir: &Path) -> (Result<(), SourcesError>, String) {
        let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(1024);
        let collector = tokio::spawn(async move {
            let mut text = Vec::new();
            while let Some(chunk) = rx.recv().await {
                text.extend_from_slice(&chunk);
            }
            String::from_utf8_lossy(&text).into_owned()
        });
        let out = JobOutput::new(tx, false);
        let result = fetch(job, dir, &out).await;
        drop(out);
        (result, collector.await.unwrap())
    }

    #[tokio::test]
    async fn fetches_and_checks_out_the_jobs_commit() {
        let root = tempfile::tempdir().unwrap();
        let (url, shas) = upstream(root.path());
        let dir = root.path().join("builds/group/project");
        // The older commit: the checkout must pick the job's sha, not the tip.
        let (result, log) = fetch_collecting(&job(&url, &shas[0], 0), &dir).await;
        result.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("file.txt")).unwrap(),
            "first"
        );
        assert!(log.contains("Fetching changes..."), "{log}");
        assert!(
            log.contains(&format!(
                "Checking out {} as detached HEAD (ref is main)...",
                &shas[0][..8]
            )),
            "{log}"
        );
        // A second run into the same directory fetches again and moves on,
        // cleaning what the first left behind.
        std::fs::write(dir.join("left-behind.txt"), "x").unwrap();
        let (result, log) = fetch_collecting(&job(&url, &shas[1], 0), &dir).await;
        result.unwrap();
        assert!(
            log.contains("Reinitialized existing Git repository"),
            "{log}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("file.txt")).unwrap(),
            "second"
        );
        assert!(!dir.join("left-behind.txt").exists(), "git clean -ffdx ran");
        // The clone strategy starts from nothing.
        let mut clone = job(&url, &shas[1], 0);
        clone.allow_git_fetch = false;
        let (result, log) = fetch_collecting(&clone, &dir).await;
        result.unwrap();
        assert!(log.contains("Created fresh repository."), "{log}");
    }

    #[tokio::test]
    async fn shallow_fetch_reports_its_depth() {
        let root = tempfile::tempdir().unwrap();
        let (url, shas) = upstream(root.path());
        let dir = root.path().join("project");
        let (result, log) = fetch_collecting(&job(&url, &shas[1], 1), &dir).await;
        result.unwrap();
        assert!(
            log.contains("Fetching changes with git depth set to 1..."),
            "{log}"
        );
        assert_eq!(git(&dir, &["rev-list", "--count", "HEAD"]), "1");
        assert_eq!(
            std::fs::read_to_string(dir.join("file.txt")).unwrap(),
            "second"
        );
    }

    #[tokio::test]
    async fn a_missing_repository_fails_without_leaking_credentials() {
        let root = tempfile::tempdir().unwrap();
        let secret = "glcbt-very-secret";
        let url = format!(
            "file://gitlab-ci-token:{secret}@/{}/missing.git",
            root.path().display()
        );
        let dir = root.path().join("project");
        let (result, log) = fetch_collecting(&job(&url, "abc", 0), &dir).await;
        let err = result.unwrap_err().to_string();
        assert!(err.starts_with("git fetch failed"), "{err}");
        assert!(!err.contains(secret), "{err}");
        assert!(!log.contains(secret), "{log}");
        let config = std::fs::read_to_string(dir.join(".git/config")).unwrap();
        assert!(!config.contains(secret), "{config}");
    }

    #[tokio::test]
    async fn no_url_or_strategy_none_skips_fetching() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p");
        let (result, log) = fetch_collecting(&job("", "", 0), &dir).await;
        result.unwrap();
        assert!(dir.is_dir());
        assert!(log.contains("Skipping Git repository setup"), "{log}");
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        let url =
            RepoUrl::parse("https://gitlab-ci-token:s%40cret@gitlab.example.com:8443/g/p.git");
        assert_eq!(url.display, "https://gitlab.example.com:8443/g/p.git");
        assert_eq!(
            url.origin.as_deref(),
            Some("https://gitlab.example.com:8443/")
        );
        assert_eq!(
            url.credentials,
            Some(("gitlab-ci-token".to_owned(), "s@cret".to_owned()))
        );
        assert_eq!(url.scrub("fatal: s@cret here"), "fatal: [MASKED] here");
        assert!(!format!("{url:?}").contains("s@cret"));
        let plain = RepoUrl::parse("https://gitlab.example.com/g/p.git");
        assert_eq!(plain.display, "https://gitlab.example.com/g/p.git");
        assert!(plain.credentials.is_none());
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("gitlab-ci-token:abc", "Z2l0bGFiLWNpLXRva2VuOmFiYw=="),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn failures_are_explained() {
        let tail = vec!["fatal: Authentication failed for 'https://h/p.git/'".to_owned()];
        assert!(explain_failure(&tail, "https://h/p.git", Some(128))
            .starts_with("authentication failed"));
        let tail = vec!["fatal: unable to access 'x': Could not resolve host: h".to_owned()];
        assert!(explain_failure(&tail, "u", Some(128)).starts_with("cannot resolve"));
        assert_eq!(explain_failure(&[], "u", Some(2)), "exit code 2");
    }

    #[tokio::test]
    async fn the_token_is_sent_as_a_header_to_the_origin_only() {
        let root = tempfile::tempdir().unwrap();
        let url = RepoUrl::parse("https://gitlab-ci-token:tok@gitlab.example.com/g/p.git");
        let (tx, _rx) = mpsc::channel(16);
        let out = JobOutput::new(tx, false);
        let git = Git {
            dir: root.path(),
            url: &url,
            out: &out,
        };
        let config = git.config();
        // `git config --get-urlmatch` shows what git would send to a URL,
        // with the configuration given the way fetch gets it.
        let header_for = |target: &str| {
            let mut command = std::process::Command::new("git");
            command.args(["config", "--get-urlmatch", "http.extraHeader", target]);
            command.env("GIT_CONFIG_COUNT", config.len().to_string());
            for (i, (key, value)) in config.iter().enumerate() {
                command.env(format!("GIT_CONFIG_KEY_{i}"), key);
                command.env(format!("GIT_CONFIG_VALUE_{i}"), value);
            }
            let out = command.output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(
            header_for("https://gitlab.example.com/g/p.git"),
            format!("Authorization: Basic {}", base64(b"gitlab-ci-token:tok"))
        );
        assert_eq!(header_for("https://elsewhere.example.com/g/p.git"), "");
    }
}
