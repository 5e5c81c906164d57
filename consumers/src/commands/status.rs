//! `sluice status`: offsets, lag and dead letters of the configured group.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pipeline::admin::offsets::{group_offsets, PartitionOffsets};
use serde::Serialize;

use crate::settings::ServiceSettings;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// TOML settings file.
    #[arg(long, env = "SLUICE_CONFIG", hide_env_values = true)]
    config: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct TopicStatus {
    topic: String,
    /// `main`, a tier name, or `dlq`.
    role: String,
    partitions: Vec<PartitionStatus>,
    /// Sum over partitions; absent for the dead-letter topic, which the
    /// group does not consume.
    lag: Option<i64>,
    /// Records in the dead-letter topic (log end minus log start).
    dead_letters: Option<i64>,
}

#[derive(Debug, Serialize)]
struct PartitionStatus {
    partition: i32,
    log_start: i64,
    log_end: i64,
    committed: Option<i64>,
    lag: Option<i64>,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let settings = ServiceSettings::load(&args.config)?;
    let group = settings.worker.group_id.clone();
    let mut topics = vec![(settings.topic.name.clone(), "main".to_owned())];
    for tier in &settings.retry.tiers {
        topics.push((settings.topic.tier_topic(tier), tier.name.clone()));
    }
    topics.push((settings.topic.dlq_topic(), "dlq".to_owned()));

    let mut report = Vec::new();
    for (topic, role) in topics {
        let (kafka, group_id, name) = (settings.kafka.clone(), group.clone(), topic.clone());
        let offsets =
            tokio::task::spawn_blocking(move || group_offsets(&kafka, &group_id, &name)).await??;
        report.push(topic_status(topic, role, &offsets));
    }

    if args.json {
        println!(
            "{}",
            serde_json::json!({ "group": group, "topics": report })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("group {group}");
    println!(
        "{:<44} {:>9} {:>9} {:>12} {:>12} {:>10} {:>12}",
        "topic", "role", "partition", "log_end", "committed", "lag", "dead_letters"
    );
    for topic in &report {
        let lag = topic.lag.map_or("-".to_owned(), |l| l.to_string());
        let dead = topic.dead_letters.map_or("-".to_owned(), |d| d.to_string());
        let end: i64 = topic.partitions.iter().map(|p| p.log_end).sum();
        let committed: i64 = topic.partitions.iter().filter_map(|p| p.committed).sum();
        println!(
            "{:<44} {:>9} {:>9} {:>12} {:>12} {:>10} {:>12}",
            topic.topic,
            topic.role,
            format!("{} total", topic.partitions.len()),
            end,
            committed,
            lag,
            dead
        );
        for p in &topic.partitions {
            println!(
                "{:<44} {:>9} {:>9} {:>12} {:>12} {:>10} {:>12}",
                "",
                "",
                p.partition,
                p.log_end,
                p.committed.map_or("-".to_owned(), |c| c.to_string()),
                p.lag.map_or("-".to_owned(), |l| l.to_string()),
                ""
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn topic_status(topic: String, role: String, offsets: &[PartitionOffsets]) -> TopicStatus {
    let is_dlq = role == "dlq";
    let partitions: Vec<PartitionStatus> = offsets
        .iter()
        .map(|p| PartitionStatus {
            partition: p.partition,
            log_start: p.log_start,
            log_end: p.log_end,
            committed: p.committed,
            lag: (!is_dlq).then(|| p.lag()),
        })
        .collect();
    let lag = (!is_dlq).then(|| partitions.iter().filter_map(|p| p.lag).sum());
    let dead_letters = is_dlq.then(|| offsets.iter().map(|p| p.log_end - p.log_start).sum());
    TopicStatus {
        topic,
        role,
        partitions,
        lag,
        dead_letters,
    }
}
