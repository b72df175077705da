//! Credentials the coordinator mints for the Fargate tasks it starts: each
//! lets the agent of one task enroll once, within a short life, and only
//! from the task it was minted for (the ARN the agent reads from the task
//! metadata endpoint must be the one RunTask returned). The job in the task
//! can read the credential, but only once the agent has spent it.
//!
//! Kept in memory: a task that has not enrolled when the coordinator
//! restarts cannot enroll afterwards, is stopped as one that never
//! enrolled, and its job runs on a new task.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use servitor_runtime::secret::Secret;
use sha2::{Digest, Sha256};

/// Prefix of a task credential, so one is recognized in a log or a leak.
const PREFIX: &str = "svtc-";
/// Random bytes in a credential.
const RANDOM_BYTES: usize = 32;

/// What a task was started for: the agent that enrolls with its
/// credential takes this job's attempt and no other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskBinding {
    pub runner: String,
    pub job_id: i64,
    pub attempt: u32,
}

impl TaskBinding {
    /// The id of the agent of the task `task_id` started for this binding.
    /// It carries the binding, so the certificate alone tells the
    /// coordinator which job the agent may take, also after a restart; no
    /// other agent id has a dot.
    pub fn agent_id(&self, task_id: &str) -> String {
        let task: String = task_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(32)
            .collect();
        format!(
            "task.j{}.a{}.{task}.{}",
            self.job_id, self.attempt, self.runner
        )
    }

    /// The binding an agent id made by [`TaskBinding::agent_id`] carries.
    pub fn from_agent_id(agent_id: &str) -> Option<Self> {
        let mut parts = agent_id.splitn(5, '.');
        if parts.next()? != "task" {
            return None;
        }
        let job_id = parts.next()?.strip_prefix('j')?.parse().ok()?;
        let attempt = parts.next()?.strip_prefix('a')?.parse().ok()?;
        let _task = parts.next()?;
        let runner = parts.next()?.to_owned();
        Some(Self {
            runner,
            job_id,
            attempt,
        })
    }
}

/// The task id at the end of a task ARN
/// (`arn:aws:ecs:<region>:<account>:task/<cluster>/<id>`).
pub fn task_id(task_arn: &str) -> &str {
    task_arn.rsplit('/').next().unwrap_or(task_arn)
}

#[derive(Debug)]
struct Minted {
    binding: TaskBinding,
    task_arn: Option<String>,
    minted_at: Instant,
    life: Duration,
}

/// Credentials minted and not yet spent, by the SHA-256 of the credential.
#[derive(Debug, Default)]
pub struct TaskCredentials {
    minted: Mutex<HashMap<[u8; 32], Minted>>,
}

fn digest(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

impl TaskCredentials {
    fn minted(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Minted>> {
        self.minted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new credential for the task about to start for `binding`, valid
    /// for `life` from now.
    pub fn mint(&self, binding: TaskBinding, life: Duration) -> Secret {
        let random: [u8; RANDOM_BYTES] = rand::random();
        let credential: String = std::iter::once(PREFIX.to_owned())
            .chain(random.iter().map(|b| format!("{b:02x}")))
            .collect();
        let now = Instant::now();
        let mut minted = self.minted();
        minted.retain(|_, m| now.saturating_duration_since(m.minted_at) < m.life);
        minted.insert(
            digest(&credential),
            Minted {
                binding,
                task_arn: None,
                minted_at: now,
                life,
            },
        );
        Secret::new(credential)
    }

    /// Binds a credential to the task RunTask started with it.
    pub fn bind(&self, credential: &Secret, task_arn: &str) {
        if let Some(m) = self.minted().get_mut(&digest(credential.expose())) {
            m.task_arn = Some(task_arn.to_owned());
        }
    }

    /// Forgets a credential whose task did not start.
    pub fn forget(&self, credential: &Secret) {
        self.minted().remove(&digest(credential.expose()));
    }

    /// Spends a credential presented by the agent of `task_arn`.
    ///
    /// # Errors
    /// Why it is refused, for the agent and the log: unknown or spent,
    /// expired, not yet bound to a task, or minted for another task.
    pub fn claim(&self, credential: &str, task_arn: &str) -> Result<TaskBinding, String> {
        let key = digest(credential);
        let mut minted = self.minted();
        let Some(m) = minted.get(&key) else {
            return Err(
                "the task credential is unknown or already used; a task enrolls once, with the credential minted for it"
                    .to_owned(),
            );
        };
        if m.minted_at.elapsed() >= m.life {
            let life = m.life;
            minted.remove(&key);
            return Err(format!(
                "the task credential expired: tasks must enroll within {} of being started",
                humantime::format_duration(life)
            ));
        }
        match &m.task_arn {
            None => Err(
                "the task credential is not bound to a task yet (RunTask has not answered); the agent tries again"
                    .to_owned(),
            ),
            Some(arn) if arn != task_arn => Err(format!(
                "the task credential was minted for task {arn}, not {task_arn}"
            )),
            Some(_) => {
                let binding = m.binding.clone();
                minted.remove(&key);
                Ok(binding)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:ecs:us-east-1:123456789012:task/ci/0123456789abcdef";

    fn binding() -> TaskBinding {
        TaskBinding {
            runner: "light".into(),
            job_id: 42,
            attempt: 1,
        }
    }

    #[test]
    fn a_credential_enrolls_its_own_task_once() {
        let tasks = TaskCredentials::default();
        let credential = tasks.mint(binding(), Duration::from_secs(300));
        assert!(credential.expose().starts_with(PREFIX));
        let e = tasks.claim(credential.expose(), ARN).unwrap_err();
        assert!(e.contains("not bound to a task yet"), "{e}");
        tasks.bind(&credential, ARN);
        let e = tasks
            .claim(
                credential.expose(),
                "arn:aws:ecs:us-east-1:123456789012:task/ci/other",
            )
            .unwrap_err();
        assert!(e.contains(&format!("minted for task {ARN}")), "{e}");
        assert_eq!(tasks.claim(credential.expose(), ARN).unwrap(), binding());
        // Spent: the job in the task, which can read it, cannot use it.
        let e = tasks.claim(credential.expose(), ARN).unwrap_err();
        assert!(e.contains("unknown or already used"), "{e}");
        let e = tasks.claim("svtc-made-up", ARN).unwrap_err();
        assert!(e.contains("unknown or already used"), "{e}");
    }

    #[test]
    fn the_agent_id_carries_the_binding() {
        let id = binding().agent_id(task_id(ARN));
        assert_eq!(id, "task.j42.a1.0123456789abcdef.light");
        assert_eq!(TaskBinding::from_agent_id(&id), Some(binding()));
        let dotted = TaskBinding {
            runner: "fargate.small".into(),
            ..binding()
        };
        assert_eq!(
            TaskBinding::from_agent_id(&dotted.agent_id("abc")),
            Some(dotted)
        );
        for other in [
            "local-1-ab12",
            "task-j1-a1-x-y",
            "task.jx.a1.t.r",
            "task.j1.a1.t",
        ] {
            assert_eq!(TaskBinding::from_agent_id(other), None, "{other}");
        }
    }

    #[test]
    fn an_expired_or_forgotten_credential_is_refused() {
        let tasks = TaskCredentials::default();
        let credential = tasks.mint(binding(), Duration::ZERO);
        tasks.bind(&credential, ARN);
        let e = tasks.claim(credential.expose(), ARN).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let credential = tasks.mint(binding(), Duration::from_secs(300));
        tasks.forget(&credential);
        assert!(tasks.claim(credential.expose(), ARN).is_err());
    }
}
