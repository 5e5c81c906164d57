//! `sluice`: produce jobs, run workers, and manage topics.

mod commands;
mod handlers;
mod logging;
mod server;
mod settings;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "A job pipeline on Apache Kafka")]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Append newline-delimited JSON jobs to a topic.
    Produce(commands::produce::ProduceArgs),
    /// Join the consumer group and run jobs until SIGTERM or SIGINT.
    Work(commands::work::WorkArgs),
    /// Manage the main, retry-tier and dead-letter topics.
    #[command(subcommand)]
    Topics(commands::topics::TopicsCommand),
    /// Republish a range of a topic (from offsets or times) so workers run it again.
    Replay(commands::replay::ReplayArgs),
    /// Inspect and redrive dead letters.
    #[command(subcommand)]
    Dlq(commands::dlq::DlqCommand),
    /// Move a consumer group's committed offsets.
    #[command(subcommand)]
    Group(commands::group::GroupCommand),
    /// Show offsets, lag and dead letters of the configured group.
    Status(commands::status::StatusArgs),
    /// Exit 0 when a health URL answers 2xx (for container health checks).
    Probe(commands::probe::ProbeArgs),
    /// Check a settings file.
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
}

/// Joins an error and its causes with ": ", leaving out a cause whose text
/// the message before it already contains.
fn cause_chain(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // TLS to Redis (`rediss://`) uses rustls, which needs one crypto
    // provider per process. An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = match logging::init(cli.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {}", cause_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Produce(args) => commands::produce::run(args).await,
            Command::Work(args) => commands::work::run(args).await,
            Command::Topics(command) => commands::topics::run(command).await,
            Command::Status(args) => commands::status::run(args).await,
            Command::Probe(args) => commands::probe::run(args).await,
            Command::Replay(args) => commands::replay::run(args).await,
            Command::Dlq(command) => commands::dlq::run(command).await,
            Command::Group(command) => commands::group::run(command).await,
            Command::Config(command) => commands::config::run(command),
        }
    });
    // Flush traces before the runtime, which the exporter does not need, goes.
    drop(telemetry);
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", cause_chain(&error));
            ExitCode::FAILURE
        }
    }
}
