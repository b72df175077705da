//! The lease book on disk: every held job survives a coordinator crash.
//!
//! One directory per job under `<state_dir>/jobs/<id>/`, private to the
//! service user:
//! - `job.json`: the payload exactly as GitLab sent it (it holds the job
//!   token, hence mode 0600);
//! - `lease.json`: attempt and agent, replaced atomically (write, sync,
//!   rename) on every change;
//! - `result.pb`: the current attempt's result, once it arrived, so a
//!   restart reports it instead of running the job again;
//! - `trace.journal`: the masked log as sent to GitLab, as records of
//!   `[len u32][attempt u32][output offset u64][bytes]`, each appended with
//!   one write. The offset says how much of that attempt's output the log
//!   holds, so after a restart the agent's resent output is taken from
//!   exactly there. A torn last record (a crash mid-write) is dropped.
//!
//! Plain files with atomic renames are crash-safe for what this needs (one
//! writer, small records) and need no database engine. Not responsible for
//! deciding anything about leases (`lease`, `core`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use servitor_proto::agent::Finished;

/// Bytes of a journal record header: length, attempt, output offset.
const RECORD_HEADER: usize = 4 + 4 + 8;
/// File mode of everything in the store: it holds job tokens.
const PRIVATE_FILE: u32 = 0o600;
const PRIVATE_DIR: u32 = 0o700;

/// A store failure, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct StoreError {
    action: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Where a job's current attempt is, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub attempt: u32,
    /// The agent holding the attempt, if it was assigned.
    pub agent: Option<String>,
}

/// A job found in the store at start-up.
#[derive(Debug)]
pub struct StoredJob {
    pub job_id: i64,
    pub raw: Vec<u8>,
    pub lease: LeaseRecord,
    /// The masked log written so far.
    pub trace: Vec<u8>,
    /// Attempt and output offset of the last journal record.
    pub output: Option<(u32, u64)>,
    /// The current attempt's result, if it arrived before the crash.
    pub result: Option<Finished>,
}

/// The lease book.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the store below the state directory.
    ///
    /// # Errors
    /// The directory cannot be created or made private.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(PRIVATE_DIR))
            .map_err(io("restrict", &dir))?;
        Ok(Self { dir })
    }

    fn job_dir(&self, job_id: i64) -> PathBuf {
        self.dir.join(job_id.to_string())
    }

    /// Records a newly taken job.
    ///
    /// # Errors
    /// Writing failed.
    pub fn add_job(&self, job_id: i64, raw: &[u8]) -> Result<(), StoreError> {
        let dir = self.job_dir(job_id);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        write_atomically(&dir.join("job.json"), raw)?;
        self.save_lease(
            job_id,
            &LeaseRecord {
                attempt: 1,
                agent: None,
            },
        )
    }

    /// Replaces a job's lease record.
    ///
    /// # Errors
    /// Writing failed.
    pub fn save_lease(&self, job_id: i64, lease: &LeaseRecord) -> Result<(), StoreError> {
        let path = self.job_dir(job_id).join("lease.json");
        let text = serde_json::to_vec(lease).map_err(|e| StoreError {
            action: "encode",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomically(&path, &text)
    }

    /// Records the result of the job's current attempt (before the agent
    /// is told it may forget it).
    ///
    /// # Errors
    /// Writing failed.
    pub fn save_result(&self, job_id: i64, result: &Finished) -> Result<(), StoreError> {
        write_atomically(
            &self.job_dir(job_id).join("result.pb"),
            &result.encode_to_vec(),
        )
    }

    /// Opens the job's trace journal for appending.
    ///
    /// # Errors
    /// Opening failed.
    pub fn journal(&self, job_id: i64) -> Result<Journal, StoreError> {
        let path = self.job_dir(job_id).join("trace.journal");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(PRIVATE_FILE)
            .open(&path)
            .map_err(io("open", &path))?;
        Ok(Journal { file, path })
    }

    /// Forgets a job (reported, or taken away by GitLab).
    ///
    /// # Errors
    /// Removing failed.
    pub fn remove_job(&self, job_id: i64) -> Result<(), StoreError> {
        let dir = self.job_dir(job_id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// Every job in the store. A job directory without a readable payload is
    /// skipped with a warning (it was being created when the process died:
    /// GitLab will time that job out).
    ///
    /// # Errors
    /// The store directory cannot be read.
    pub fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        let mut jobs = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))?;
        for entry in entries.flatten() {
            let Some(job_id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
            else {
                continue;
            };
            let dir = entry.path();
            let raw = match std::fs::read(dir.join("job.json")) {
                Ok(raw) => raw,
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "stored job has no payload; skipping it");
                    continue;
                }
            };
            let lease = std::fs::read(dir.join("lease.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(LeaseRecord {
                    attempt: 1,
                    agent: None,
                });
            let result = std::fs::read(dir.join("result.pb"))
                .ok()
                .and_then(|b| Finished::decode(b.as_slice()).ok());
            let journal = std::fs::read(dir.join("trace.journal")).unwrap_or_default();
            let (trace, output) = replay_journal(&journal);
            jobs.push(StoredJob {
                job_id,
                raw,
                lease,
                trace,
                output,
                result,
            });
        }
        jobs.sort_by_key(|j| j.job_id);
        Ok(jobs)
    }
}

/// Appends to one job's trace journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Appends masked log bytes, with the attempt and how much of its
    /// output the log now holds, in one write.
    ///
    /// # Errors
    /// Writing failed.
    pub fn append(
        &mut self,
        attempt: u32,
        output_offset: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let len = u32::try_from(bytes.len()).map_err(|_| StoreError {
            action: "append to",
            path: self.path.clone(),
            source: std::io::Error::other("record over 4 GiB"),
        })?;
        let mut record = Vec::with_capacity(RECORD_HEADER + bytes.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&attempt.to_le_bytes());
        record.extend_from_slice(&output_offset.to_le_bytes());
        record.extend_from_slice(bytes);
        self.file
            .write_all(&record)
            .map_err(io("append to", &self.path))
    }
}

/// Reads journal records back: the log bytes and the last (attempt, output
/// offset). Stops at a torn record.
fn replay_journal(journal: &[u8]) -> (Vec<u8>, Option<(u32, u64)>) {
    let mut trace = Vec::new();
    let mut last = None;
    let mut rest = journal;
    while rest.len() >= RECORD_HEADER {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let attempt = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&rest[8..16]);
        let Some(body) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            break;
        };
        trace.extend_from_slice(body);
        last = Some((attempt, u64::from_le_bytes(offset)));
        rest = &rest[RECORD_HEADER + len..];
    }
    (trace, last)
}

/// Replaces a file so that a crash leaves the old or the new content, never
/// a mix; private to the service user.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .open(&tmp)
        .map_err(io("write", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    file.sync_data().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_leases_and_journals_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_job(7, br#"{"id":7,"token":"t"}"#).unwrap();
        store
            .save_lease(
                7,
                &LeaseRecord {
                    attempt: 2,
                    agent: Some("a-1".into()),
                },
            )
            .unwrap();
        let mut journal = store.journal(7).unwrap();
        journal.append(1, 0, b"header\n").unwrap();
        journal.append(2, 5, b"hello").unwrap();
        let result = Finished {
            attempt: Some(servitor_proto::agent::AttemptRef::new(7, 2)),
            exit_code: Some(3),
            ..Finished::default()
        };
        store.save_result(7, &result).unwrap();
        store.add_job(8, b"{}").unwrap();
        store.remove_job(8).unwrap();

        let jobs = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(jobs.len(), 1);
        let job = &jobs[0];
        assert_eq!(job.job_id, 7);
        assert_eq!(
            job.lease,
            LeaseRecord {
                attempt: 2,
                agent: Some("a-1".into())
            }
        );
        assert_eq!(job.trace, b"header\nhello");
        assert_eq!(job.output, Some((2, 5)));
        assert_eq!(job.result, Some(result));
        let mode = std::fs::metadata(dir.path().join("jobs/7/job.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the payload holds the job token");
    }

    #[test]
    fn a_torn_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_job(1, b"{}").unwrap();
        let mut journal = store.journal(1).unwrap();
        journal.append(1, 3, b"abc").unwrap();
        journal.append(1, 6, b"def").unwrap();
        let path = dir.path().join("jobs/1/trace.journal");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let jobs = store.load().unwrap();
        assert_eq!(jobs[0].trace, b"abc");
        assert_eq!(jobs[0].output, Some((1, 3)));
    }
}
