//! `servitor-demo`: the README's first command. A GitLab stand-in, the
//! coordinator with its local fleet, and a sample pipeline shown live (see
//! `servitor_tests::demo`).
//!
//! The demo's local instances run this same binary as `servitor-demo agent
//! --config <file>`, which is the real agent (`servitor_agent`), so one
//! `cargo run` builds everything the demo needs. The production
//! coordinator carries no agent: its local fleet starts `servitor-agent`.

use std::process::ExitCode;

use servitor_runtime::exit;
use servitor_runtime::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// The first argument that makes this binary a local agent.
const AGENT_SUBCOMMAND: &str = "agent";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let as_agent = args.first().map(String::as_str) == Some(AGENT_SUBCOMMAND);
    // The demo prints its own story; agents log to their own files.
    telemetry::init(LogFormat::Plain, if as_agent { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("servitor-demo: cannot start the async runtime: {e}");
            return ExitCode::from(exit::TRANSIENT);
        }
    };
    let shutdown = CancellationToken::new();
    runtime.block_on(async move {
        if let Err(e) = servitor_runtime::signals::cancel_on_signals(shutdown.clone()) {
            eprintln!("servitor-demo: cannot install signal handlers: {e}");
            return ExitCode::from(exit::TRANSIENT);
        }
        if as_agent {
            return agent(&args[1..], shutdown).await;
        }
        let exe = match std::env::current_exe() {
            Ok(exe) => exe.display().to_string(),
            Err(e) => {
                eprintln!("servitor-demo: cannot tell where this binary is: {e}");
                return ExitCode::from(exit::TRANSIENT);
            }
        };
        match servitor_tests::demo::run(vec![exe, AGENT_SUBCOMMAND.to_owned()], shutdown).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(exit::TRANSIENT),
            Err(e) => {
                eprintln!("servitor-demo: {e:#}");
                ExitCode::from(exit::TRANSIENT)
            }
        }
    })
}

/// `agent --config <file>`: the real agent, as the local fleet starts it.
async fn agent(args: &[String], shutdown: CancellationToken) -> ExitCode {
    let [flag, path] = args else {
        eprintln!("servitor-demo agent: usage: servitor-demo agent --config <file>");
        return ExitCode::from(exit::CONFIG);
    };
    if flag != "--config" {
        eprintln!("servitor-demo agent: unknown argument {flag:?}; usage: servitor-demo agent --config <file>");
        return ExitCode::from(exit::CONFIG);
    }
    let config = match servitor_agent::config::AgentConfig::load(std::path::Path::new(path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("servitor-agent: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    match servitor_agent::run_with_config(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            ExitCode::from(e.exit_code())
        }
    }
}
