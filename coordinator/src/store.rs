//! The lease book on disk, and the one thread that writes it: every held job
//! survives a coordinator crash and a power loss.
//!
//! Everything lives in one transactional file, `state_dir/lease-book.redb`
//! (mode 0600: it holds job tokens), in four tables keyed by job id: the
//! payload exactly as GitLab sent it, the lease (attempt and agent, the same
//! JSON `lease.json` held), the current attempt's result once it arrived (so
//! a restart reports it instead of running the job again), and the trace
//! journal: the masked log as sent to GitLab, one record per append of
//! `[attempt u32][output offset u64][bytes]`, keyed by job and where the
//! record's bytes start in the log, so an append needs no lookup and any
//! part of the log is found without reading what comes before it (a journal
//! an earlier version keyed 0, 1, 2… is re-keyed on open). The output offset
//! says how much of that attempt's output the log holds, so after a restart
//! the agent's resent output is taken from exactly there.
//!
//! One writer: [`Store::submit`] hands changes to a dedicated thread and never
//! blocks. The thread takes every request waiting, applies them all in one
//! transaction and commits it with one sync (redb's checksummed single-sync
//! commit: a power loss leaves the last commit or the one before, never a
//! mix), then completes every request of the batch. Callers that must not act
//! before a change is durable await its [`Commit`]; the rest (log journal
//! appends) just submit. Requests are applied in the order submitted, and
//! [`Store::durable_through`] says how far they are on disk.
//!
//! Measured against per-change fsync of per-job files and against group
//! commit of per-job files with directory syncs (`servitor-store-bench`),
//! one transactional file wins by an order of magnitude as soon as more than
//! one change is waiting, and it makes a power loss leave nothing half
//! written. A lease book in the earlier layout (`state_dir/jobs/<id>/`, one
//! directory of files per job) is imported on first open and then removed.
//!
//! The spend ledger (`state_dir/spend.json`) stays a small file operators can
//! read; the same thread replaces it (write, sync, rename, sync directory).
//!
//! Not responsible for deciding anything about leases (`lease`, `core`).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use prost::Message;
use redb::{ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use servitor_proto::agent::Finished;
use tokio::sync::oneshot;

/// File name of the lease book in the state directory.
pub const BOOK_FILE: &str = "lease-book.redb";
/// The directory of the earlier per-job-files layout, imported once.
const LEGACY_DIR: &str = "jobs";
/// File name of the spend ledger in the state directory.
pub const SPEND_FILE: &str = "spend.json";
/// Bytes of a journal record header: attempt, output offset.
const RECORD_HEADER: usize = 4 + 8;
/// Bytes of a legacy journal record header: length, attempt, output offset.
const LEGACY_RECORD_HEADER: usize = 4 + RECORD_HEADER;
/// Memory the lease book may use to cache its pages. redb's default (1 GiB)
/// would fill with journaled logs that are written once and rarely read; the
/// book's hot part (payloads, leases, the journal's last pages) is far
/// smaller.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// File mode of everything in the store: it holds job tokens.
const PRIVATE_FILE: u32 = 0o600;

const JOBS: TableDefinition<'_, i64, &[u8]> = TableDefinition::new("jobs");
const LEASES: TableDefinition<'_, i64, &[u8]> = TableDefinition::new("leases");
const RESULTS: TableDefinition<'_, i64, &[u8]> = TableDefinition::new("results");
/// The runner (`[[runners]]` name) that took each job; books written before
/// runners had names have no entry, and their jobs go to the first runner.
const RUNNERS: TableDefinition<'_, i64, &str> = TableDefinition::new("runners");
const JOURNAL: TableDefinition<'_, (i64, u64), &[u8]> = TableDefinition::new("trace");
/// The journal as earlier versions wrote it: records keyed 0, 1, 2… per job.
/// Re-keyed by log offset into [`JOURNAL`] on open.
const SEQ_JOURNAL: TableDefinition<'_, (i64, u64), &[u8]> = TableDefinition::new("journal");

/// A store failure, naming the file and, where there is one, the fix.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("lease book {path}: {detail}")]
    Book { path: PathBuf, detail: String },
    #[error("lease book {path} is open in another coordinator process; stop that one first, or give this one a state_dir of its own")]
    InUse { path: PathBuf },
    #[error("the lease book writer has stopped; the change was not saved")]
    WriterStopped,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source: Arc::new(source),
    }
}

fn book<'a, E: Into<redb::Error>>(path: &'a Path) -> impl FnOnce(E) -> StoreError + 'a {
    move |e| match e.into() {
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_owned(),
        },
        e => StoreError::Book {
            path: path.to_owned(),
            detail: e.to_string(),
        },
    }
}

/// Where a job's current attempt is, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub attempt: u32,
    /// The agent holding the attempt, if it was assigned.
    pub agent: Option<String>,
}

impl LeaseRecord {
    /// The record of a job nobody has run yet.
    fn first() -> Self {
        Self {
            attempt: 1,
            agent: None,
        }
    }
}

/// A job found in the store at start-up.
#[derive(Debug)]
pub struct StoredJob {
    pub job_id: i64,
    pub raw: Vec<u8>,
    /// The runner that took it; `None` in books written before runners
    /// had names.
    pub runner: Option<String>,
    pub lease: LeaseRecord,
    /// The masked log written so far.
    pub trace: Vec<u8>,
    /// Attempt and output offset of the last journal record.
    pub output: Option<(u32, u64)>,
    /// The current attempt's result, if it arrived before the crash.
    pub result: Option<Finished>,
}

/// One change to the lease book.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A newly taken job: its payload and the runner that took it, on its
    /// first attempt, unassigned.
    Hold {
        job_id: i64,
        raw: Bytes,
        runner: String,
    },
    /// A job's lease moved. Dropped if the job is no longer held.
    Lease { job_id: i64, lease: LeaseRecord },
    /// The result of a job's current attempt. Dropped if the job is no
    /// longer held.
    Result { job_id: i64, result: Finished },
    /// The job is forgotten (reported, or taken away by GitLab).
    Remove { job_id: i64 },
    /// A trace journal record (see [`Journal`]), keyed by where its bytes
    /// start in the log. Dropped if the job is not held.
    Append { job_id: i64, at: u64, record: Bytes },
    /// The spend ledger's new content.
    Spend { record: Bytes },
}

impl Change {
    fn touches_book(&self) -> bool {
        !matches!(self, Change::Spend { .. })
    }
}

/// What the writer has done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Requests completed.
    pub requests: u64,
    /// Changes applied.
    pub changes: u64,
    /// Batches taken off the queue (each completes all its requests at once).
    pub batches: u64,
    /// Syncs to disk: one per lease book commit, plus the file and
    /// directory syncs of a spend ledger write.
    pub syncs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    changes: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
}

struct Request {
    seq: u64,
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The receiving end of a submitted request.
#[derive(Debug)]
#[must_use = "a commit does nothing unless awaited; drop it to not wait"]
pub struct Commit {
    seq: u64,
    done: oneshot::Receiver<Result<(), StoreError>>,
}

impl Commit {
    /// Position of the request in the writer's order.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits until the changes are on disk.
    ///
    /// # Errors
    /// The commit failed (the disk said no), or the writer stopped.
    pub async fn durable(self) -> Result<(), StoreError> {
        self.done.await.unwrap_or(Err(StoreError::WriterStopped))
    }

    /// [`Self::durable`] for a thread outside the async runtime.
    ///
    /// # Errors
    /// As [`Self::durable`].
    pub fn wait(self) -> Result<(), StoreError> {
        self.done
            .blocking_recv()
            .unwrap_or(Err(StoreError::WriterStopped))
    }
}

#[derive(Debug)]
struct Queue {
    next_seq: u64,
    /// `None` once the last handle is dropped: the writer then drains the
    /// queue and stops.
    tx: Option<mpsc::Sender<Request>>,
}

/// What the writer and the handles both see.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// Every request up to this sequence number is completed.
    durable: AtomicU64,
    counters: Counters,
}

/// What only the handles hold; the last one to go stops the writer.
#[derive(Debug)]
struct Handle {
    /// Submission takes a sequence number and enqueues under one lock, so
    /// sequence order is queue order.
    queue: Mutex<Queue>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    db: Arc<redb::Database>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Close the queue, then wait for the writer to finish what is in
        // it, so the file is closed (and can be opened again) when the
        // last handle is gone.
        self.queue
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The lease book: a handle on the writer thread. Cheap to clone; the
/// writer stops once every handle is gone and the queue is empty.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Handle>,
}

impl Store {
    /// Opens (creating) the lease book in the state directory, imports a
    /// lease book in the earlier per-job-files layout if one is there, and
    /// starts the writer thread.
    ///
    /// # Errors
    /// The file cannot be created or opened (another coordinator holds it,
    /// or it is damaged), or the earlier layout cannot be imported.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let (mut handle, writer) = Self::open_parts(state_dir)?;
        let path = handle.shared.path.clone();
        handle.thread = Some(
            std::thread::Builder::new()
                .name("lease-book".into())
                .spawn(move || writer.run())
                .map_err(io("start the writer of", &path))?,
        );
        Ok(Self {
            inner: Arc::new(handle),
        })
    }

    /// The store and its writer, not yet running.
    fn open_parts(state_dir: &Path) -> Result<(Handle, Writer), StoreError> {
        let path = state_dir.join(BOOK_FILE);
        // Created private before redb writes anything into it.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(PRIVATE_FILE)
            .open(&path)
            .map_err(io("create", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(PRIVATE_FILE))
            .map_err(io("restrict", &path))?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(book(&path))?;
        {
            // Tables exist from the start so reads never meet a missing one.
            let txn = db.begin_write().map_err(book(&path))?;
            txn.open_table(JOBS).map_err(book(&path))?;
            txn.open_table(LEASES).map_err(book(&path))?;
            txn.open_table(RESULTS).map_err(book(&path))?;
            txn.open_table(RUNNERS).map_err(book(&path))?;
            txn.open_table(JOURNAL).map_err(book(&path))?;
            txn.commit().map_err(book(&path))?;
        }
        rekey_journal(&db, &path)?;
        import_legacy(&db, &path, state_dir)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            path,
            durable: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            rx,
            spend_path: state_dir.join(SPEND_FILE),
            state_dir: state_dir.to_owned(),
        };
        let handle = Handle {
            queue: Mutex::new(Queue {
                next_seq: 1,
                tx: Some(tx),
            }),
            shared,
            thread: None,
            db,
        };
        Ok((handle, writer))
    }

    /// Hands changes to the writer, to be applied together, after every
    /// change submitted before. Never blocks.
    pub fn submit(&self, changes: Vec<Change>) -> Commit {
        let (done, rx) = oneshot::channel();
        let mut queue = self
            .inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let request = Request { seq, changes, done };
        let refused = match &queue.tx {
            Some(tx) => tx.send(request).err().map(|mpsc::SendError(r)| r),
            None => Some(request),
        };
        if let Some(request) = refused {
            let _ = request.done.send(Err(StoreError::WriterStopped));
        }
        Commit { seq, done: rx }
    }

    /// Every request submitted up to and including this sequence number has
    /// been completed (written, or failed and logged).
    pub fn durable_through(&self) -> u64 {
        self.inner.shared.durable.load(Ordering::Acquire)
    }

    /// Waits until everything submitted so far is on disk.
    ///
    /// # Errors
    /// As [`Commit::durable`].
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.submit(Vec::new()).durable().await
    }

    /// What the writer has done so far.
    pub fn counters(&self) -> StoreCounters {
        let c = &self.inner.shared.counters;
        StoreCounters {
            requests: c.requests.load(Ordering::Relaxed),
            changes: c.changes.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
        }
    }

    /// The job's trace journal, for appending after the `log_len` bytes of
    /// log it holds already (0 for a new job).
    pub fn journal(&self, job_id: i64, log_len: u64) -> Journal {
        Journal {
            store: self.clone(),
            job_id,
            next: log_len,
            last_seq: 0,
        }
    }

    /// Every job in the lease book, in job id order.
    ///
    /// # Errors
    /// The lease book cannot be read.
    pub fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        let path = &self.inner.shared.path;
        let txn = self.inner.db.begin_read().map_err(book(path))?;
        let jobs = txn.open_table(JOBS).map_err(book(path))?;
        let leases = txn.open_table(LEASES).map_err(book(path))?;
        let results = txn.open_table(RESULTS).map_err(book(path))?;
        let runners = txn.open_table(RUNNERS).map_err(book(path))?;
        let journal = txn.open_table(JOURNAL).map_err(book(path))?;
        let mut out = Vec::new();
        for entry in jobs.iter().map_err(book(path))? {
            let (id, raw) = entry.map_err(book(path))?;
            let job_id = id.value();
            let lease = match leases.get(job_id).map_err(book(path))? {
                Some(v) => serde_json::from_slice(v.value()).unwrap_or_else(|e| {
                    tracing::warn!(job_id, error = %e, "stored lease cannot be read; taking the job as never assigned");
                    LeaseRecord::first()
                }),
                None => LeaseRecord::first(),
            };
            let result = results
                .get(job_id)
                .map_err(book(path))?
                .and_then(|v| Finished::decode(v.value()).ok());
            let JournaledLog { trace, output } = read_journal(&journal, job_id, path)?;
            let runner = runners
                .get(job_id)
                .map_err(book(path))?
                .map(|v| v.value().to_owned());
            out.push(StoredJob {
                job_id,
                raw: raw.value().to_vec(),
                runner,
                lease,
                trace,
                output,
                result,
            });
        }
        Ok(out)
    }
}

/// Moves a journal keyed 0, 1, 2… per job (as earlier versions wrote it) to
/// keys that are log offsets, in one transaction.
fn rekey_journal(db: &redb::Database, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(book(path))?;
    let earlier = txn
        .list_tables()
        .map_err(book(path))?
        .any(|table| table.name() == SEQ_JOURNAL.name());
    if !earlier {
        return txn.abort().map_err(book(path));
    }
    {
        let old = txn.open_table(SEQ_JOURNAL).map_err(book(path))?;
        let mut new = txn.open_table(JOURNAL).map_err(book(path))?;
        let mut at = (i64::MIN, 0u64);
        for entry in old.iter().map_err(book(path))? {
            let (key, body) = entry.map_err(book(path))?;
            let (job_id, _) = key.value();
            if at.0 != job_id {
                at = (job_id, 0);
            }
            new.insert(at, body.value()).map_err(book(path))?;
            at.1 += body.value().len().saturating_sub(RECORD_HEADER) as u64;
        }
    }
    txn.delete_table(SEQ_JOURNAL).map_err(book(path))?;
    txn.commit().map_err(book(path))?;
    tracing::info!(path = %path.display(), "re-keyed the trace journal by log offset");
    Ok(())
}

/// One job's journaled log.
struct JournaledLog {
    trace: Vec<u8>,
    /// Attempt and output offset of the last record.
    output: Option<(u32, u64)>,
}

fn read_journal(
    journal: &impl ReadableTable<(i64, u64), &'static [u8]>,
    job_id: i64,
    path: &Path,
) -> Result<JournaledLog, StoreError> {
    let mut trace = Vec::new();
    let mut output = None;
    for record in journal
        .range((job_id, 0)..=(job_id, u64::MAX))
        .map_err(book(path))?
    {
        let (_, body) = record.map_err(book(path))?;
        if let Some((attempt, offset, bytes)) = split_record(body.value()) {
            trace.extend_from_slice(bytes);
            output = Some((attempt, offset));
        }
    }
    Ok(JournaledLog { trace, output })
}

/// Appends to one job's trace journal through the writer.
#[derive(Clone, Debug)]
pub struct Journal {
    store: Store,
    job_id: i64,
    /// Where the next record's bytes start in the log: its key.
    next: u64,
    /// The writer's sequence number of the last record submitted.
    last_seq: u64,
}

impl Journal {
    /// Appends masked log bytes, with the attempt and how much of its
    /// output the log now holds, as one record. It is on disk with the next
    /// commit; nobody waits for it.
    ///
    /// # Errors
    /// The writer has stopped.
    pub fn append(
        &mut self,
        attempt: u32,
        output_offset: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let mut record = Vec::with_capacity(RECORD_HEADER + bytes.len());
        record.extend_from_slice(&attempt.to_le_bytes());
        record.extend_from_slice(&output_offset.to_le_bytes());
        record.extend_from_slice(bytes);
        let commit = self.store.submit(vec![Change::Append {
            job_id: self.job_id,
            at: self.next,
            record: Bytes::from(record),
        }]);
        self.next += bytes.len() as u64;
        self.last_seq = commit.seq;
        // Only a stopped writer answers at once; anything else is pending.
        let mut done = commit.done;
        match done.try_recv() {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Up to `max` bytes of the job's journaled log from `from`, read once
    /// everything appended so far is on disk. Empty if the journal holds no
    /// byte at `from`.
    ///
    /// # Errors
    /// The writer has stopped, or the lease book cannot be read.
    pub async fn read(&self, from: u64, max: usize) -> Result<Bytes, StoreError> {
        if self.store.durable_through() < self.last_seq {
            self.store.flush().await?;
        }
        let store = self.store.clone();
        let job_id = self.job_id;
        tokio::task::spawn_blocking(move || {
            let path = &store.inner.shared.path;
            let txn = store.inner.db.begin_read().map_err(book(path))?;
            let journal = txn.open_table(JOURNAL).map_err(book(path))?;
            read_range(&journal, job_id, from, max, path)
        })
        .await
        .unwrap_or(Err(StoreError::WriterStopped))
    }
}

/// Up to `max` log bytes of one job from `from`.
fn read_range(
    journal: &impl ReadableTable<(i64, u64), &'static [u8]>,
    job_id: i64,
    from: u64,
    max: usize,
    path: &Path,
) -> Result<Bytes, StoreError> {
    // The record holding `from` is the last one starting at or before it.
    let first = journal
        .range((job_id, 0)..=(job_id, from))
        .map_err(book(path))?
        .next_back()
        .transpose()
        .map_err(book(path))?
        .map_or(0, |(key, _)| key.value().1);
    let mut out = BytesMut::new();
    for record in journal
        .range((job_id, first)..=(job_id, u64::MAX))
        .map_err(book(path))?
    {
        let (key, body) = record.map_err(book(path))?;
        let at = key.value().1;
        let Some((_, _, bytes)) = split_record(body.value()) else {
            continue;
        };
        let want = from + out.len() as u64;
        if at > want {
            // A gap: the journal lacks bytes here.
            break;
        }
        let skip = usize::try_from(want - at).unwrap_or(usize::MAX);
        if skip < bytes.len() {
            let take = (bytes.len() - skip).min(max - out.len());
            out.extend_from_slice(&bytes[skip..skip + take]);
        }
        if out.len() >= max {
            break;
        }
    }
    Ok(out.freeze())
}

/// A journal record's attempt, output offset and log bytes.
fn split_record(record: &[u8]) -> Option<(u32, u64, &[u8])> {
    let attempt = u32::from_le_bytes(record.get(0..4)?.try_into().ok()?);
    let offset = u64::from_le_bytes(record.get(4..12)?.try_into().ok()?);
    Some((attempt, offset, record.get(RECORD_HEADER..)?))
}

/// The writer thread's side.
struct Writer {
    db: Arc<redb::Database>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Request>,
    spend_path: PathBuf,
    state_dir: PathBuf,
}

impl Writer {
    fn run(self) {
        while self.run_once() {}
    }

    /// Waits for a request, takes every other one waiting, applies them all
    /// and completes them. Returns false once every handle is gone.
    fn run_once(&self) -> bool {
        let Ok(first) = self.rx.recv() else {
            return false;
        };
        let mut batch = vec![first];
        batch.extend(self.rx.try_iter());
        self.apply(batch);
        true
    }

    fn apply(&self, batch: Vec<Request>) {
        let counters = &self.shared.counters;
        counters.batches.fetch_add(1, Ordering::Relaxed);
        let changes = batch.iter().map(|r| r.changes.len() as u64).sum::<u64>();
        counters.changes.fetch_add(changes, Ordering::Relaxed);
        let all = || batch.iter().flat_map(|r| &r.changes);
        let book_result = if all().any(Change::touches_book) {
            self.commit(all().filter(|c| c.touches_book()))
        } else {
            Ok(())
        };
        if let Err(e) = &book_result {
            tracing::error!(error = %e, changes, "cannot write the lease book; a coordinator restart now would lose these changes");
        }
        // Only the newest spend record of the batch matters.
        let spend = all().rev().find_map(|c| match c {
            Change::Spend { record } => Some(record),
            _ => None,
        });
        let spend_result = match spend {
            Some(record) => {
                let written = replace_file(&self.spend_path, record, &self.state_dir);
                if written.is_ok() {
                    counters.syncs.fetch_add(2, Ordering::Relaxed);
                }
                written
            }
            None => Ok(()),
        };
        let last = batch.last().map_or(0, |r| r.seq);
        counters
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.shared.durable.fetch_max(last, Ordering::AcqRel);
        for request in batch {
            let spends = request
                .changes
                .iter()
                .any(|c| matches!(c, Change::Spend { .. }));
            let books = request.changes.iter().any(Change::touches_book);
            let result = match (&book_result, &spend_result) {
                (Err(e), _) if books => Err(e.clone()),
                (_, Err(e)) if spends => Err(e.clone()),
                _ => Ok(()),
            };
            let _ = request.done.send(result);
        }
    }

    /// Applies lease book changes in order in one transaction, committed
    /// with one sync.
    fn commit<'c>(&self, changes: impl Iterator<Item = &'c Change>) -> Result<(), StoreError> {
        let path = &self.shared.path;
        let txn = self.db.begin_write().map_err(book(path))?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(book(path))?;
            let mut leases = txn.open_table(LEASES).map_err(book(path))?;
            let mut results = txn.open_table(RESULTS).map_err(book(path))?;
            let mut runners = txn.open_table(RUNNERS).map_err(book(path))?;
            let mut journal = txn.open_table(JOURNAL).map_err(book(path))?;
            for change in changes {
                match change {
                    Change::Hold {
                        job_id,
                        raw,
                        runner,
                    } => {
                        jobs.insert(*job_id, raw.as_ref()).map_err(book(path))?;
                        runners
                            .insert(*job_id, runner.as_str())
                            .map_err(book(path))?;
                        leases
                            .insert(*job_id, encode_lease(&LeaseRecord::first()).as_slice())
                            .map_err(book(path))?;
                    }
                    Change::Lease { job_id, lease } => {
                        if jobs.get(*job_id).map_err(book(path))?.is_some() {
                            leases
                                .insert(*job_id, encode_lease(lease).as_slice())
                                .map_err(book(path))?;
                        }
                    }
                    Change::Result { job_id, result } => {
                        if jobs.get(*job_id).map_err(book(path))?.is_some() {
                            results
                                .insert(*job_id, result.encode_to_vec().as_slice())
                                .map_err(book(path))?;
                        }
                    }
                    Change::Remove { job_id } => {
                        jobs.remove(*job_id).map_err(book(path))?;
                        leases.remove(*job_id).map_err(book(path))?;
                        results.remove(*job_id).map_err(book(path))?;
                        runners.remove(*job_id).map_err(book(path))?;
                        journal
                            .retain_in((*job_id, 0)..=(*job_id, u64::MAX), |_, _| false)
                            .map_err(book(path))?;
                    }
                    Change::Append { job_id, at, record } => {
                        if jobs.get(*job_id).map_err(book(path))?.is_some() {
                            journal
                                .insert((*job_id, *at), record.as_ref())
                                .map_err(book(path))?;
                        }
                    }
                    Change::Spend { .. } => {}
                }
            }
        }
        txn.commit().map_err(book(path))?;
        self.shared.counters.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn encode_lease(lease: &LeaseRecord) -> Vec<u8> {
    serde_json::to_vec(lease).expect("a record of a number and a string always serialises")
}

/// Replaces a file so that a crash or a power loss leaves the old or the
/// new content, never a mix: write a private temporary file, sync it,
/// rename it over the old one, sync the directory that holds both.
fn replace_file(path: &Path, bytes: &[u8], dir: &Path) -> Result<(), StoreError> {
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
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    sync_dir(dir)
}

/// Makes a directory's entries (a rename, a new or removed file) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// Imports a lease book in the earlier layout, one directory of files per
/// job under `state_dir/jobs/`, then removes it. Jobs already in the new
/// book are left as they are there (an import interrupted after its commit
/// is simply finished on the next start).
fn import_legacy(db: &redb::Database, path: &Path, state_dir: &Path) -> Result<(), StoreError> {
    let legacy = state_dir.join(LEGACY_DIR);
    if !legacy.is_dir() {
        return Ok(());
    }
    let jobs = load_legacy(&legacy)?;
    let txn = db.begin_write().map_err(book(path))?;
    {
        let mut table = txn.open_table(JOBS).map_err(book(path))?;
        let mut leases = txn.open_table(LEASES).map_err(book(path))?;
        let mut results = txn.open_table(RESULTS).map_err(book(path))?;
        let mut journal = txn.open_table(JOURNAL).map_err(book(path))?;
        for job in &jobs {
            if table.get(job.job_id).map_err(book(path))?.is_some() {
                continue;
            }
            table
                .insert(job.job_id, job.raw.as_slice())
                .map_err(book(path))?;
            leases
                .insert(job.job_id, encode_lease(&job.lease).as_slice())
                .map_err(book(path))?;
            if let Some(result) = &job.result {
                results
                    .insert(job.job_id, result.encode_to_vec().as_slice())
                    .map_err(book(path))?;
            }
            // The whole log as one record, stamped with where it reached.
            if let Some((attempt, offset)) = job.output {
                let mut record = Vec::with_capacity(RECORD_HEADER + job.trace.len());
                record.extend_from_slice(&attempt.to_le_bytes());
                record.extend_from_slice(&offset.to_le_bytes());
                record.extend_from_slice(&job.trace);
                journal
                    .insert((job.job_id, 0), record.as_slice())
                    .map_err(book(path))?;
            }
        }
    }
    txn.commit().map_err(book(path))?;
    tracing::info!(
        jobs = jobs.len(),
        from = %legacy.display(),
        "imported the lease book from the earlier layout"
    );
    std::fs::remove_dir_all(&legacy).map_err(io("remove", &legacy))?;
    sync_dir(state_dir)
}

/// Reads the earlier layout. A job directory without a readable payload is
/// skipped with a warning (it was being created when the process died:
/// GitLab will time that job out).
fn load_legacy(dir: &Path) -> Result<Vec<StoredJob>, StoreError> {
    let mut jobs = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(io("read", dir))?;
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
            .unwrap_or_else(LeaseRecord::first);
        let result = std::fs::read(dir.join("result.pb"))
            .ok()
            .and_then(|b| Finished::decode(b.as_slice()).ok());
        let journal = std::fs::read(dir.join("trace.journal")).unwrap_or_default();
        let (trace, output) = replay_legacy_journal(&journal);
        jobs.insert(
            job_id,
            StoredJob {
                job_id,
                raw,
                runner: None,
                lease,
                trace,
                output,
                result,
            },
        );
    }
    Ok(jobs.into_values().collect())
}

/// Reads legacy journal records (`[len u32][attempt u32][offset u64][bytes]`)
/// back: the log bytes and the last (attempt, output offset). Stops at a
/// torn record (a crash mid-write).
fn replay_legacy_journal(journal: &[u8]) -> (Vec<u8>, Option<(u32, u64)>) {
    let mut trace = Vec::new();
    let mut last = None;
    let mut rest = journal;
    while rest.len() >= LEGACY_RECORD_HEADER {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(record) = rest.get(4..LEGACY_RECORD_HEADER + len) else {
            break;
        };
        let Some((attempt, offset, body)) = split_record(record) else {
            break;
        };
        trace.extend_from_slice(body);
        last = Some((attempt, offset));
        rest = &rest[LEGACY_RECORD_HEADER + len..];
    }
    (trace, last)
}

#[cfg(test)]
mod tests;
