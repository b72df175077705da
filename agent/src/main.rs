//! `servitor-agent`: runs on an instance, dials the coordinator, runs jobs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use servitor_agent::config::AgentConfig;
use servitor_runtime::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// The Servitor agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The agent's configuration file.
    #[arg(long, default_value = "/etc/servitor-agent/agent.toml")]
    config: PathBuf,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Only check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Configure from the environment the coordinator gives a Fargate task
    /// it starts (`SERVITOR_COORDINATOR`, `SERVITOR_CA_SHA256`, …) instead
    /// of a file: run one job in this container, then exit.
    #[arg(long, conflicts_with = "config")]
    task: bool,
    /// Copy this executable into DIR as `servitor-agent` and exit: what the
    /// init container of a Fargate task does, so the job's own image can
    /// run the agent from the task's shared volume.
    #[arg(long, value_name = "DIR")]
    install: Option<PathBuf>,
}

/// Copies the running executable to `dir/servitor-agent`, executable by
/// all: the init container's whole work.
fn install(dir: &std::path::Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot tell where this executable is: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let target = dir.join("servitor-agent");
    // Written beside the target and renamed: a reader never sees half.
    let partial = dir.join(".servitor-agent.partial");
    std::fs::copy(&exe, &partial).map_err(|e| {
        format!(
            "cannot copy {} to {}: {e}",
            exe.display(),
            partial.display()
        )
    })?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make {} executable: {e}", partial.display()))?;
    std::fs::rename(&partial, &target)
        .map_err(|e| format!("cannot move the copy to {}: {e}", target.display()))?;
    Ok(target)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    if let Some(dir) = &cli.install {
        return match install(dir) {
            Ok(target) => {
                println!("installed {}", target.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("servitor-agent: {e}");
                ExitCode::from(servitor_runtime::exit::TRANSIENT)
            }
        };
    }
    let loaded = if cli.task {
        AgentConfig::from_task_env(|name| std::env::var(name).ok())
    } else {
        AgentConfig::load(&cli.config)
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("servitor-agent: {e}");
            return ExitCode::from(servitor_runtime::exit::CONFIG);
        }
    };
    if cli.check_config {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("servitor-agent: cannot start the async runtime: {e}");
            return ExitCode::from(servitor_runtime::exit::TRANSIENT);
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        if let Err(e) = servitor_runtime::signals::cancel_on_signals(shutdown.clone()) {
            eprintln!("servitor-agent: cannot install signal handlers: {e}");
            return ExitCode::from(servitor_runtime::exit::TRANSIENT);
        }
        match servitor_agent::run_with_config(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "agent stopped");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
