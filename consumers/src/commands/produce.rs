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
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::config::KafkaSettings;
use pipeline::produce::ndjson::{parse_line, LineError, LineRules};
use pipeline::produce::{JobProducer, ProduceError};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::settings::ServiceSettings;

/// Records waiting for a delivery report before reading pauses.
const MAX_PENDING_DELIVERIES: usize = 100_000;
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
    let producer = JobProducer::new(&kafka)?;

    // Fail fast with a clear message instead of retrying deliveries to a
    // missing topic or an unreachable cluster until they time out.
    let (check_kafka, topic) = (kafka.clone(), args.topic.clone());
    tokio::task::spawn_blocking(move || {
        pipeline::admin::topics::partition_count(&check_kafka, &topic)
    })
    .await
    .context("topic check failed")?
    .with_context(|| format!("cannot produce to {} at {}", args.topic, kafka.brokers))?;

    let input: Box<dyn AsyncRead + Unpin + Send> = if args.input == "-" {
        Box::new(tokio::io::stdin())
    } else {
        let file = tokio::fs::File::open(&args.input)
            .await
            .with_context(|| format!("failed to open --input {:?}", args.input))?;
        Box::new(file)
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
    let outcome = produce_lines(input, &producer, &args, &rules, &mut summary, &progress).await;

    // Flush even after a failure so that everything read so far is durable
    // or counted as failed.
    let flush = producer.clone();
    tokio::task::spawn_blocking(move || flush.flush(Duration::from_secs(60)))
        .await
        .context("flush task failed")??;
    progress.finish_and_clear();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.produced as f64 / summary.elapsed_s.max(1e-9);
    print_summary(&summary, args.json);
    outcome?;
    if summary.failed > 0 {
        bail!(
            "{} record(s) were not delivered to {}; see the errors above",
            summary.failed,
            args.topic
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn produce_lines(
    input: Box<dyn AsyncRead + Unpin + Send>,
    producer: &JobProducer,
    args: &ProduceArgs,
    rules: &LineRules,
    summary: &mut Summary,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut line = Vec::with_capacity(512);
    let mut line_number = 0u64;
    let mut pending = FuturesUnordered::new();
    let mut first_error: Option<ProduceError> = None;

    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).await.with_context(|| {
            format!(
                "failed to read --input {:?} after line {line_number}",
                args.input
            )
        })?;
        if read == 0 {
            break;
        }
        line_number += 1;
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let parsed = parse_line(&args.topic, line_number, content, rules);
        let bad = match parsed {
            Ok(Some(record)) => match producer.enqueue(&record).await {
                Ok(delivery) => {
                    pending.push(delivery.wait());
                    None
                }
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
                    drain(&mut pending, summary, &mut first_error).await;
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
        if pending.len() >= MAX_PENDING_DELIVERIES {
            if let Some(result) = pending.next().await {
                count(result, summary, &mut first_error);
            }
        }
        if line_number % 1000 == 0 {
            progress.set_position(line_number);
        }
    }
    drain(&mut pending, summary, &mut first_error).await;
    if let Some(error) = first_error {
        eprintln!("first delivery error: {error}");
    }
    Ok(())
}

async fn drain<F>(
    pending: &mut FuturesUnordered<F>,
    summary: &mut Summary,
    first_error: &mut Option<ProduceError>,
) where
    F: std::future::Future<Output = Result<pipeline::produce::Delivered, ProduceError>>,
{
    while let Some(result) = pending.next().await {
        count(result, summary, first_error);
    }
}

fn count(
    result: Result<pipeline::produce::Delivered, ProduceError>,
    summary: &mut Summary,
    first_error: &mut Option<ProduceError>,
) {
    match result {
        Ok(_) => summary.produced += 1,
        Err(error) => {
            summary.failed += 1;
            first_error.get_or_insert(error);
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
