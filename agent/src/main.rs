//! `edgesync-agent`: arguments, config, logging, then the library does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgesync_agent::config::Settings;
use edgesync_agent::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Every message is parsed into and merged from many small allocations, freed on another
/// thread (the store writer) than the one that made them: glibc's malloc spent about a third
/// of the agent's CPU on them, and mimalloc doubles durable QoS1 ingest (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The edgesync edge agent: keeps a shadow per MQTT device in SQLite and syncs it with the
/// cloud controller, losing nothing while the uplink is down.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format (filter with RUST_LOG, e.g. RUST_LOG=edgesync_agent=debug).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: MQTT intake (from the broker at mqtt.url, or its own embedded broker
    /// with mqtt.embedded = true), shadows, uplink, downlink, /metrics.
    Run {
        /// Agent config file (TOML); see examples/agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect device shadows (read-only, safe while the agent runs).
    Shadow {
        #[command(subcommand)]
        command: ShadowCommand,
    },
    /// Print the outbox as JSON: pending devices, oldest pending age, last acknowledged seq,
    /// and the database's epoch.
    Outbox {
        /// Agent config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Maintenance of the database (the agent must be stopped).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Clear the lost-commits alarm (edgesync_agent_store_lost_commits, the EdgeNode's
    /// StoreIntact condition) after checking what the database lost.
    ClearLostCommits {
        /// Agent config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ShadowCommand {
    /// Print one device's shadow document as JSON.
    Get {
        /// Device id.
        device: String,
        /// Agent config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List devices and their shadow versions as JSON.
    List {
        /// Agent config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn print_json(v: &serde_json::Value) {
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Shadow {
            command: ShadowCommand::Get { device, config },
        } => read_only(&config, |db| {
            edgesync_agent::cli::shadow_get(db, &device)?
                .ok_or_else(|| anyhow::anyhow!("no shadow for device {device}"))
        }),
        Command::Shadow {
            command: ShadowCommand::List { config },
        } => read_only(&config, |db| Ok(edgesync_agent::cli::shadow_list(db)?)),
        Command::Outbox { config } => read_only(&config, |db| Ok(edgesync_agent::cli::outbox(db)?)),
        Command::Store {
            command: StoreCommand::ClearLostCommits { config },
        } => clear_lost_commits(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", edgesync_protocol::errors::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Runs a read-only command against the database named by the config and prints its JSON.
fn read_only(
    config: &std::path::Path,
    command: impl FnOnce(&std::path::Path) -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<()> {
    let db = Settings::load_store_only(config)?;
    print_json(&command(&db)?);
    Ok(())
}

fn clear_lost_commits(config: &std::path::Path) -> anyhow::Result<()> {
    let db = Settings::load_store_only(config)?;
    let data_dir = db.parent().unwrap_or(std::path::Path::new("."));
    let _lock = edgesync_agent::lock::acquire(data_dir)?;
    let cleared = edgesync_agent::store::clear_lost_commits(&db)?;
    print_json(&serde_json::json!({ "clearedLostCommits": cleared.unwrap_or(0) }));
    Ok(())
}

fn run(config: &std::path::Path) -> anyhow::Result<()> {
    let settings = Settings::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // The signal is awaited next to the agent, not in a task of its own: nothing is
        // left running when the agent returns.
        let agent = edgesync_agent::app::run(settings, shutdown.clone());
        let mut agent = std::pin::pin!(agent);
        tokio::select! {
            result = &mut agent => return result,
            () = wait_for_signal() => shutdown.cancel(),
        }
        agent.await
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
