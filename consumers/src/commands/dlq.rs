//! `sluice dlq`: inspect and redrive dead letters.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use pipeline::recover::dead_letters::{self, DeadLetter, Filter};
use pipeline::recover::{format_time, parse_time};

use crate::commands::common::{confirm, parse_rate, KafkaArgs};

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with job id, key, attempt, error and origin.
    List(ListArgs),
    /// Print one dead letter with its payload.
    Show(ShowArgs),
    /// Republish dead letters to the main topic as fresh attempts.
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only dead letters written at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Only dead letters of this error class, for example http_5xx.
    #[arg(long)]
    error_class: Option<String>,
    /// Only the dead letters of this job id.
    #[arg(long)]
    job_id: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            since_ms: self.since,
            error_class: self.error_class.clone(),
            job_id: self.job_id.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Main topic or its dead-letter topic (`<topic>.dlq`).
    #[arg(long)]
    topic: String,
    #[command(flatten)]
    filter: FilterArgs,
    /// Show at most this many.
    #[arg(long)]
    limit: Option<usize>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Main topic or its dead-letter topic (`<topic>.dlq`).
    #[arg(long)]
    topic: String,
    /// Position of the dead letter as PARTITION@OFFSET, as `dlq list` shows it.
    #[arg(long)]
    at: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// Main topic or its dead-letter topic (`<topic>.dlq`).
    #[arg(long)]
    topic: String,
    #[command(flatten)]
    filter: FilterArgs,
    /// Records per second, for example 100/s (default: unthrottled).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u32>,
    /// Count what would be redriven and write nothing.
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

pub async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Show(args) => show(args).await,
        DlqCommand::Redrive(args) => redrive(args).await,
    }
}

fn json_of(letter: &DeadLetter, with_payload: bool) -> serde_json::Value {
    let mut value = serde_json::to_value(letter).unwrap_or_default();
    value["time"] = letter.time().into();
    if with_payload {
        value["payload"] = letter.payload_text().into();
    }
    value
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let topic = dead_letters::dlq_topic(&args.topic);
    let filter = args.filter.filter();
    let (read_topic, limit) = (topic.clone(), args.limit);
    let letters = tokio::task::spawn_blocking(move || {
        dead_letters::list(&kafka, &read_topic, &filter, limit)
    })
    .await??;
    if args.json {
        for letter in &letters {
            println!("{}", json_of(letter, false));
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<24} {:<22} {:<16} {:>7} {:>8} {:<14} {:<28} error",
        "at", "time", "job id", "key", "attempt", "redrives", "class", "origin"
    );
    for letter in &letters {
        let message = letter.error_message.as_deref().unwrap_or("");
        println!(
            "{:<10} {:<24} {:<22} {:<16} {:>7} {:>8} {:<14} {:<28} {}",
            format!("{}@{}", letter.partition, letter.offset),
            letter.time(),
            letter.job_id.as_deref().unwrap_or("-"),
            letter.key.as_deref().unwrap_or("-"),
            letter.attempt.map_or("-".to_owned(), |a| a.to_string()),
            letter.redrive_count,
            letter.error_class.as_deref().unwrap_or("-"),
            letter.origin.as_deref().unwrap_or("-"),
            pipeline::envelope::headers::truncate(message, 120)
        );
    }
    println!("{} dead letter(s) in {topic}", letters.len());
    Ok(ExitCode::SUCCESS)
}

fn parse_at(text: &str) -> anyhow::Result<(i32, i64)> {
    let (partition, offset) = text
        .split_once('@')
        .with_context(|| format!("invalid --at {text:?}: use PARTITION@OFFSET such as 2@1045"))?;
    let invalid = || {
        format!(
            "invalid --at {text:?}: use PARTITION@OFFSET with non-negative numbers such as 2@1045"
        )
    };
    let partition: i32 = partition
        .parse()
        .ok()
        .filter(|p| *p >= 0)
        .with_context(invalid)?;
    let offset: i64 = offset
        .parse()
        .ok()
        .filter(|o| *o >= 0)
        .with_context(invalid)?;
    Ok((partition, offset))
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let topic = dead_letters::dlq_topic(&args.topic);
    let (partition, offset) = parse_at(&args.at)?;
    let read_topic = topic.clone();
    let letter = tokio::task::spawn_blocking(move || {
        dead_letters::show(&kafka, &read_topic, partition, offset)
    })
    .await??;
    let Some(letter) = letter else {
        bail!("no dead letter at {partition}@{offset} in {topic} (past the log end, or deleted by retention); list them with `sluice dlq list --topic {topic}`");
    };
    if args.json {
        println!("{}", json_of(&letter, true));
        return Ok(ExitCode::SUCCESS);
    }
    let field = |name: &str, value: Option<String>| {
        println!("{name:<16} {}", value.unwrap_or_else(|| "-".to_owned()))
    };
    field("position", Some(format!("{topic}/{partition}@{offset}")));
    field("time", Some(letter.time()));
    field("job id", letter.job_id.clone());
    field("key", letter.key.clone());
    field("attempt", letter.attempt.map(|a| a.to_string()));
    field("error class", letter.error_class.clone());
    field("error", letter.error_message.clone());
    field("origin", letter.origin.clone());
    field("origin time", letter.origin_timestamp_ms.map(format_time));
    field("redrives", Some(letter.redrive_count.to_string()));
    field("replayed from", letter.replay_source.clone());
    for (name, value) in &letter.record.headers {
        if !name.starts_with(pipeline::envelope::headers::PREFIX) {
            field(
                &format!("header {name}"),
                value
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
            );
        }
    }
    println!("payload:");
    println!(
        "{}",
        letter.payload_text().unwrap_or_else(|| "(null)".to_owned())
    );
    Ok(ExitCode::SUCCESS)
}

async fn redrive(args: RedriveArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let topic = dead_letters::dlq_topic(&args.topic);
    let filter = args.filter.filter();

    // Count first, so the operator confirms a number.
    let mut preview = dead_letters::redrive(&kafka, &topic, &filter, None, true).await?;
    if args.dry_run || preview.redriven == 0 {
        preview.dry_run = args.dry_run;
        print_summary(&preview, args.json);
        return Ok(ExitCode::SUCCESS);
    }
    let question = format!(
        "Redrive {} dead letter(s) from {topic} to the main topic?",
        preview.redriven
    );
    if !args.json {
        print_summary(&preview, false);
    }
    if !confirm(&question, args.yes)? {
        eprintln!("redrive canceled; nothing was written");
        return Ok(ExitCode::FAILURE);
    }
    let summary = dead_letters::redrive(&kafka, &topic, &filter, args.rate, false).await?;
    print_summary(&summary, args.json);
    Ok(ExitCode::SUCCESS)
}

fn print_summary(summary: &dead_letters::RedriveSummary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(summary).unwrap_or_default());
        return;
    }
    let verb = if summary.dry_run {
        "would redrive"
    } else {
        "redrove"
    };
    println!(
        "{verb} {} of {} dead letter(s) past the cursor of {} ({} already redriven, {} not matching the filters) in {:.1} s",
        summary.redriven,
        summary.examined,
        summary.dlq_topic,
        summary.already_redriven,
        summary.not_matched,
        summary.elapsed_s
    );
}
