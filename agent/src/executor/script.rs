//! Turns a job payload into what runs: the directory layout of an attempt,
//! the environment (job variables, file variables, the runner's predefined
//! variables) and one POSIX `sh` script per step with gitlab-runner's
//! semantics: every command is echoed as `$ command` before it runs, and the
//! first failing command ends the script with its exit code.
//!
//! Scripts run unchanged under busybox `sh`, dash and bash. This module only
//! writes text and files; starting shells, timeouts and cancellation belong
//! to the executors.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use servitor_proto::job::JobPayload;

use super::JobContext;

/// How long `after_script` may run: gitlab-runner's default for
/// `RUNNER_AFTER_SCRIPT_TIMEOUT`.
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Scripts and file variables hold secrets. On a shared host only the agent's
/// user may read them.
const SECRET_FILE_MODE_SHARED: u32 = 0o600;
/// In a disposable container the job may run as any user the image chooses,
/// which must still be able to read its own script.
const SECRET_FILE_MODE_DISPOSABLE: u32 = 0o644;

/// A shell variable name the script may use as a scratch status holder; no
/// GitLab variable starts with it.
const STATUS_VAR: &str = "__servitor_status";

/// Why an attempt's files could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot {what} {path}: {source}; check that the agent's work directory is on a writable disk with free space")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ScriptError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ScriptError {
        let path = path.to_path_buf();
        move |source| ScriptError::Io { what, path, source }
    }
}

/// Whether the job's environment is thrown away afterwards (a container) or
/// shared with later jobs (the host). Sets `CI_DISPOSABLE_ENVIRONMENT` or
/// `CI_SHARED_ENVIRONMENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Environment {
    Disposable,
    Shared,
}

impl Environment {
    fn file_mode(self) -> u32 {
        match self {
            Environment::Disposable => SECRET_FILE_MODE_DISPOSABLE,
            Environment::Shared => SECRET_FILE_MODE_SHARED,
        }
    }
}

/// `CI_JOB_STATUS` as a script sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Running,
    Success,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }
}

/// Where an attempt's files live on the host. The Docker executor mounts
/// `work_dir` at the same path in its containers, so every path here is also
/// valid inside the job.
///
/// ```text
/// <work_dir>/builds/                  CI_BUILDS_DIR
/// <work_dir>/builds/<group>/<project> CI_PROJECT_DIR (or builds/<job id>)
/// <work_dir>/tmp/                     step scripts and file variables
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub work_dir: PathBuf,
    pub builds_dir: PathBuf,
    pub project_dir: PathBuf,
    pub tmp_dir: PathBuf,
}

impl Layout {
    /// The layout for `job` below `work_dir`, which should be absolute.
    pub fn new(work_dir: &Path, job: &JobPayload) -> Self {
        let builds_dir = work_dir.join("builds");
        Self {
            project_dir: builds_dir.join(project_subdir(job)),
            builds_dir,
            tmp_dir: work_dir.join("tmp"),
            work_dir: work_dir.to_path_buf(),
        }
    }

    /// Creates the work directory, makes it absolute and lays out the rest
    /// below it. The project directory itself is left to the sources stage.
    ///
    /// # Errors
    /// Fails when a directory cannot be created.
    pub async fn create(work_dir: &Path, job: &JobPayload) -> Result<Self, ScriptError> {
        tokio::fs::create_dir_all(work_dir)
            .await
            .map_err(ScriptError::io("create work directory", work_dir))?;
        let work_dir = tokio::fs::canonicalize(work_dir)
            .await
            .map_err(ScriptError::io("resolve work directory", work_dir))?;
        let layout = Self::new(&work_dir, job);
        for dir in [&layout.builds_dir, &layout.tmp_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(ScriptError::io("create directory", dir))?;
        }
        Ok(layout)
    }
}

/// The project's path below the builds directory: its full path on GitLab
/// when that is a plain relative path, else the job id.
fn project_subdir(job: &JobPayload) -> PathBuf {
    let path = Path::new(&job.job_info.project_full_path);
    let plain = !job.job_info.project_full_path.is_empty()
        && path.components().all(|c| match c {
            Component::Normal(part) => part.to_str().is_some_and(|s| {
                s.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            }),
            _ => false,
        });
    if plain {
        path.to_path_buf()
    } else {
        PathBuf::from(job.id.to_string())
    }
}

/// The variables every step of an attempt exports, in order (a later
/// definition wins).
#[derive(Clone, Debug, Default)]
pub struct ScriptEnv {
    vars: Vec<(String, String)>,
    /// Job variables whose names the shell cannot export.
    pub skipped: Vec<String>,
}

impl ScriptEnv {
    /// Builds the environment of `ctx`'s job: its variables (file variables
    /// written below `layout.tmp_dir`, the variable set to the file's path),
    /// then the runner's predefined variables, which describe this layout and
    /// so win over a job variable of the same name.
    ///
    /// # Errors
    /// Fails when a file variable cannot be written.
    pub async fn prepare(
        ctx: &JobContext,
        layout: &Layout,
        environment: Environment,
    ) -> Result<Self, ScriptError> {
        let mut env = ScriptEnv::default();
        for var in &ctx.job.variables {
            if !is_shell_name(&var.key) {
                env.skipped.push(var.key.clone());
                continue;
            }
            if var.file {
                let path = layout.tmp_dir.join(&var.key);
                write_private(&path, var.value.as_bytes(), environment.file_mode()).await?;
                env.push(&var.key, &path.to_string_lossy());
            } else {
                env.push(&var.key, &var.value);
            }
        }
        let timeout = ctx.job.runner_info.timeout().as_secs().to_string();
        let concurrent = ctx.concurrent_id.to_string();
        env.push("CI_SERVER", "yes");
        env.push("CI_BUILDS_DIR", &layout.builds_dir.to_string_lossy());
        env.push("CI_PROJECT_DIR", &layout.project_dir.to_string_lossy());
        env.push("CI_CONCURRENT_ID", &concurrent);
        env.push("CI_CONCURRENT_PROJECT_ID", &concurrent);
        env.push("CI_JOB_TIMEOUT", &timeout);
        match environment {
            Environment::Disposable => env.push("CI_DISPOSABLE_ENVIRONMENT", "true"),
            Environment::Shared => env.push("CI_SHARED_ENVIRONMENT", "true"),
        }
        Ok(env)
    }

    fn push(&mut self, key: &str, value: &str) {
        self.vars.push((key.to_owned(), value.to_owned()));
    }

    /// The value a script sees for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether `name` can be exported by a POSIX shell.
fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Quotes `value` for `sh`: single quotes keep everything literal, and a
/// single quote is closed, escaped and reopened.
pub fn shell_quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for ch in value.chars() {
        match ch {
            '\'' => quoted.push_str(r"'\''"),
            // A NUL cannot be passed to a shell; dropping it beats failing.
            '\0' => {}
            _ => quoted.push(ch),
        }
    }
    quoted.push('\'');
    quoted
}

/// Renders one step's script: exports, a `cd` into the project, then each
/// command echoed in gitlab-runner's bold green `$ command` and run.
///
/// Fail-fast in any POSIX `sh`: `set -e` ends the script at a failing simple
/// command; `pipefail` is turned on where the shell has it (busybox, bash);
/// and a check after every command also catches failures `set -e` lets
/// through, such as `false && true`. A job that says `set +e` opts out, as it
/// would with gitlab-runner.
pub fn render(
    commands: &[String],
    env: &ScriptEnv,
    status: JobStatus,
    project_dir: &Path,
) -> String {
    let mut script = String::new();
    script.push_str("# Written by the Servitor agent for one job step.\n");
    // One stream keeps stderr in order with stdout in the job log.
    script.push_str("exec 2>&1\n");
    script.push_str("set -e\n");
    script.push_str("if (set -o pipefail) 2>/dev/null; then set -o pipefail; fi\n");
    for (key, value) in &env.vars {
        let _ = writeln!(script, "export {key}={}", shell_quote(value));
    }
    let _ = writeln!(script, "export CI_JOB_STATUS={}", status.as_str());
    let _ = writeln!(script, "cd {}", shell_quote(&project_dir.to_string_lossy()));
    for command in commands {
        if command.trim().is_empty() {
            continue;
        }
        let _ = writeln!(
            script,
            r"printf '\033[32;1m$ %s\033[0;m\n' {}",
            shell_quote(&echo_text(command))
        );
        script.push_str(command);
        script.push('\n');
        let _ = writeln!(
            script,
            r#"{STATUS_VAR}=$?; if [ "${STATUS_VAR}" -ne 0 ]; then case $- in *e*) exit "${STATUS_VAR}";; esac; fi"#
        );
    }
    script
}

/// What is echoed for a command: its first line, marked as collapsed when it
/// has more, as gitlab-runner does.
fn echo_text(command: &str) -> String {
    let command = command.trim_end_matches('\n');
    match command.split_once('\n') {
        Some((first, _)) => format!("{first} # collapsed multi-line command"),
        None => command.to_owned(),
    }
}

/// Writes a step's script below `layout.tmp_dir` and returns its path.
///
/// # Errors
/// Fails when the file cannot be written.
pub async fn write_script(
    layout: &Layout,
    step: &str,
    text: &str,
    environment: Environment,
) -> Result<PathBuf, ScriptError> {
    let path = layout.tmp_dir.join(format!("{step}.sh"));
    write_private(&path, text.as_bytes(), environment.file_mode()).await?;
    Ok(path)
}

/// Writes `bytes` to `path` with `mode`, replacing an earlier file, whose
/// mode `write` would keep.
async fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ScriptError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ScriptError::io("replace", path)(e)),
    }
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(mode);
    let mut file = options
        .open(path)
        .await
        .map_err(ScriptError::io("create", path))?;
    tokio::io::AsyncWriteExt::write_all(&mut file, bytes)
        .await
        .map_err(ScriptError::io("write", path))?;
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(ScriptError::io("write", path))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use servitor_proto::job::{JobInfo, JobVariable};
    use std::os::unix::fs::PermissionsExt;

    fn var(key: &str, value: &str) -> JobVariable {
        JobVariable {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }
    }

    fn context(work_dir: &Path, variables: Vec<JobVariable>) -> JobContext {
        JobContext {
            job: JobPayload {
                id: 42,
                token: "t".into(),
                variables,
                ..Default::default()
            },
            gitlab_url: String::new(),
            caches: Vec::new(),
            attempt: 1,
            work_dir: work_dir.to_path_buf(),
            concurrent_id: 3,
            agent_name: "agent-1".into(),
            owner: "test-owner".into(),
        }
    }

    /// Runs `script` with `shell` and returns (exit code, output).
    fn run_with(shell: &str, script: &str) -> (i32, String) {
        let out = std::process::Command::new(shell)
            .args(["-c", script])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The shells scripts must work in: the host's `sh` and, when installed,
    /// busybox's.
    fn shells() -> Vec<&'static str> {
        let mut shells = vec!["/bin/sh"];
        if Path::new("/bin/busybox").exists() {
            shells.push("/bin/busybox sh");
        }
        shells
    }

    fn run_in(shell: &str, script: &str) -> (i32, String) {
        match shell.split_once(' ') {
            Some((bin, applet)) => {
                let out = std::process::Command::new(bin)
                    .args([applet, "-c", script])
                    .output()
                    .unwrap();
                (
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            }
            None => run_with(shell, script),
        }
    }

    #[test]
    fn quoting_keeps_values_literal() {
        for value in ["plain", "it's", "$HOME `id` \\n \"x\"", "two\nlines", ""] {
            let (code, out) = run_with("/bin/sh", &format!("printf %s {}", shell_quote(value)));
            assert_eq!(code, 0);
            assert_eq!(out, value);
        }
    }

    #[test]
    fn commands_are_echoed_and_the_first_failure_stops_the_script() {
        let env = ScriptEnv::default();
        let commands = vec![
            "echo one".to_owned(),
            "false && true".to_owned(),
            "echo never".to_owned(),
        ];
        for shell in shells() {
            let script = render(&commands, &env, JobStatus::Running, Path::new("/"));
            let (code, out) = run_in(shell, &script);
            assert_eq!(code, 1, "{shell}: {out}");
            assert!(
                out.contains("\x1b[32;1m$ echo one\x1b[0;m\none\n"),
                "{shell}: {out:?}"
            );
            assert!(out.contains("$ false && true"), "{shell}: {out:?}");
            assert!(!out.contains("never"), "{shell}: {out:?}");

            let script = render(
                &["echo a; exit 7".to_owned(), "echo b".to_owned()],
                &env,
                JobStatus::Running,
                Path::new("/"),
            );
            let (code, out) = run_in(shell, &script);
            assert_eq!(code, 7, "{shell}: {out}");
            assert!(!out.contains("\nb\n"), "{shell}: {out:?}");
        }
    }

    #[test]
    fn pipelines_fail_where_the_shell_has_pipefail_and_set_plus_e_opts_out() {
        let env = ScriptEnv::default();
        if Path::new("/bin/busybox").exists() {
            let script = render(
                &["false | cat".to_owned(), "echo after".to_owned()],
                &env,
                JobStatus::Running,
                Path::new("/"),
            );
            let (code, out) = run_in("/bin/busybox sh", &script);
            assert_eq!(code, 1, "{out}");
            assert!(!out.contains("after\n"), "{out:?}");
        }
        for shell in shells() {
            let script = render(
                &[
                    "set +e".to_owned(),
                    "false".to_owned(),
                    "echo after".to_owned(),
                ],
                &env,
                JobStatus::Running,
                Path::new("/"),
            );
            let (code, out) = run_in(shell, &script);
            assert_eq!(code, 0, "{shell}: {out}");
            assert!(out.contains("after\n"), "{shell}: {out:?}");
        }
    }

    #[test]
    fn multi_line_commands_echo_their_first_line() {
        let script = render(
            &["echo one\necho two\n".to_owned()],
            &ScriptEnv::default(),
            JobStatus::Running,
            Path::new("/"),
        );
        let (code, out) = run_with("/bin/sh", &script);
        assert_eq!(code, 0);
        assert!(
            out.contains("$ echo one # collapsed multi-line command"),
            "{out:?}"
        );
        assert!(out.contains("one\ntwo\n"), "{out:?}");
    }

    #[test]
    fn project_directory_follows_the_project_path_or_the_job_id() {
        let mut job = JobPayload {
            id: 7,
            ..Default::default()
        };
        let cases = [
            ("group/sub/project", "/w/builds/group/sub/project"),
            ("", "/w/builds/7"),
            ("../escape", "/w/builds/7"),
            ("/abs", "/w/builds/7"),
            ("we ird", "/w/builds/7"),
        ];
        for (path, want) in cases {
            job.job_info = JobInfo {
                project_full_path: path.into(),
                ..Default::default()
            };
            let layout = Layout::new(Path::new("/w"), &job);
            assert_eq!(layout.project_dir, Path::new(want), "{path:?}");
            assert_eq!(layout.builds_dir, Path::new("/w/builds"));
        }
    }

    #[tokio::test]
    async fn environment_holds_job_file_and_predefined_variables() {
        let dir = tempfile::tempdir().unwrap();
        let mut file_var = var("CONFIG_FILE", "secret: yes\n");
        file_var.file = true;
        let ctx = context(
            dir.path(),
            vec![
                var("PLAIN", "it's plain"),
                var("bad-name", "x"),
                file_var,
                var("CI_PROJECT_DIR", "/elsewhere"),
            ],
        );
        let layout = Layout::create(dir.path(), &ctx.job).await.unwrap();
        let env = ScriptEnv::prepare(&ctx, &layout, Environment::Shared)
            .await
            .unwrap();
        assert_eq!(env.skipped, vec!["bad-name"]);
        assert_eq!(env.get("PLAIN"), Some("it's plain"));
        assert_eq!(env.get("CI_SERVER"), Some("yes"));
        assert_eq!(env.get("CI_CONCURRENT_ID"), Some("3"));
        assert_eq!(env.get("CI_SHARED_ENVIRONMENT"), Some("true"));
        assert_eq!(env.get("CI_DISPOSABLE_ENVIRONMENT"), None);
        assert_eq!(env.get("CI_JOB_TIMEOUT"), Some("7200"));
        assert_eq!(
            env.get("CI_PROJECT_DIR").map(PathBuf::from),
            Some(layout.project_dir.clone())
        );
        let file = PathBuf::from(env.get("CONFIG_FILE").unwrap());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "secret: yes\n");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        std::fs::create_dir_all(&layout.project_dir).unwrap();
        let script = render(
            &[r#"echo "$PLAIN|$CI_JOB_STATUS|$(pwd)"; cat "$CONFIG_FILE""#.to_owned()],
            &env,
            JobStatus::Failed,
            &layout.project_dir,
        );
        let path = write_script(&layout, "after_script", &script, Environment::Shared)
            .await
            .unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!(
                "it's plain|failed|{}\n",
                layout.project_dir.display()
            )),
            "{text:?}"
        );
        assert!(text.contains("secret: yes\n"), "{text:?}");
    }
}
