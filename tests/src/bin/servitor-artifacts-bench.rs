//! Artifact and cache throughput and memory: archives a directory of
//! incompressible files as the agent does (`select` + zip), uploads the
//! archive with the agent's job-token client, downloads it back and
//! extracts it; then saves the same directory as a cache through moto's S3
//! with URLs the coordinator signed, and restores it into an empty
//! directory, through the agent's own cache stages. Reports each phase's
//! throughput and the process's peak RSS while it ran. The far ends (a
//! minimal HTTP server that drains uploads and streams downloads from
//! disk, and moto) are other tasks or processes whose memory is not the
//! agent's: the HTTP server's buffers are a few KiB, moto is its own
//! process.
//!
//! ```text
//! cargo build --workspace --all-targets
//! target/debug/servitor-artifacts-bench --mb 100 --cache-mb 200
//! ```
//!
//! The cache phases need moto's server (`SERVITOR_MOTO_SERVER`, as
//! `tests/run.sh` installs it); `--cache-mb 0` skips them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use servitor_agent::executor::archive;
use servitor_agent::gitlab::{JobApi, UploadQuery};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const USAGE: &str = "usage: servitor-artifacts-bench [--mb 100] [--files 100] [--cache-mb 200]";

/// What to measure.
#[derive(Debug)]
struct Args {
    /// Megabytes of incompressible data to archive.
    mb: u64,
    /// Files the data is split into.
    files: u64,
    /// Megabytes to save and restore as a cache through moto's S3.
    cache_mb: u64,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut parsed = Self {
            mb: 100,
            files: 100,
            cache_mb: 200,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value: u64 = args
                .next()
                .with_context(|| format!("{flag} needs a value; {USAGE}"))?
                .parse()
                .with_context(|| format!("{flag} takes a whole number; {USAGE}"))?;
            match flag.as_str() {
                "--mb" => parsed.mb = value,
                "--files" => parsed.files = value.max(1),
                "--cache-mb" => parsed.cache_mb = value,
                _ => bail!("unknown option {flag}; {USAGE}"),
            }
        }
        Ok(parsed)
    }
}

/// Samples the process's resident set every few milliseconds and keeps
/// the highest value seen since the last reset.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start() -> Self {
        let now = servitor_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0);
        let peak_kib = Arc::new(AtomicU64::new(now));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt) = (Arc::clone(&peak_kib), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                if let Ok(kib) = servitor_tests::proc_status_kib(std::process::id(), "VmRSS") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { peak_kib, stop }
    }

    /// The peak since the last call, in MiB, and starts a new window.
    fn take_mib(&self) -> f64 {
        let current = servitor_tests::proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0);
        self.peak_kib.swap(current, Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn write_files(dir: &Path, total: u64, files: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let per_file = total / files;
    let mut chunk = vec![0u8; 1024 * 1024];
    for index in 0..files {
        let sub = dir.join(format!("out/part-{}", index % 10));
        std::fs::create_dir_all(&sub)?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(
            sub.join(format!("blob-{index}.bin")),
        )?);
        let mut left = per_file;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            rand::fill(&mut chunk[..n]);
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.flush()?;
    }
    Ok(())
}

/// Drains `POST` bodies (answering 201) and serves `archive` to `GET`s,
/// one connection at a time.
async fn far_end(listener: TcpListener, archive: PathBuf) {
    while let Ok((stream, _)) = listener.accept().await {
        let archive = archive.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).await.is_err() {
                return;
            }
            let mut length = 0u64;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            if request_line.starts_with("POST") {
                let _ =
                    tokio::io::copy(&mut (&mut reader).take(length), &mut tokio::io::sink()).await;
                let _ = write
                    .write_all(
                        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    )
                    .await;
            } else if let Ok(mut file) = tokio::fs::File::open(&archive).await {
                let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                );
                if write.write_all(head.as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut file, &mut write).await;
                }
            }
            let _ = write.shutdown().await;
        });
    }
}

fn row(phase: &str, bytes: u64, took: Duration, rss_mib: f64) {
    let mb = bytes as f64 / 1_000_000.0;
    println!(
        "| {phase:<22} | {mb:>8.1} MB | {:>7.2} s | {:>8.1} MB/s | {rss_mib:>7.1} MiB |",
        took.as_secs_f64(),
        mb / took.as_secs_f64().max(1e-9),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let total = args.mb * 1024 * 1024;
    let work = tempfile::tempdir().context("creating a work directory")?;
    let project = work.path().join("project");
    write_files(&project, total, args.files).context("writing the data")?;
    let rss = RssSampler::start();
    println!(
        "{} MiB in {} incompressible files; baseline RSS {:.1} MiB\n",
        args.mb,
        args.files,
        rss.take_mib()
    );
    println!("| phase                  |     data    |  time     |  throughput   | peak RSS   |");
    println!("|---|---|---|---|---|");

    let zip_path = work.path().join("artifacts.zip");
    let started = Instant::now();
    let (dir, dest) = (project.clone(), zip_path.clone());
    let size = tokio::task::spawn_blocking(move || {
        let selection = archive::select(&dir, &["out/".to_owned()], &[], &[])?;
        archive::write_zip(&dir, &selection, &dest, archive::Level::Default)
    })
    .await??;
    row("archive (zip)", total, started.elapsed(), rss.take_mib());

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(far_end(listener, zip_path.clone()));
    let api = JobApi::new(&url)?;
    let started = Instant::now();
    api.upload_artifact(
        1,
        "token",
        &zip_path,
        "artifacts.zip",
        &UploadQuery {
            artifact_format: "zip".into(),
            artifact_type: "archive".into(),
            expire_in: String::new(),
        },
    )
    .await?;
    row("upload", size, started.elapsed(), rss.take_mib());

    let fetched = work.path().join("fetched.zip");
    let started = Instant::now();
    api.download_artifacts(1, "token", &fetched).await?;
    row("download", size, started.elapsed(), rss.take_mib());

    let target = work.path().join("extracted");
    std::fs::create_dir_all(&target)?;
    let started = Instant::now();
    let extracted =
        tokio::task::spawn_blocking(move || archive::extract_zip(&fetched, &target)).await??;
    row(
        "extract",
        extracted.bytes,
        started.elapsed(),
        rss.take_mib(),
    );
    anyhow::ensure!(
        extracted.bytes == total,
        "extracted {} bytes, archived {total}",
        extracted.bytes
    );
    if args.cache_mb > 0 {
        cache_phases(&args, work.path(), &rss).await?;
    }
    Ok(())
}

/// Saves `--cache-mb` as a cache through moto's S3 and restores it, with
/// the coordinator's signed URLs and the agent's cache stages.
async fn cache_phases(args: &Args, work: &Path, rss: &RssSampler) -> anyhow::Result<()> {
    use servitor_coordinator::cache::CacheStore;
    use servitor_coordinator::config::{CacheConfig, CacheKind, S3CacheConfig};
    use servitor_proto::job::{Cache, JobInfo, JobPayload};

    const BUCKET: &str = "bench-cache";
    servitor_tests::aws::aws_environment();
    let moto = servitor_tests::aws::Moto::start().await?;
    let created = reqwest::Client::new()
        .put(format!("{}/{BUCKET}", moto.url()))
        .send()
        .await?;
    anyhow::ensure!(
        created.status().is_success(),
        "creating the bucket: {}",
        created.status()
    );
    let store = CacheStore::new(
        &CacheConfig {
            kind: CacheKind::S3,
            path: String::new(),
            shared: false,
            s3: Some(S3CacheConfig {
                bucket: BUCKET.to_owned(),
                region: Some(servitor_tests::aws::REGION.to_owned()),
                endpoint_url: Some(moto.url().to_owned()),
            }),
            local: None,
        },
        "glrt-bench",
    )
    .await?;
    let job = JobPayload {
        id: 1,
        token: "t".to_owned(),
        job_info: JobInfo {
            project_id: 1,
            ..JobInfo::default()
        },
        cache: vec![Cache {
            key: "bench".to_owned(),
            paths: vec!["out/".to_owned()],
            ..Cache::default()
        }],
        ..JobPayload::default()
    };
    let caches = store.access(&job).await;
    let ctx = servitor_agent::executor::JobContext {
        job,
        gitlab_url: String::new(),
        caches,
        attempt: 1,
        work_dir: work.to_path_buf(),
        concurrent_id: 0,
        agent_name: "bench".to_owned(),
        owner: "bench".to_owned(),
    };
    let total = args.cache_mb * 1024 * 1024;
    let source = work.join("cache-source");
    write_files(&source, total, args.files)?;
    let tmp = work.join("cache-tmp");
    std::fs::create_dir_all(&tmp)?;
    let (sink, mut log) = tokio::sync::mpsc::channel(64);
    let out = servitor_agent::executor::output::JobOutput::new(sink, false);
    let drain = tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some(chunk) = log.recv().await {
            text.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    rss.take_mib();
    let started = Instant::now();
    servitor_agent::executor::cache::save(&ctx, true, &source, &tmp, &out).await;
    row(
        "cache save (zip + S3)",
        total,
        started.elapsed(),
        rss.take_mib(),
    );

    let restored = work.join("cache-restored");
    std::fs::create_dir_all(&restored)?;
    let started = Instant::now();
    servitor_agent::executor::cache::restore(&ctx, &restored, &tmp, &out)
        .await
        .map_err(anyhow::Error::msg)?;
    row(
        "cache restore (S3)",
        total,
        started.elapsed(),
        rss.take_mib(),
    );
    let back: u64 = walkdir_size(&restored.join("out"))?;
    anyhow::ensure!(back == total, "restored {back} bytes of {total}");
    drop(out);
    let log = drain.await?;
    anyhow::ensure!(
        log.contains("Created cache") && log.contains("Successfully extracted cache"),
        "the cache did not go round:\n{log}"
    );
    Ok(())
}

/// Bytes of the regular files below `dir`.
fn walkdir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            walkdir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
