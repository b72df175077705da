//! The long soak: `servitor-soak [--minutes N] [--seed S]`. Prints the seed
//! first and a summary at the end (jobs, attempts, faults by kind,
//! invariant violations); exits 1 when an invariant was violated.

use std::process::ExitCode;

use anyhow::Context;
use servitor_tests::soak::{self, SoakOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("servitor-soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<bool> {
    let mut minutes = 60_u64;
    let mut seed = soak::seed_from_env()?;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value"))
                .and_then(|v| {
                    v.parse::<u64>()
                        .with_context(|| format!("{name} {v:?}: not a whole number"))
                })
        };
        match arg.as_str() {
            "--minutes" => minutes = value("--minutes")?,
            "--seed" => seed = value("--seed")?,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: servitor-soak [--minutes N] [--seed S]"
            ),
        }
    }
    servitor_tests::init_tracing();
    println!("soak seed {seed}, {minutes} minutes (--seed {seed} replays it)");
    let report = soak::run(SoakOptions::long(seed, minutes)).await?;
    println!("{}", report.summary());
    Ok(report.violations.is_empty())
}
