//! `sluice topics ensure`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use pipeline::admin::topics::{self, Ensured};

use crate::settings::ServiceSettings;

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the main, retry-tier and dead-letter topics. Existing topics
    /// are compared with the settings and left unchanged; a mismatch exits
    /// with status 3.
    Ensure(EnsureArgs),
}

#[derive(Debug, Args)]
pub struct EnsureArgs {
    /// TOML settings file.
    #[arg(long, env = "SLUICE_CONFIG", hide_env_values = true)]
    config: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: TopicsCommand) -> anyhow::Result<ExitCode> {
    let TopicsCommand::Ensure(args) = command;
    let settings = ServiceSettings::load(&args.config)?;
    let specs = topics::specs(&settings.pipeline());
    let results = topics::ensure(&settings.kafka, &specs).await?;
    let mismatched = results
        .iter()
        .filter(|(_, ensured)| matches!(ensured, Ensured::Mismatch { .. }))
        .count();

    if args.json {
        let topics: Vec<_> = results
            .iter()
            .map(|(spec, ensured)| serde_json::json!({ "topic": spec, "result": ensured }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "topics": topics, "mismatched": mismatched })
        );
    } else {
        println!(
            "{:<48} {:>10} {:>11} {:>14}  result",
            "topic", "partitions", "replication", "retention_ms"
        );
        for (spec, ensured) in &results {
            let result = match ensured {
                Ensured::Created => "created".to_owned(),
                Ensured::Matches => "exists, matches".to_owned(),
                Ensured::Mismatch { differences } => {
                    format!("MISMATCH: {}", differences.join("; "))
                }
            };
            println!(
                "{:<48} {:>10} {:>11} {:>14}  {result}",
                spec.name, spec.partitions, spec.replication_factor, spec.retention_ms
            );
        }
        if mismatched > 0 {
            eprintln!(
                "{mismatched} existing topic(s) differ from the settings; sluice does not change existing topics. Change them with the Kafka tools, or change the settings to match."
            );
        }
    }
    Ok(if mismatched > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
