//! Measures lease book writes on this machine's disk: lease changes per
//! second and the latency of each (submitted → durable), with N writers at
//! once, each moving the lease of its own job, for three ways of writing:
//!
//! - `per-change`: how the coordinator wrote before: one lock over the
//!   whole state, and under it each change written to its job's
//!   `lease.json` (temporary file, sync, rename) before the next;
//! - `files+group`: a writer thread with group commit over the same
//!   per-job files: a batch writes every changed file, syncs each, renames
//!   each, then syncs each job directory (what power-loss durability
//!   needs with one file per job);
//! - `lease-book`: the coordinator's store as it is: one transactional
//!   file, a writer thread, one sync per batch.
//!
//! The first two are written out here for the comparison; the third is the
//! production `Store`. Everything is written below `$TMPDIR` (or the
//! directory given with `--dir`), which should be on the disk the state
//! directory lives on.
//!
//! `cargo run --release -p servitor-tests --bin servitor-store-bench -- [--writers 1,8,64] [--changes 1600] [--dir PATH]`

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use servitor_coordinator::store::{Change, LeaseRecord, Store};
use servitor_tests::percentile;

/// Changes per run, split among the writers: enough for a stable p99.
const DEFAULT_CHANGES: usize = 1600;
/// Fewest changes each writer makes, so a run with many writers still
/// measures steady state.
const MIN_PER_WRITER: usize = 20;

fn lease_json(attempt: usize, writer: usize) -> Vec<u8> {
    format!(r#"{{"attempt":{attempt},"agent":"agent-{writer}"}}"#).into_bytes()
}

/// One way of writing a lease change and waiting until it is durable.
trait Backend: Send + Sync {
    fn write(&self, job: usize, bytes: Vec<u8>) -> anyhow::Result<()>;
}

/// The previous coordinator: the state lock held across each write.
struct PerChange {
    dir: PathBuf,
    core_lock: Mutex<()>,
}

impl Backend for PerChange {
    fn write(&self, job: usize, bytes: Vec<u8>) -> anyhow::Result<()> {
        let _held = self
            .core_lock
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let path = self.dir.join(job.to_string()).join("lease.json");
        let tmp = path.with_extension("tmp");
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// A lease change for the files writer: job, content, and where to say
/// it is durable.
type FileChange = (usize, Vec<u8>, mpsc::Sender<std::io::Result<()>>);

/// Group commit over per-job files with directory syncs.
struct FilesGroup {
    tx: Mutex<mpsc::Sender<FileChange>>,
}

impl FilesGroup {
    fn start(dir: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<FileChange>();
        std::thread::spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let mut latest = std::collections::BTreeMap::new();
                for (job, bytes, _) in &batch {
                    latest.insert(*job, bytes.clone());
                }
                let written = (|| -> std::io::Result<()> {
                    let mut files = Vec::new();
                    for (job, bytes) in &latest {
                        let tmp = dir.join(job.to_string()).join("lease.tmp");
                        let mut f = OpenOptions::new()
                            .create(true)
                            .write(true)
                            .truncate(true)
                            .open(&tmp)?;
                        f.write_all(bytes)?;
                        files.push((*job, f));
                    }
                    for (_, f) in &files {
                        f.sync_data()?;
                    }
                    for (job, _) in &files {
                        let d = dir.join(job.to_string());
                        std::fs::rename(d.join("lease.tmp"), d.join("lease.json"))?;
                    }
                    for (job, _) in &files {
                        std::fs::File::open(dir.join(job.to_string()))?.sync_all()?;
                    }
                    Ok(())
                })();
                for (_, _, done) in batch {
                    let _ = done.send(
                        written
                            .as_ref()
                            .copied()
                            .map_err(|e| std::io::Error::other(e.to_string())),
                    );
                }
            }
        });
        Self { tx: Mutex::new(tx) }
    }
}

impl Backend for FilesGroup {
    fn write(&self, job: usize, bytes: Vec<u8>) -> anyhow::Result<()> {
        let (done, wait) = mpsc::channel();
        self.tx
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .send((job, bytes, done))?;
        wait.recv()??;
        Ok(())
    }
}

/// The coordinator's lease book.
struct LeaseBook(Store);

impl Backend for LeaseBook {
    fn write(&self, job: usize, bytes: Vec<u8>) -> anyhow::Result<()> {
        let lease: LeaseRecord = serde_json::from_slice(&bytes)?;
        let job_id = i64::try_from(job)?;
        self.0
            .submit(vec![Change::Lease { job_id, lease }])
            .wait()?;
        Ok(())
    }
}

struct Figures {
    changes: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    syncs: Option<u64>,
}

fn run(backend: Arc<dyn Backend>, writers: usize, per_writer: usize) -> anyhow::Result<Figures> {
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let backend = backend.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut latencies = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let t = Instant::now();
                    backend.write(w, lease_json(i + 1, w))?;
                    latencies.push(t.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??,
        );
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Ok(Figures {
        changes: latencies.len(),
        elapsed,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        syncs: None,
    })
}

fn prepare_job_dirs(dir: &Path, writers: usize) -> anyhow::Result<()> {
    for w in 0..writers {
        std::fs::create_dir_all(dir.join(w.to_string()))?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Args {
    writers: Vec<usize>,
    changes: usize,
    dir: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        writers: vec![1, 8, 64],
        changes: DEFAULT_CHANGES,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().with_context(|| {
            format!("{arg} needs a value; see the usage at the top of the file")
        })?;
        match arg.as_str() {
            "--writers" => {
                out.writers = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--writers takes numbers separated by commas, e.g. 1,8,64")?;
            }
            "--changes" => out.changes = value.parse().context("--changes takes a number")?,
            "--dir" => out.dir = PathBuf::from(value),
            other => anyhow::bail!("unknown argument {other}; use --writers, --changes or --dir"),
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    println!(
        "lease changes, each durable before the writer makes its next ({} in all per row, under {})",
        args.changes,
        args.dir.display()
    );
    println!(
        "{:<12} {:>7} {:>12} {:>10} {:>10} {:>14}",
        "backend", "writers", "changes/s", "p50", "p99", "syncs/change"
    );
    for &writers in &args.writers {
        let per_writer = (args.changes / writers.max(1)).max(MIN_PER_WRITER);
        for name in ["per-change", "files+group", "lease-book"] {
            let root = tempfile::tempdir_in(&args.dir)?;
            let (backend, store): (Arc<dyn Backend>, Option<Store>) = match name {
                "per-change" => {
                    prepare_job_dirs(root.path(), writers)?;
                    (
                        Arc::new(PerChange {
                            dir: root.path().to_owned(),
                            core_lock: Mutex::new(()),
                        }),
                        None,
                    )
                }
                "files+group" => {
                    prepare_job_dirs(root.path(), writers)?;
                    (Arc::new(FilesGroup::start(root.path().to_owned())), None)
                }
                _ => {
                    let store = Store::open(root.path())?;
                    let holds = (0..writers)
                        .map(|w| {
                            Ok(Change::Hold {
                                job_id: i64::try_from(w)?,
                                raw: bytes::Bytes::from_static(b"{}"),
                                runner: "default".into(),
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    store.submit(holds).wait()?;
                    (Arc::new(LeaseBook(store.clone())), Some(store))
                }
            };
            let before = store.as_ref().map(|s| s.counters().syncs);
            let mut figures = run(backend, writers, per_writer)?;
            figures.syncs = store
                .as_ref()
                .zip(before)
                .map(|(s, b)| s.counters().syncs - b);
            #[allow(clippy::cast_precision_loss)]
            let rate = figures.changes as f64 / figures.elapsed.as_secs_f64();
            #[allow(clippy::cast_precision_loss)]
            let per_change = figures.syncs.map_or_else(
                || match name {
                    "per-change" => "1".to_owned(),
                    _ => "2 per job".to_owned(),
                },
                |s| format!("{:.3}", s as f64 / figures.changes as f64),
            );
            println!(
                "{name:<12} {writers:>7} {rate:>12.0} {:>10} {:>10} {per_change:>14}",
                ms(figures.p50),
                ms(figures.p99),
            );
        }
    }
    Ok(())
}
