//! `servitor-coordinator`: the systemd service and its admin CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use servitor_runtime::exit::{CONFIG as EXIT_CONFIG, TRANSIENT as EXIT_TRANSIENT};
use servitor_runtime::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// The Servitor coordinator: a GitLab runner that holds job leases and runs
/// them on interruptible instances.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The coordinator's configuration file.
    #[arg(long, global = true, default_value = "/etc/servitor/coordinator.toml")]
    config: PathBuf,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator (what the systemd unit starts).
    Run,
    /// Check the configuration and the files it names, then exit.
    CheckConfig,
    /// Show agents, instances and held jobs of the running coordinator.
    Status,
    /// Stop taking new GitLab jobs; held jobs run to the end.
    Drain,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("servitor-coordinator: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_TRANSIENT);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run => run(&cli.config).await,
            Command::CheckConfig => match servitor_coordinator::load(&cli.config) {
                Ok(_) => {
                    println!("{}: ok", cli.config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("servitor-coordinator: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            },
            Command::Status | Command::Drain => {
                admin(&cli.config, matches!(cli.command, Command::Drain)).await
            }
        }
    })
}

async fn run(path: &std::path::Path) -> ExitCode {
    let (config, secrets) = match servitor_coordinator::load(path) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("servitor-coordinator: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "servitor coordinator starting"
    );
    let shutdown = CancellationToken::new();
    if let Err(e) = servitor_runtime::signals::cancel_on_signals(shutdown.clone()) {
        eprintln!("servitor-coordinator: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_TRANSIENT);
    }
    match servitor_coordinator::start(config, secrets, Default::default(), shutdown).await {
        Ok(coordinator) => {
            coordinator.wait().await;
            tracing::info!("stopped; held jobs stay leased for the next start");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "coordinator cannot start");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn admin(path: &std::path::Path, drain: bool) -> ExitCode {
    let config = match servitor_coordinator::config::Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("servitor-coordinator: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let socket = config.admin_socket();
    let result = async {
        let mut client = servitor_coordinator::admin::connect(&socket).await?;
        if drain {
            client.drain(servitor_proto::admin::DrainRequest {}).await?;
            println!("draining: no new GitLab jobs will be taken");
        } else {
            let status = client
                .status(servitor_proto::admin::StatusRequest {})
                .await?
                .into_inner();
            print!("{}", servitor_coordinator::admin::render_status(&status));
        }
        Ok::<_, servitor_coordinator::admin::AdminError>(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("servitor-coordinator: {e}");
            ExitCode::from(EXIT_TRANSIENT)
        }
    }
}
