//! `sluice replay`: republish a range of a topic.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, ValueEnum};
use indicatif::ProgressBar;
use pipeline::recover::replay::{self, DedupeMode, End, ReplayRequest, Start};
use pipeline::recover::{format_time, parse_time};

use crate::commands::common::{confirm, parse_partitions, parse_rate, KafkaArgs, Partitions};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DedupeArg {
    /// Keep job ids: workers skip jobs that already succeeded.
    Respect,
    /// New replay generation: workers run every replayed job again.
    Bypass,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("start").required(true).args(["from_offset", "from_time"])))]
#[command(group(ArgGroup::new("end").args(["to_offset", "to_time"])))]
pub struct ReplayArgs {
    /// Topic to read.
    #[arg(long)]
    topic: String,
    /// Partitions to replay, for example 0,2 (default: all).
    #[arg(long, value_parser = parse_partitions)]
    partitions: Option<Partitions>,
    /// First offset to replay in each partition (inclusive).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    from_offset: Option<i64>,
    /// Replay from the first record at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    from_time: Option<i64>,
    /// First offset not replayed (exclusive; default: the log end now).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    to_offset: Option<i64>,
    /// Stop before the first record at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    to_time: Option<i64>,
    /// Topic to write to (default: the topic read).
    #[arg(long)]
    into: Option<String>,
    /// Whether workers skip replayed jobs that already succeeded.
    #[arg(long, value_enum, default_value_t = DedupeArg::Respect)]
    dedupe: DedupeArg,
    /// Records per second, for example 500/s (default: unthrottled).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u32>,
    /// Print what would be replayed and write nothing.
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

pub async fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    if let Some(into) = &args.into {
        pipeline::config::validate_topic_name("--into", into)?;
    }
    let target_name = args.into.as_deref().unwrap_or(&args.topic);
    if target_name.ends_with(".dlq") {
        bail!(
            "refusing to replay into the dead-letter topic {target_name}: copies there would be redriven as new dead letters; use `sluice dlq redrive` to send dead letters back, or --into another topic"
        );
    }
    if let Some(into) = &args.into {
        let (check_kafka, name) = (kafka.clone(), into.clone());
        tokio::task::spawn_blocking(move || {
            pipeline::admin::topics::partition_count(&check_kafka, &name)
        })
        .await?
        .with_context(|| format!("invalid --into {into}"))?;
    }
    let request = ReplayRequest {
        topic: args.topic.clone(),
        partitions: args.partitions.clone().map(|p| p.0),
        start: match (args.from_offset, args.from_time) {
            (Some(offset), _) => Start::Offset(offset),
            (None, Some(time)) => Start::Time(time),
            (None, None) => unreachable!("clap requires --from-offset or --from-time"),
        },
        end: match (args.to_offset, args.to_time) {
            (Some(offset), _) => End::Offset(offset),
            (None, Some(time)) => End::Time(time),
            (None, None) => End::LogEnd,
        },
        into: args.into.clone(),
        dedupe: match args.dedupe {
            DedupeArg::Respect => DedupeMode::Respect,
            DedupeArg::Bypass => DedupeMode::Bypass,
        },
        rate: args.rate,
    };

    let (plan_kafka, plan_request) = (kafka.clone(), request.clone());
    let plans =
        tokio::task::spawn_blocking(move || replay::plan(&plan_kafka, &plan_request)).await??;
    let total: i64 = plans.iter().map(|p| p.count()).sum();
    let target = request
        .into
        .clone()
        .unwrap_or_else(|| request.topic.clone());

    if args.dry_run {
        let (ends_kafka, topic, ends_plans) = (kafka.clone(), request.topic.clone(), plans.clone());
        let ends = tokio::task::spawn_blocking(move || {
            replay::range_ends(&ends_kafka, &topic, &ends_plans)
        })
        .await??;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "dry_run": true, "topic": request.topic, "target": target, "records": total, "partitions": plans, "range_ends": ends })
            );
            return Ok(ExitCode::SUCCESS);
        }
        print_plan(&request.topic, &target, &plans);
        println!(
            "{:>9}  {:>12}  {:<24}  {:>12}  {:<24}",
            "partition", "first", "first time", "last", "last time"
        );
        for end in &ends {
            let offset = |o: Option<i64>| o.map_or("-".to_owned(), |o| o.to_string());
            let time = |t: Option<i64>| t.map_or("-".to_owned(), format_time);
            println!(
                "{:>9}  {:>12}  {:<24}  {:>12}  {:<24}",
                end.partition,
                offset(end.first_offset),
                time(end.first_timestamp_ms),
                offset(end.last_offset),
                time(end.last_timestamp_ms)
            );
        }
        println!("dry run: {total} record(s) would be replayed into {target}; nothing was written");
        return Ok(ExitCode::SUCCESS);
    }

    if !args.json {
        print_plan(&request.topic, &target, &plans);
    }
    if total == 0 {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "dry_run": false, "target": target, "replayed": 0, "partitions": plans })
            );
        } else {
            println!("nothing to replay");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let question = format!(
        "Replay {total} record(s) from {} into {target}?",
        request.topic
    );
    if !confirm(&question, args.yes)? {
        eprintln!("replay canceled; nothing was written");
        return Ok(ExitCode::FAILURE);
    }

    let bar = if std::io::stderr().is_terminal() && !args.json {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    let summary = replay::execute(&kafka, &request, &plans, |done| bar.set_position(done)).await?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "dry_run": false, "summary": summary, "partitions": plans })
        );
    } else {
        println!(
            "replayed {} record(s) into {} in {:.1} s{}",
            summary.replayed,
            summary.target,
            summary.elapsed_s,
            summary
                .generation
                .as_ref()
                .map(|g| format!(" (dedupe bypass, replay generation {g})"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(topic: &str, target: &str, plans: &[replay::PartitionPlan]) {
    println!("replay {topic} -> {target}");
    println!(
        "{:>9}  {:>12}  {:>12}  {:>10}  note",
        "partition", "from (incl)", "to (excl)", "records"
    );
    for plan in plans {
        println!(
            "{:>9}  {:>12}  {:>12}  {:>10}  {}",
            plan.partition,
            plan.start,
            plan.end,
            plan.count(),
            plan.note.as_deref().unwrap_or("")
        );
    }
}
