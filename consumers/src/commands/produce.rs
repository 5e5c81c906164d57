//! `sluice produce`: append newline-delimited JSON jobs to a topic.
//!
//! Every delivery report is checked and the producer is flushed before the
//! command exits, so a zero exit status means every record is durable.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::config::KafkaSettings;
use pipeline::produce::bulk::BulkProducer;
use pipeline::produce::ndjson::{parse_line, LineError, LineRules};
use serde::Serialize;
use std::io::{BufRead, BufReader};

use crate::settings::ServiceSettings;

/// Bad lines listed by number in the summary.
const MAX_BAD_LINES_LISTED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnBadLine {
    /// Stop at the first bad line and exit with status 1.
    Fail,
    /// Report the bad line on stderr, count it, and go on.
    Skip,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to append to.
    #[arg(long)]
    topic: String,
    /// Input file with one JSON object per line, or `-` for stdin.
    #[arg(long)]
    input: String,
    /// JSON pointer to the partition key in each line, for example `/repo`.
    #[arg(long)]
    key_field: Option<String>,
    /// JSON pointer to the job id in each line, for example `/id`.
    #[arg(long)]
    id_field: Option<String>,
    /// Bootstrap servers; overrides `kafka.brokers` of --config.
    #[arg(long, env = "SLUICE_KAFKA__BROKERS", hide_env_values = true)]
    brokers: Option<String>,
    /// Settings file to take the Kafka section from (brokers, SASL, TLS).
    #[arg(long)]
    config: Option<PathBuf>,
    /// What to do with a line that is not JSON or lacks a field.
    #[arg(long, value_enum, default_value_t = OnBadLine::Fail)]
    on_bad_line: OnBadLine,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    topic: String,
    produced: u64,
    failed: u64,
    skipped_lines: u64,
    /// Empty or whitespace-only lines, which carry no job.
    blank_lines: u64,
    bad_lines: Vec<u64>,
    elapsed_s: f64,
    records_per_s: f64,
}

fn check_pointer(flag: &str, pointer: &Option<String>) -> anyhow::Result<()> {
    if let Some(pointer) = pointer {
        if !pointer.starts_with('/') {
            bail!("invalid {flag} {pointer:?}: must be a JSON pointer such as \"/{pointer}\"");
        }
    }
    Ok(())
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    check_pointer("--key-field", &args.key_field)?;
    check_pointer("--id-field", &args.id_field)?;
    pipeline::config::validate_topic_name("--topic", &args.topic)?;
    let mut kafka = match &args.config {
        Some(path) => ServiceSettings::load(path)?.kafka,
        None => KafkaSettings::default(),
    };
    if let Some(brokers) = &args.brokers {
        kafka.brokers = brokers.clone();
    }

    // Fail fast with a clear message instead of retrying deliveries to a
    // missing topic or an unreachable cluster until they time out.
    let (check_kafka, topic) = (kafka.clone(), args.topic.clone());
    tokio::task::spawn_blocking(move || {
        pipeline::admin::topics::partition_count(&check_kafka, &topic)
    })
    .await
    .context("topic check failed")?
    .with_context(|| format!("cannot produce to {} at {}", args.topic, kafka.brokers))?;

    // Reading and sending block, so they run on a blocking thread.
    let json = args.json;
    let topic = args.topic.clone();
    let (summary, outcome) = tokio::task::spawn_blocking(move || produce_blocking(&args, &kafka))
        .await
        .context("the produce task failed")??;
    print_summary(&summary, json);
    outcome?;
    if summary.failed > 0 {
        bail!(
            "{} record(s) were not delivered to {topic}; see the errors above",
            summary.failed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads, sends and flushes. Returns the summary, and separately the error
/// that stopped reading, so the summary is printed either way.
fn produce_blocking(
    args: &ProduceArgs,
    kafka: &KafkaSettings,
) -> anyhow::Result<(Summary, anyhow::Result<()>)> {
    let producer = BulkProducer::new(kafka)?;
    let input: Box<dyn BufRead> = if args.input == "-" {
        Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()))
    } else {
        let file = std::fs::File::open(&args.input)
            .with_context(|| format!("failed to open --input {:?}", args.input))?;
        Box::new(BufReader::with_capacity(1 << 20, file))
    };
    let rules = LineRules {
        key_field: args.key_field.clone(),
        id_field: args.id_field.clone(),
    };
    let progress = progress_bar();
    let started = Instant::now();
    let mut summary = Summary {
        topic: args.topic.clone(),
        ..Summary::default()
    };
    let outcome = send_lines(input, &producer, args, &rules, &mut summary, &progress);

    // Flush even after a failure so that everything read so far is durable
    // or counted as failed.
    let totals = producer.flush(Duration::from_secs(60))?;
    progress.finish_and_clear();
    summary.produced = totals.delivered;
    summary.failed = totals.failed;
    if let Some((line, error)) = totals.first_failure {
        eprintln!("line {line}: delivery failed: {error}");
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.produced as f64 / summary.elapsed_s.max(1e-9);
    Ok((summary, outcome))
}

fn send_lines(
    mut input: Box<dyn BufRead>,
    producer: &BulkProducer,
    args: &ProduceArgs,
    rules: &LineRules,
    summary: &mut Summary,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let mut line = Vec::with_capacity(512);
    let mut line_number = 0u64;
    loop {
        line.clear();
        let read = input.read_until(b'\n', &mut line).with_context(|| {
            format!(
                "failed to read --input {:?} after line {line_number}",
                args.input
            )
        })?;
        if read == 0 {
            return Ok(());
        }
        line_number += 1;
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let bad = match parse_line(&args.topic, line_number, content, rules) {
            Ok(Some(record)) => match producer.send(&record, line_number) {
                Ok(()) => None,
                Err(error) if !error.is_retryable() => Some(LineError {
                    line: line_number,
                    reason: format!(
                        "rejected by the producer ({error}); a record must fit in message.max.bytes (1000000 unless --config raises it)"
                    ),
                }),
                Err(error) => return Err(error.into()),
            },
            Ok(None) => {
                summary.blank_lines += 1;
                None
            }
            Err(error) => Some(error),
        };
        if let Some(error) = bad {
            match args.on_bad_line {
                OnBadLine::Fail => {
                    bail!("{error}; fix the line or pass --on-bad-line skip to skip bad lines");
                }
                OnBadLine::Skip => {
                    progress.suspend(|| eprintln!("skipped {error}"));
                    summary.skipped_lines += 1;
                    if summary.bad_lines.len() < MAX_BAD_LINES_LISTED {
                        summary.bad_lines.push(line_number);
                    }
                }
            }
        }
        if line_number % 1000 == 0 {
            progress.set_position(line_number);
        }
    }
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos} lines read, {per_sec}, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn print_summary(summary: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(summary).unwrap_or_default());
        return;
    }
    println!(
        "produced {} record(s) to {} in {:.2} s ({:.0} records/s); {} failed, {} bad line(s) skipped, {} blank line(s)",
        summary.produced,
        summary.topic,
        summary.elapsed_s,
        summary.records_per_s,
        summary.failed,
        summary.skipped_lines,
        summary.blank_lines
    );
}
