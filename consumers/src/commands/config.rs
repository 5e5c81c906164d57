//! `sluice config check`: validate a settings file without connecting.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::settings::ServiceSettings;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate a settings file with its SLUICE_ overrides, let
    /// librdkafka check kafka.properties, then print the derived topics.
    /// Secrets are not printed.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// TOML settings file.
    #[arg(long, env = "SLUICE_CONFIG", hide_env_values = true)]
    config: PathBuf,
}

pub fn run(command: ConfigCommand) -> anyhow::Result<ExitCode> {
    let ConfigCommand::Check(args) = command;
    let settings = ServiceSettings::load(&args.config)?;
    pipeline::kafka::check_client_properties(&settings.kafka, &settings.worker.group_id)?;
    let pipeline = settings.pipeline();
    println!("{}: valid", args.config.display());
    println!("  group:   {}", settings.worker.group_id);
    println!("  brokers: {}", settings.kafka.brokers);
    for spec in pipeline::admin::topics::specs(&pipeline) {
        println!("  topic:   {} ({} partitions)", spec.name, spec.partitions);
    }
    Ok(ExitCode::SUCCESS)
}
