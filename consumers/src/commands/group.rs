//! `sluice group reset`: move a consumer group's committed offsets.

use std::process::ExitCode;

use clap::{ArgGroup, Args, Subcommand};
use pipeline::recover::group::{self, ResetTo};
use pipeline::recover::parse_time;

use crate::commands::common::{confirm, parse_partitions, KafkaArgs, Partitions};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Move the committed offsets of an idle group on one topic.
    Reset(ResetArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_offset", "to_time", "to_earliest", "to_latest"])))]
pub struct ResetArgs {
    /// Consumer group to move; it must have no active members.
    #[arg(long)]
    group: String,
    #[arg(long)]
    topic: String,
    /// Partitions to move, for example 0,2 (default: all).
    #[arg(long, value_parser = parse_partitions)]
    partitions: Option<Partitions>,
    /// New offset in each partition (clamped into the log).
    #[arg(long)]
    to_offset: Option<i64>,
    /// The first record at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    to_time: Option<i64>,
    /// The log start.
    #[arg(long)]
    to_earliest: bool,
    /// The log end.
    #[arg(long)]
    to_latest: bool,
    /// Show the current and new offsets and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
}

pub async fn run(command: GroupCommand) -> anyhow::Result<ExitCode> {
    let GroupCommand::Reset(args) = command;
    let kafka = args.kafka.settings()?;
    let to = if let Some(offset) = args.to_offset {
        ResetTo::Offset(offset)
    } else if let Some(time) = args.to_time {
        ResetTo::Time(time)
    } else if args.to_earliest {
        ResetTo::Earliest
    } else {
        ResetTo::Latest
    };

    let (check_kafka, group_id) = (kafka.clone(), args.group.clone());
    tokio::task::spawn_blocking(move || group::ensure_idle(&check_kafka, &group_id)).await??;
    let (plan_kafka, group_id, topic, partitions) = (
        kafka.clone(),
        args.group.clone(),
        args.topic.clone(),
        args.partitions.clone().map(|p| p.0),
    );
    let plans = tokio::task::spawn_blocking(move || {
        group::plan(&plan_kafka, &group_id, &topic, to, partitions.as_deref())
    })
    .await??;

    if args.json && args.dry_run {
        println!(
            "{}",
            serde_json::json!({ "group": args.group, "topic": args.topic, "dry_run": true, "partitions": plans })
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !args.json {
        println!("group {} on {}", args.group, args.topic);
        println!(
            "{:>9}  {:>12}  {:>12}  {:>12}  {:>12}",
            "partition", "log_start", "log_end", "current", "new"
        );
        for plan in &plans {
            println!(
                "{:>9}  {:>12}  {:>12}  {:>12}  {:>12}",
                plan.partition,
                plan.log_start,
                plan.log_end,
                plan.current.map_or("-".to_owned(), |c| c.to_string()),
                plan.new
            );
        }
    }
    if args.dry_run {
        println!("dry run: nothing was written");
        return Ok(ExitCode::SUCCESS);
    }
    let question = format!(
        "Move the committed offsets of group {} on {}?",
        args.group, args.topic
    );
    if !confirm(&question, args.yes)? {
        eprintln!("reset canceled; nothing was written");
        return Ok(ExitCode::FAILURE);
    }
    let (apply_kafka, group_id, topic, apply_plans) = (
        kafka.clone(),
        args.group.clone(),
        args.topic.clone(),
        plans.clone(),
    );
    tokio::task::spawn_blocking(move || {
        group::apply(&apply_kafka, &group_id, &topic, &apply_plans)
    })
    .await??;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "group": args.group, "topic": args.topic, "dry_run": false, "partitions": plans })
        );
    } else {
        println!("moved {} partition(s)", plans.len());
    }
    Ok(ExitCode::SUCCESS)
}
