//! `edgesync-controller` entry point.

use clap::Parser;
use edgesync_controller::cli::{Cli, Command};
use edgesync_controller::telemetry;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(opts) => runtime.block_on(edgesync_controller::run(opts)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", edgesync_protocol::errors::chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
