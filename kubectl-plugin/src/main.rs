//! `kubectl edgesync`: a kubectl plugin for edgesync fleets (see `cli` for the commands).

// A command-line tool: its output is what it prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cli;
mod device;
mod get;
mod live;
mod rollout;
mod set;
mod status;
mod table;
mod tail;

use clap::Parser as _;
use kube::config::KubeConfigOptions;

use cli::{Cli, Command};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {}", edgesync_protocol::errors::chain(e.as_ref()));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &cli.global.context {
        Some(context) => kube::Config::from_kubeconfig(&KubeConfigOptions {
            context: Some(context.clone()),
            ..KubeConfigOptions::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("kubeconfig context {context:?}: {e}"))?,
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("no Kubernetes configuration (set KUBECONFIG or ~/.kube/config): {e}")
        })?,
    };
    let namespace = cli
        .global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    let output = cli.global.output;
    match cli.command {
        Command::Status { all_namespaces } => {
            status::run(
                client,
                (!all_namespaces).then_some(namespace.as_str()),
                output,
            )
            .await
        }
        Command::Get {
            device: Some(device),
            ..
        } => get::run(client, &namespace, &device, output).await,
        Command::Get {
            device: None,
            where_,
            selector,
        } => {
            live::run(
                client,
                &namespace,
                where_.as_deref(),
                selector.as_deref(),
                output,
            )
            .await
        }
        Command::Set {
            device,
            values,
            timeout,
            no_wait,
        } => set::run(client, &namespace, &device, &values, timeout, no_wait).await,
        Command::Rollout { action } => rollout::run(client, &namespace, action, output).await,
        Command::Tail { device, count } => tail::run(client, &namespace, &device, count).await,
    }
}
