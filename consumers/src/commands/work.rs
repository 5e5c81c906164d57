//! `sluice work`: run a group member until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use pipeline::Worker;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::handlers::BuiltIn;
use crate::settings::ServiceSettings;

#[derive(Debug, Args)]
pub struct WorkArgs {
    /// TOML settings file; `SLUICE_<SECTION>__<KEY>` variables override it.
    #[arg(long, env = "SLUICE_CONFIG", hide_env_values = true)]
    config: PathBuf,
}

pub async fn run(args: WorkArgs) -> anyhow::Result<ExitCode> {
    let settings = ServiceSettings::load(&args.config)?;
    let handler = BuiltIn::from_settings(&settings.handler)?;
    let worker = Worker::new(settings.pipeline(), handler)?;

    let shutdown = CancellationToken::new();
    let server_stop = CancellationToken::new();
    crate::server::serve(
        &settings.server.listen,
        worker.metrics(),
        worker.health(),
        server_stop.clone(),
    )
    .await?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!(signal = name, "stop requested; draining");
        stop.cancel();
    });

    let summary = worker.run(shutdown).await;
    server_stop.cancel();
    let summary = summary?;
    info!(?summary, "worker stopped");
    println!("{}", serde_json::json!({ "worker_summary": summary }));
    Ok(ExitCode::SUCCESS)
}
