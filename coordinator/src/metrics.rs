//! The coordinator's Prometheus metrics: a fixed set of counters, gauges and
//! one histogram that the job, dispatch and fleet paths update, rendered in
//! the text exposition format 0.0.4 and served on `GET /metrics`.
//!
//! Not responsible for deciding when a number changes: callers count events
//! where they happen and set gauges from their own snapshots (the reconcile
//! loop, the job tasks). Nothing here reads the core or the fleet, and nothing
//! decides from these numbers. No metrics crate: a fixed set of families needs
//! only atomics, one lock and a formatter.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

/// The content type of the text exposition format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the metrics are served; Prometheus scrapes this path by default.
pub const METRICS_PATH: &str = "/metrics";

/// Upper bounds (seconds) of the queue-wait buckets, `+Inf` implied. From a
/// warm agent (well under a second) through a Spot launch and boot (a few
/// minutes) to a fleet held back by its budget or launch rate (half an hour).
const QUEUE_WAIT_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// How long open scrapes may finish after `stop`. A scrape takes
/// milliseconds; a client holding a connection longer must not hold up the
/// coordinator's ordered shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a held job ended, as `servitor_jobs_finished_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The job's script passed.
    Success,
    /// The job's script failed, or the job failed for a system reason.
    Failed,
    /// GitLab or a user canceled the job.
    Canceled,
    /// Its attempt was lost to an interruption and it could not run again:
    /// it used up its attempts or opted out of re-runs.
    Interrupted,
    /// The coordinator gave up on the job without a result from an attempt,
    /// for another reason than an interruption.
    Lost,
}

impl Outcome {
    /// Every outcome, in the order of the enum (which indexes the counters).
    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Failed,
        Outcome::Canceled,
        Outcome::Interrupted,
        Outcome::Lost,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Canceled => "canceled",
            Outcome::Interrupted => "interrupted",
            Outcome::Lost => "lost",
        }
    }
}

/// A fleet operation, as `servitor_fleet_scale_operations_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleOp {
    /// An instance was asked for.
    Launch,
    /// An instance was terminated on purpose (scale-in).
    Terminate,
    /// An instance that never joined or stopped answering was removed.
    Reap,
    /// An instance that ran its share of jobs was drained for replacement.
    Retire,
    /// An instance was protected from scale-in because it runs jobs.
    Protect,
    /// An idle instance lost its scale-in protection.
    Unprotect,
    /// The provider's desired capacity was set back to what the coordinator
    /// wants after something else changed it.
    DriftCorrection,
}

impl ScaleOp {
    /// Every operation, in the order of the enum (which indexes the counters).
    pub const ALL: [ScaleOp; 7] = [
        ScaleOp::Launch,
        ScaleOp::Terminate,
        ScaleOp::Reap,
        ScaleOp::Retire,
        ScaleOp::Protect,
        ScaleOp::Unprotect,
        ScaleOp::DriftCorrection,
    ];

    /// The `operation` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleOp::Launch => "launch",
            ScaleOp::Terminate => "terminate",
            ScaleOp::Reap => "reap",
            ScaleOp::Retire => "retire",
            ScaleOp::Protect => "protect",
            ScaleOp::Unprotect => "unprotect",
            ScaleOp::DriftCorrection => "drift_correction",
        }
    }
}

/// `state` label values of `servitor_fleet_instances`, in the order of
/// [`Metrics::set_instances`]'s arguments.
const INSTANCE_STATES: [&str; 4] = ["booting", "idle", "busy", "draining"];

/// Observations per bucket, not cumulative; cumulated when rendered.
#[derive(Debug, Default)]
struct Histogram {
    /// `buckets[i]` counts observations in `(bound[i-1], bound[i]]`.
    buckets: [u64; QUEUE_WAIT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        if let Some(i) = QUEUE_WAIT_BUCKETS.iter().position(|&bound| value <= bound) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += value;
    }
}

#[derive(Debug, Default)]
struct Spend {
    spent_usd: f64,
    cap_usd: Option<f64>,
}

/// The coordinator's metrics. Share it as `Arc<Metrics>`; every method takes
/// `&self` and none blocks for longer than a few additions.
#[derive(Debug, Default)]
pub struct Metrics {
    jobs_finished: [AtomicU64; Outcome::ALL.len()],
    // Under a lock rather than atomics so that a scrape never sees a
    // `_count` that disagrees with the `+Inf` bucket or `_sum`.
    queue_wait: Mutex<Histogram>,
    /// Each runner's fleet and jobs, by runner name.
    runners: Mutex<BTreeMap<String, RunnerGauges>>,
    scale_ops: [AtomicU64; ScaleOp::ALL.len()],
    spot_interruptions: AtomicU64,
    reruns: AtomicU64,
    // Set together, so a scrape never pairs one month's spend with another
    // month's cap.
    spend: Mutex<Spend>,
}

/// One runner's gauges.
#[derive(Debug, Default, Clone, Copy)]
struct RunnerGauges {
    /// In the order of [`INSTANCE_STATES`].
    instances: [u32; INSTANCE_STATES.len()],
    desired_capacity: u32,
    actual_capacity: u32,
    budget_blocked: u32,
    jobs_held: u32,
}

// Relaxed everywhere: each metric is independent, and a scrape that sees one
// update a moment before another is still a fair picture.
impl Metrics {
    /// All counters at zero, all gauges at zero, no budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a job the coordinator saw to its end.
    pub fn job_finished(&self, outcome: Outcome) {
        self.jobs_finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a job (or a re-run attempt) waited from being queued
    /// to being assigned to an agent.
    pub fn observe_queue_wait(&self, wait: Duration) {
        lock(&self.queue_wait).observe(wait.as_secs_f64());
    }

    /// Starts `runner`'s series at zero, so a dashboard's `rate()` has a
    /// zero to start from rather than a gap.
    pub fn add_runner(&self, runner: &str) {
        self.runner(runner, |_| {});
    }

    fn runner(&self, runner: &str, set: impl FnOnce(&mut RunnerGauges)) {
        let mut runners = lock(&self.runners);
        if let Some(gauges) = runners.get_mut(runner) {
            set(gauges);
        } else {
            set(runners.entry(runner.to_owned()).or_default());
        }
    }

    /// Sets the number of `runner`'s fleet instances in each state: booting,
    /// idle, busy, draining.
    pub fn set_instances(&self, runner: &str, counts: [u32; 4]) {
        self.runner(runner, |g| g.instances = counts);
    }

    /// Sets the size the coordinator wants `runner`'s fleet to have and the
    /// size it has.
    pub fn set_capacity(&self, runner: &str, desired: u32, actual: u32) {
        self.runner(runner, |g| {
            g.desired_capacity = desired;
            g.actual_capacity = actual;
        });
    }

    /// Counts `n` fleet operations of one kind.
    pub fn scale_op(&self, op: ScaleOp, n: u32) {
        self.scale_ops[op as usize].fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Counts a Spot interruption notice.
    pub fn spot_interruption(&self) {
        self.spot_interruptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a job attempt queued again after the previous one was lost.
    pub fn rerun(&self) {
        self.reruns.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the estimated spend this month and the monthly budget, in US
    /// dollars. With no budget (`None`) the budget gauge has no sample, so a
    /// dashboard does not read a missing budget as a budget of zero.
    pub fn set_spend(&self, spent_usd: f64, cap_usd: Option<f64>) {
        *lock(&self.spend) = Spend { spent_usd, cap_usd };
    }

    /// Sets how many of `runner`'s launches the budget holds back right now.
    pub fn set_budget_blocked(&self, runner: &str, n: u32) {
        self.runner(runner, |g| g.budget_blocked = n);
    }

    /// Sets how many jobs `runner` holds (queued or running).
    pub fn set_jobs_held(&self, runner: &str, n: u32) {
        self.runner(runner, |g| g.jobs_held = n);
    }

    /// The metrics in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();

        let name = "servitor_jobs_finished_total";
        out.family(
            name,
            "counter",
            "Jobs the coordinator saw to their end, by outcome.",
        );
        for outcome in Outcome::ALL {
            let value = self.jobs_finished[outcome as usize].load(Ordering::Relaxed);
            out.sample(name, &[("outcome", outcome.as_str())], value);
        }

        let name = "servitor_job_queue_wait_seconds";
        out.family(
            name,
            "histogram",
            "Time from a job or attempt being queued to being assigned to an agent.",
        );
        {
            let histogram = lock(&self.queue_wait);
            let mut cumulative = 0;
            for (bound, n) in QUEUE_WAIT_BUCKETS.iter().zip(histogram.buckets) {
                cumulative += n;
                let le = PromFloat(*bound).to_string();
                out.sample(
                    "servitor_job_queue_wait_seconds_bucket",
                    &[("le", &le)],
                    cumulative,
                );
            }
            let inf = PromFloat(f64::INFINITY).to_string();
            out.sample(
                "servitor_job_queue_wait_seconds_bucket",
                &[("le", &inf)],
                histogram.count,
            );
            out.sample(
                "servitor_job_queue_wait_seconds_sum",
                &[],
                PromFloat(histogram.sum),
            );
            out.sample(
                "servitor_job_queue_wait_seconds_count",
                &[],
                histogram.count,
            );
        }

        let runners: Vec<(String, RunnerGauges)> = lock(&self.runners)
            .iter()
            .map(|(name, gauges)| (name.clone(), *gauges))
            .collect();
        let name = "servitor_fleet_instances";
        out.family(name, "gauge", "Each runner's fleet instances by state.");
        for (runner, gauges) in &runners {
            for (state, n) in INSTANCE_STATES.iter().zip(gauges.instances) {
                out.sample(name, &[("runner", runner), ("state", state)], n);
            }
        }

        let name = "servitor_fleet_desired_capacity";
        out.family(
            name,
            "gauge",
            "Instances the coordinator wants in each runner's fleet.",
        );
        for (runner, gauges) in &runners {
            out.sample(name, &[("runner", runner)], gauges.desired_capacity);
        }

        let name = "servitor_fleet_actual_capacity";
        out.family(name, "gauge", "Instances each runner's fleet has.");
        for (runner, gauges) in &runners {
            out.sample(name, &[("runner", runner)], gauges.actual_capacity);
        }

        let name = "servitor_fleet_scale_operations_total";
        out.family(name, "counter", "Fleet operations, by kind.");
        for op in ScaleOp::ALL {
            let value = self.scale_ops[op as usize].load(Ordering::Relaxed);
            out.sample(name, &[("operation", op.as_str())], value);
        }

        let name = "servitor_spot_interruptions_total";
        out.family(name, "counter", "Spot interruption notices received.");
        out.sample(name, &[], self.spot_interruptions.load(Ordering::Relaxed));

        let name = "servitor_job_reruns_total";
        out.family(
            name,
            "counter",
            "Job attempts queued again after one was lost.",
        );
        out.sample(name, &[], self.reruns.load(Ordering::Relaxed));

        {
            let spend = lock(&self.spend);
            let name = "servitor_estimated_spend_usd";
            out.family(
                name,
                "gauge",
                "Estimated fleet spend this month, in US dollars.",
            );
            out.sample(name, &[], PromFloat(spend.spent_usd));

            let name = "servitor_budget_monthly_usd";
            out.family(
                name,
                "gauge",
                "Monthly fleet budget, in US dollars; absent when none is set.",
            );
            if let Some(cap) = spend.cap_usd {
                out.sample(name, &[], PromFloat(cap));
            }
        }

        let name = "servitor_budget_blocked_launches";
        out.family(
            name,
            "gauge",
            "Launches the budget holds back right now, by runner.",
        );
        for (runner, gauges) in &runners {
            out.sample(name, &[("runner", runner)], gauges.budget_blocked);
        }

        let name = "servitor_jobs_held";
        out.family(name, "gauge", "Jobs each runner holds, queued or running.");
        for (runner, gauges) in &runners {
            out.sample(name, &[("runner", runner)], gauges.jobs_held);
        }

        out.0
    }
}

/// A panic elsewhere while holding a metrics lock leaves plain numbers
/// behind, still fit to report.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A sample value as Prometheus parses it: Rust writes infinities as `inf`.
struct PromFloat(f64);

impl fmt::Display for PromFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v == f64::INFINITY {
            f.write_str("+Inf")
        } else if v == f64::NEG_INFINITY {
            f.write_str("-Inf")
        } else {
            // Shortest form that reads back exactly, never an exponent.
            write!(f, "{v}")
        }
    }
}

/// Exposition text being written.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.0.push_str("# HELP ");
        self.0.push_str(name);
        self.0.push(' ');
        escape_help(&mut self.0, help);
        self.0.push('\n');
        self.line(format_args!("# TYPE {name} {kind}\n"));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(label);
                self.0.push_str("=\"");
                escape_label_value(&mut self.0, value);
                self.0.push('"');
            }
            self.0.push('}');
        }
        self.line(format_args!(" {value}\n"));
    }

    fn line(&mut self, args: fmt::Arguments<'_>) {
        self.0
            .write_fmt(args)
            .expect("formatting into a String cannot fail");
    }
}

/// Label values escape backslash, double quote and line feed (format 0.0.4).
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes backslash and line feed, not quotes (format 0.0.4).
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Metrics server failures.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The TCP listener could not be set up.
    #[error("metrics.listen {addr}: {}", bind_advice(.source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server stopped serving.
    #[error("metrics server stopped: {0}")]
    Serve(#[source] std::io::Error),
}

impl MetricsError {
    /// Whether starting the server again later is worth trying: a bind error
    /// needs a different `metrics.listen`.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Serve(_))
    }
}

fn bind_advice(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::AddrInUse => "address in use; choose another port".to_owned(),
        ErrorKind::AddrNotAvailable => {
            "address not available on this host; listen on one of its addresses or 0.0.0.0"
                .to_owned()
        }
        ErrorKind::PermissionDenied => {
            "permission denied; choose a port above 1023 or grant the service CAP_NET_BIND_SERVICE"
                .to_owned()
        }
        _ => format!("{e}; check that it is a local address and the port is free"),
    }
}

/// A bound metrics listener, not yet serving. Binding apart from serving
/// lets the caller learn the port when it asked for port 0, and report a
/// bad address before it starts anything else.
#[derive(Debug)]
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
}

/// Binds the metrics listener on `addr`.
///
/// # Errors
/// [`MetricsError::Bind`] when the address cannot be listened on, naming
/// the fix (another port, another address).
pub async fn bind(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
    let fail = |source| MetricsError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(fail)?;
    let local_addr = listener.local_addr().map_err(fail)?;
    Ok(MetricsServer {
        listener,
        local_addr,
    })
}

impl MetricsServer {
    /// The bound address (with the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `GET /metrics` until `stop`, then lets open scrapes finish for
    /// a few seconds.
    ///
    /// # Errors
    /// [`MetricsError::Serve`] if the server fails; axum retries failed
    /// accepts itself, so this is rare.
    pub async fn run(
        self,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<(), MetricsError> {
        let server = axum::serve(self.listener, router(metrics))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future();
        let deadline = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            served = server => served.map_err(MetricsError::Serve),
            () = deadline => {
                // Dropping the server leaves its connection tasks to end with
                // the runtime; they hold nothing but a scrape.
                tracing::warn!(addr = %self.local_addr, "metrics scrapes still open at the shutdown deadline; leaving them");
                Ok(())
            }
        }
    }
}

/// Binds on `addr` and serves `GET /metrics` until `stop`.
///
/// # Errors
/// As [`bind`] and [`MetricsServer::run`].
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(), MetricsError> {
    bind(addr).await?.run(metrics, stop).await
}

fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(scrape))
        .fallback(not_found)
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render())
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        "not found; metrics are at /metrics\n",
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    /// Every family, with its type: exactly what the dashboards expect.
    const FAMILIES: [(&str, &str); 12] = [
        ("servitor_jobs_finished_total", "counter"),
        ("servitor_job_queue_wait_seconds", "histogram"),
        ("servitor_fleet_instances", "gauge"),
        ("servitor_fleet_desired_capacity", "gauge"),
        ("servitor_fleet_actual_capacity", "gauge"),
        ("servitor_fleet_scale_operations_total", "counter"),
        ("servitor_spot_interruptions_total", "counter"),
        ("servitor_job_reruns_total", "counter"),
        ("servitor_estimated_spend_usd", "gauge"),
        ("servitor_budget_monthly_usd", "gauge"),
        ("servitor_budget_blocked_launches", "gauge"),
        ("servitor_jobs_held", "gauge"),
    ];

    /// A sample line read back: name, labels, value.
    #[derive(Debug, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => {
                assert!(
                    s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)),
                    "value {s:?} is not a Prometheus float"
                );
                s.parse().unwrap()
            }
        }
    }

    /// Parses the labels of a sample line, undoing the escapes; returns the
    /// labels and the rest of the line.
    fn parse_labels(s: &str) -> (BTreeMap<String, String>, &str) {
        let mut labels = BTreeMap::new();
        let mut rest = s;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                return (labels, after);
            }
            let (name, after) = rest.split_once("=\"").expect("label has =\"");
            assert!(is_name(name), "bad label name {name:?}");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next().expect("label value is closed");
                match c {
                    '"' => break i,
                    '\\' => match chars.next().expect("escape is complete").1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        other => panic!("bad escape \\{other}"),
                    },
                    '\n' => panic!("raw line feed in label value"),
                    c => value.push(c),
                }
            };
            assert!(
                labels.insert(name.to_owned(), value).is_none(),
                "label {name} repeated"
            );
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }

    /// Reads exposition text back, checking it as Prometheus would: every
    /// sample belongs to a family declared before it, with HELP and TYPE
    /// once each. Returns the declared types and the samples.
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        assert!(text.ends_with('\n'), "exposition ends with a line feed");
        let mut types = BTreeMap::new();
        let mut helps = HashSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("HELP has text");
                assert!(is_name(name), "bad metric name {name:?}");
                assert!(helps.insert(name.to_owned()), "HELP {name} repeated");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad type {kind}"
                );
                assert!(helps.contains(name), "TYPE {name} before its HELP");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "TYPE {name} repeated"
                );
            } else {
                assert!(
                    !line.starts_with('#') && !line.is_empty(),
                    "stray line {line:?}"
                );
                let name_end = line.find(['{', ' ']).expect("sample has a value");
                let name = &line[..name_end];
                assert!(is_name(name), "bad metric name {name:?}");
                let (labels, rest) = match line[name_end..].strip_prefix('{') {
                    Some(after) => parse_labels(after),
                    None => (BTreeMap::new(), &line[name_end..]),
                };
                let value = rest.strip_prefix(' ').expect("space before the value");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        let base = name.strip_suffix(suffix)?;
                        (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                    })
                    .unwrap_or(name);
                assert!(types.contains_key(family), "sample {name} before its TYPE");
                samples.push(Sample {
                    name: name.to_owned(),
                    labels,
                    value: parse_value(value),
                });
            }
        }
        (types, samples)
    }

    /// The value of the one sample with this name and these labels.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found: Vec<_> = samples
            .iter()
            .filter(|s| s.name == name && s.labels == labels)
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?} in {samples:?}");
        found[0].value
    }

    #[test]
    fn every_family_has_help_and_type_and_no_other() {
        let m = Metrics::new();
        m.add_runner("lint");
        m.add_runner("build");
        let text = m.render();
        let (types, samples) = parse(&text);
        let expected: BTreeMap<String, String> = FAMILIES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        assert_eq!(types, expected);
        for (name, kind) in FAMILIES {
            assert!(
                text.contains(&format!("\n# TYPE {name} {kind}\n")),
                "{name}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        // Every labelled series exists from the start, so rate() has a zero
        // to start from rather than a gap.
        for outcome in Outcome::ALL {
            let labels = [("outcome", outcome.as_str())];
            assert_eq!(
                value(&samples, "servitor_jobs_finished_total", &labels),
                0.0
            );
        }
        for op in ScaleOp::ALL {
            let labels = [("operation", op.as_str())];
            let name = "servitor_fleet_scale_operations_total";
            assert_eq!(value(&samples, name, &labels), 0.0);
        }
        for runner in ["lint", "build"] {
            for state in INSTANCE_STATES {
                let labels = [("runner", runner), ("state", state)];
                assert_eq!(value(&samples, "servitor_fleet_instances", &labels), 0.0);
            }
            let labels = [("runner", runner)];
            for name in [
                "servitor_fleet_desired_capacity",
                "servitor_fleet_actual_capacity",
                "servitor_budget_blocked_launches",
                "servitor_jobs_held",
            ] {
                assert_eq!(value(&samples, name, &labels), 0.0);
            }
        }
        // No budget set: the family is declared, with no sample.
        assert!(!samples
            .iter()
            .any(|s| s.name == "servitor_budget_monthly_usd"));
    }

    #[test]
    fn counters_count() {
        let m = Metrics::new();
        m.job_finished(Outcome::Success);
        m.job_finished(Outcome::Success);
        m.job_finished(Outcome::Interrupted);
        m.scale_op(ScaleOp::Launch, 3);
        m.scale_op(ScaleOp::Launch, 2);
        m.scale_op(ScaleOp::DriftCorrection, 1);
        m.spot_interruption();
        m.rerun();
        m.rerun();
        let (_, samples) = parse(&m.render());
        let finished = |o: Outcome| {
            value(
                &samples,
                "servitor_jobs_finished_total",
                &[("outcome", o.as_str())],
            )
        };
        assert_eq!(finished(Outcome::Success), 2.0);
        assert_eq!(finished(Outcome::Interrupted), 1.0);
        assert_eq!(finished(Outcome::Failed), 0.0);
        let ops = |op: ScaleOp| {
            value(
                &samples,
                "servitor_fleet_scale_operations_total",
                &[("operation", op.as_str())],
            )
        };
        assert_eq!(ops(ScaleOp::Launch), 5.0);
        assert_eq!(ops(ScaleOp::DriftCorrection), 1.0);
        assert_eq!(ops(ScaleOp::Terminate), 0.0);
        assert_eq!(
            value(&samples, "servitor_spot_interruptions_total", &[]),
            1.0
        );
        assert_eq!(value(&samples, "servitor_job_reruns_total", &[]), 2.0);
    }

    #[test]
    fn gauges_show_the_latest_value() {
        let m = Metrics::new();
        m.set_instances("lint", [9, 9, 9, 9]);
        m.set_instances("lint", [1, 2, 3, 4]);
        m.set_instances("build", [0, 0, 5, 0]);
        m.set_capacity("lint", 10, 7);
        m.set_capacity("build", 5, 5);
        m.set_spend(12.5, Some(1000.0));
        m.set_budget_blocked("build", 2);
        m.set_jobs_held("lint", 6);
        m.set_jobs_held("build", 5);
        let (_, samples) = parse(&m.render());
        for (state, n) in INSTANCE_STATES.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            let labels = [("runner", "lint"), ("state", *state)];
            assert_eq!(value(&samples, "servitor_fleet_instances", &labels), n);
        }
        let build_busy = [("runner", "build"), ("state", "busy")];
        assert_eq!(
            value(&samples, "servitor_fleet_instances", &build_busy),
            5.0
        );
        let lint = [("runner", "lint")];
        let build = [("runner", "build")];
        assert_eq!(
            value(&samples, "servitor_fleet_desired_capacity", &lint),
            10.0
        );
        assert_eq!(
            value(&samples, "servitor_fleet_actual_capacity", &lint),
            7.0
        );
        assert_eq!(value(&samples, "servitor_estimated_spend_usd", &[]), 12.5);
        assert_eq!(value(&samples, "servitor_budget_monthly_usd", &[]), 1000.0);
        assert_eq!(
            value(&samples, "servitor_budget_blocked_launches", &build),
            2.0
        );
        assert_eq!(
            value(&samples, "servitor_budget_blocked_launches", &lint),
            0.0
        );
        assert_eq!(value(&samples, "servitor_jobs_held", &lint), 6.0);
        assert_eq!(value(&samples, "servitor_jobs_held", &build), 5.0);

        m.set_spend(13.0, None);
        let (_, samples) = parse(&m.render());
        assert_eq!(value(&samples, "servitor_estimated_spend_usd", &[]), 13.0);
        assert!(!samples
            .iter()
            .any(|s| s.name == "servitor_budget_monthly_usd"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        for secs in [0.05, 0.1, 3.0, 700.0, 4000.0] {
            m.observe_queue_wait(Duration::from_secs_f64(secs));
        }
        let text = m.render();
        let (_, samples) = parse(&text);
        let buckets: Vec<(String, f64)> = samples
            .iter()
            .filter(|s| s.name == "servitor_job_queue_wait_seconds_bucket")
            .map(|s| (s.labels["le"].clone(), s.value))
            .collect();
        let expected = [
            ("0.1", 2.0), // a bound is inclusive: 0.1 s falls in le="0.1"
            ("0.5", 2.0),
            ("1", 2.0),
            ("2", 2.0),
            ("5", 3.0),
            ("10", 3.0),
            ("30", 3.0),
            ("60", 3.0),
            ("120", 3.0),
            ("300", 3.0),
            ("600", 3.0),
            ("1800", 4.0),
            ("+Inf", 5.0),
        ];
        let expected: Vec<(String, f64)> = expected
            .iter()
            .map(|(le, n)| ((*le).to_owned(), *n))
            .collect();
        assert_eq!(buckets, expected);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        let count = value(&samples, "servitor_job_queue_wait_seconds_count", &[]);
        assert_eq!(count, buckets.last().unwrap().1);
        let sum = value(&samples, "servitor_job_queue_wait_seconds_sum", &[]);
        assert!((sum - 4703.15).abs() < 1e-9, "{sum}");
        // The +Inf bucket comes last, then _sum, then _count.
        let inf = text.find("le=\"+Inf\"").unwrap();
        let sum_at = text.find("servitor_job_queue_wait_seconds_sum").unwrap();
        let count_at = text.find("servitor_job_queue_wait_seconds_count").unwrap();
        assert!(inf < sum_at && sum_at < count_at);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = String::new();
        escape_label_value(&mut out, "a\\b\"c\nd");
        assert_eq!(out, r#"a\\b\"c\nd"#);

        let mut out = String::new();
        escape_help(&mut out, "a\\b\"c\nd");
        assert_eq!(out, r#"a\\b"c\nd"#);

        // Through the writer and back through the reader.
        let mut e = Exposition::default();
        e.family("x_total", "counter", "help with \\ and\nbreak");
        e.sample(
            "x_total",
            &[("path", "C:\\dir \"q\"\nnext"), ("b", "")],
            1u64,
        );
        assert_eq!(
            e.0,
            "# HELP x_total help with \\\\ and\\nbreak\n\
             # TYPE x_total counter\n\
             x_total{path=\"C:\\\\dir \\\"q\\\"\\nnext\",b=\"\"} 1\n"
        );
        let (_, samples) = parse(&e.0);
        assert_eq!(samples[0].labels["path"], "C:\\dir \"q\"\nnext");
        assert_eq!(samples[0].labels["b"], "");
    }

    #[test]
    fn floats_are_written_as_prometheus_reads_them() {
        let cases = [
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
            (0.1, "0.1"),
            (1.0, "1"),
            (1800.0, "1800"),
            (-2.5, "-2.5"),
            (1e21, "1000000000000000000000"),
            (1e-7, "0.0000001"),
        ];
        for (v, text) in cases {
            assert_eq!(PromFloat(v).to_string(), text);
            let back = parse_value(text);
            assert!(back == v || (back.is_nan() && v.is_nan()), "{text}");
        }
    }

    #[test]
    fn enum_labels_are_distinct_and_index_their_counters() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
            assert!(is_name(o.as_str()));
        }
        for (i, op) in ScaleOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
            assert!(is_name(op.as_str()));
        }
        let outcomes: HashSet<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(outcomes.len(), Outcome::ALL.len());
        let ops: HashSet<_> = ScaleOp::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(ops.len(), ScaleOp::ALL.len());
    }

    fn loopback() -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let metrics = Arc::new(Metrics::new());
        metrics.job_finished(Outcome::Canceled);
        metrics.observe_queue_wait(Duration::from_millis(1500));
        let server = bind(loopback()).await.unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let stop = CancellationToken::new();
        let running = tokio::spawn(server.run(metrics.clone(), stop.clone()));

        let http = reqwest::Client::new();
        let response = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], CONTENT_TYPE);
        let body = response.text().await.unwrap();
        assert!(
            body.contains("servitor_jobs_finished_total{outcome=\"canceled\"} 1\n"),
            "{body}"
        );
        assert!(body.contains("servitor_job_queue_wait_seconds_bucket{le=\"2\"} 1\n"));
        parse(&body);

        // The counter moves between scrapes.
        metrics.job_finished(Outcome::Canceled);
        let body = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains("servitor_jobs_finished_total{outcome=\"canceled\"} 2\n"));

        let response = http
            .get(format!("http://{addr}/other"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);

        stop.cancel();
        // Idle keep-alive connections close on stop: the server ends well
        // before the grace would cut it off.
        let stopped = tokio::time::timeout(SHUTDOWN_GRACE / 2, running).await;
        stopped.expect("server stops on cancel").unwrap().unwrap();
        assert!(http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .is_err());
    }

    #[tokio::test]
    async fn bind_to_a_port_in_use_names_the_fix() {
        let taken = bind(loopback()).await.unwrap();
        let addr = taken.local_addr();
        let e = bind(addr).await.unwrap_err();
        assert!(matches!(e, MetricsError::Bind { .. }), "{e:?}");
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            format!("metrics.listen {addr}: address in use; choose another port")
        );
        let stop = CancellationToken::new();
        stop.cancel();
        let e = serve(addr, Arc::new(Metrics::new()), stop)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("choose another port"), "{e}");
    }
}
