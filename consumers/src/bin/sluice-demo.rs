//! `make demo`: the main job on real input, reconciled end to end.
//!
//! Starts a flaky webhook receiver, ensures fresh topics, and starts workers
//! (the real `sluice work` binary) in one group. Then it produces the input
//! with `sluice produce`, waits until the main and tier topics are drained,
//! and stops the workers with SIGTERM. Last, it reconciles the job ids of
//! the input with what the receiver and the dead-letter topic contain.
//!
//! The receiver decides by a hash of the `Idempotency-Key`, so the same job
//! gets the same treatment on every attempt:
//! - 5 % answer 503 on the first attempt only (they succeed on a retry tier),
//! - 2 % answer 503 on every attempt (they exhaust the tiers and dead-letter),
//! - 0.5 % answer 400 (permanent: straight to the dead-letter topic),
//! - the rest answer 204.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::Parser;
use pipeline::admin::offsets::group_offsets;
use pipeline::admin::read::read_topic;
use pipeline::config::KafkaSettings;
use pipeline::envelope::{headers, SluiceHeaders};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// Shares of job ids, in thousandths, that the receiver fails.
const FIRST_ATTEMPT_503_PER_MILLE: u64 = 50;
const ALWAYS_503_PER_MILLE: u64 = 20;
const ALWAYS_400_PER_MILLE: u64 = 5;

#[derive(Debug, Parser)]
#[command(about = "Run the sluice demo and reconcile the result")]
struct Args {
    /// NDJSON input with an `id` and a `repo` field per line.
    #[arg(long, required_unless_present = "receive_only")]
    input: Option<PathBuf>,
    /// Only run the webhook receiver on this address (as the docker-compose
    /// demo does), logging its counts every 10 seconds.
    #[arg(long, value_name = "ADDR")]
    receive_only: Option<String>,
    /// Demo settings file.
    #[arg(long, default_value = "deploy/demo/demo.toml")]
    config: PathBuf,
    /// The `sluice` binary to run.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Workers started in one group.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Folder for worker logs.
    #[arg(long, default_value = "target/demo")]
    log_dir: PathBuf,
    /// Maximum wait for the topics to drain, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Succeed,
    FailFirstAttempt,
    FailAlways,
    Reject,
}

/// FNV-1a, stable across runs and platforms.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fate(job_id: &str) -> Fate {
    let bucket = fnv1a(job_id) % 1000;
    if bucket < FIRST_ATTEMPT_503_PER_MILLE {
        Fate::FailFirstAttempt
    } else if bucket < FIRST_ATTEMPT_503_PER_MILLE + ALWAYS_503_PER_MILLE {
        Fate::FailAlways
    } else if bucket < FIRST_ATTEMPT_503_PER_MILLE + ALWAYS_503_PER_MILLE + ALWAYS_400_PER_MILLE {
        Fate::Reject
    } else {
        Fate::Succeed
    }
}

#[derive(Default)]
struct Receiver {
    /// Successful deliveries per `Idempotency-Key`.
    delivered: HashMap<String, u32>,
    requests: u64,
    answered_503: u64,
    answered_400: u64,
    last_request: Option<Instant>,
}

type Shared = Arc<Mutex<Receiver>>;

async fn hook(State(receiver): State<Shared>, request_headers: HeaderMap) -> StatusCode {
    let Some(key) = request_headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return StatusCode::BAD_REQUEST;
    };
    let attempt: u32 = request_headers
        .get("sluice-attempt")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let status = match fate(&key) {
        Fate::Succeed => StatusCode::NO_CONTENT,
        Fate::FailFirstAttempt if attempt > 1 => StatusCode::NO_CONTENT,
        Fate::FailFirstAttempt | Fate::FailAlways => StatusCode::SERVICE_UNAVAILABLE,
        Fate::Reject => StatusCode::BAD_REQUEST,
    };
    let mut state = receiver.lock().unwrap_or_else(|p| p.into_inner());
    state.requests += 1;
    state.last_request = Some(Instant::now());
    match status {
        StatusCode::SERVICE_UNAVAILABLE => state.answered_503 += 1,
        StatusCode::BAD_REQUEST => state.answered_400 += 1,
        _ => *state.delivered.entry(key).or_default() += 1,
    }
    status
}

fn input_job_ids(path: &Path) -> anyhow::Result<Vec<String>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("failed to open --input {}", path.display()))?;
    let mut ids = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line
            .with_context(|| format!("failed to read line {} of {}", index + 1, path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("line {} of {} is not JSON", index + 1, path.display()))?;
        let id = pipeline::envelope::json_scalar_to_string(&value["id"])
            .with_context(|| format!("line {} of {} has no id field", index + 1, path.display()))?;
        ids.push(id);
    }
    Ok(ids)
}

struct Run {
    sluice: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Run {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.sluice);
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        command
    }

    fn config(&self) -> &str {
        self.config.to_str().unwrap_or("deploy/demo/demo.toml")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(address) = &args.receive_only {
        return receive_only(address).await;
    }
    let Some(input) = args.input.clone() else {
        bail!("--input is required unless --receive-only is given");
    };
    if !args.sluice.exists() {
        bail!(
            "{} not found; build it with `cargo build --release`",
            args.sluice.display()
        );
    }
    let ids = input_job_ids(&input)?;
    let unique: HashSet<&str> = ids.iter().map(String::as_str).collect();
    println!(
        "input: {} ({} jobs, {} distinct job ids)",
        input.display(),
        ids.len(),
        unique.len()
    );

    // The receiver, on a free port.
    let receiver: Shared = Arc::default();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let topic = format!("sluice-demo-{stamp}");
    let group = format!("sluice-demo-{stamp}");
    let run = Run {
        sluice: args.sluice.clone(),
        config: args.config.clone(),
        env: vec![
            ("SLUICE_TOPIC__NAME".into(), topic.clone()),
            ("SLUICE_WORKER__GROUP_ID".into(), group.clone()),
            ("SLUICE_HANDLER__URL".into(), url.clone()),
            // Workers share this machine, so each takes a free port for
            // its metrics and health endpoints.
            ("SLUICE_SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ],
    };
    println!("run: topic {topic}, group {group}, receiver {url}");
    println!(
        "receiver: 503 on the first attempt for {:.1} %, 503 always for {:.1} %, 400 for {:.1} % of job ids",
        FIRST_ATTEMPT_503_PER_MILLE as f64 / 10.0,
        ALWAYS_503_PER_MILLE as f64 / 10.0,
        ALWAYS_400_PER_MILLE as f64 / 10.0
    );
    println!(
        "tiers: shortened to seconds by {} (production defaults: retry-30s, retry-5m)",
        args.config.display()
    );

    let status = run
        .command(&["topics", "ensure", "--config", run.config()])
        .status()
        .await?;
    if !status.success() {
        bail!("sluice topics ensure failed with {status}");
    }

    // Workers, logging to files.
    std::fs::create_dir_all(args.log_dir.join(&topic))?;
    let mut workers = Vec::new();
    for index in 0..args.workers {
        let log = std::fs::File::create(
            args.log_dir
                .join(&topic)
                .join(format!("worker-{index}.log")),
        )?;
        let child = run
            .command(&["work", "--config", run.config()])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("failed to start sluice work")?;
        workers.push(child);
    }
    println!(
        "workers: {} started, logs in {}",
        args.workers,
        args.log_dir.join(&topic).display()
    );

    let started = Instant::now();
    let input = input.to_str().context("--input must be valid UTF-8")?;
    let output = run
        .command(&[
            "produce",
            "--topic",
            &topic,
            "--input",
            input,
            "--key-field",
            "/repo",
            "--id-field",
            "/id",
            "--json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .await?;
    if !output.status.success() {
        bail!("sluice produce failed with {}", output.status);
    }
    let produce: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("sluice produce printed no JSON summary")?;
    let produced = produce["produced"].as_u64().unwrap_or(0);
    println!(
        "produced: {produced} jobs in {:.1} s",
        produce["elapsed_s"].as_f64().unwrap_or(0.0)
    );

    let settings: pipeline::config::PipelineSettings = {
        let text = std::fs::read_to_string(&args.config)?;
        let value: toml::Value = toml::from_str(&text)?;
        let mut settings: pipeline::config::PipelineSettings = serde_json::from_value(json!({
            "kafka": value.get("kafka"),
            "topic": value.get("topic"),
            "retry": value.get("retry"),
            "worker": value.get("worker"),
        }))?;
        settings.topic.name = topic.clone();
        settings
    };
    let kafka = settings.kafka.clone();
    let mut topics = vec![topic.clone()];
    topics.extend(
        settings
            .retry
            .tiers
            .iter()
            .map(|t| settings.topic.tier_topic(t)),
    );

    wait_for_drain(&kafka, &group, &topics, Duration::from_secs(args.timeout_s)).await?;
    let elapsed = started.elapsed();
    println!("drained after {:.1} s", elapsed.as_secs_f64());

    let summaries = stop_workers(workers).await?;

    // Reconcile from what the receiver and the dead-letter topic hold.
    let dlq_topic = settings.topic.dlq_topic();
    let dlq_kafka = kafka.clone();
    let dlq_name = dlq_topic.clone();
    let dead_letters =
        tokio::task::spawn_blocking(move || read_topic(&dlq_kafka, &dlq_name)).await??;
    let mut dlq_ids = HashSet::new();
    let mut dlq_classes: HashMap<String, u64> = HashMap::new();
    for record in &dead_letters {
        let sluice = SluiceHeaders::decode(&record.headers)?;
        *dlq_classes
            .entry(sluice.error_class.unwrap_or_default())
            .or_default() += 1;
        if let Some(id) = sluice.job_id {
            dlq_ids.insert(id);
        }
    }
    let mut retried = Vec::new();
    for tier in &settings.retry.tiers {
        let name = settings.topic.tier_topic(tier);
        let offsets = {
            let kafka = kafka.clone();
            let group = group.clone();
            let name = name.clone();
            tokio::task::spawn_blocking(move || group_offsets(&kafka, &group, &name)).await??
        };
        retried.push((
            tier.name.clone(),
            offsets.iter().map(|p| p.log_end - p.log_start).sum::<i64>(),
        ));
    }

    let state = receiver.lock().unwrap_or_else(|p| p.into_inner());
    let delivered = state.delivered.len() as u64;
    let receiver_duplicates: u64 = state
        .delivered
        .values()
        .map(|n| u64::from(n.saturating_sub(1)))
        .sum();
    let lost = unique
        .iter()
        .filter(|id| !state.delivered.contains_key(**id) && !dlq_ids.contains(**id))
        .count() as u64;
    let both = dlq_ids
        .iter()
        .filter(|id| state.delivered.contains_key(*id))
        .count();
    let dedupe_skipped: u64 = summaries
        .iter()
        .map(|s| s["dedupe_skipped"].as_u64().unwrap_or(0))
        .sum();
    let retried_total: i64 = retried.iter().map(|(_, n)| n).sum();
    let jobs_per_s = produced as f64 / elapsed.as_secs_f64();

    println!();
    println!(
        "reconciliation ({} header schema v{})",
        headers::PREFIX,
        headers::SCHEMA_VERSION
    );
    println!("  produced              {produced:>8}");
    println!("  delivered             {delivered:>8}   distinct job ids the receiver answered 2xx");
    for (tier, count) in &retried {
        println!("  retried {tier:<13} {count:>8}");
    }
    println!(
        "  dead-lettered         {:>8}   {:?}",
        dlq_ids.len(),
        dlq_classes
    );
    println!(
        "  dedupe skipped        {dedupe_skipped:>8}   done markers that stopped a repeat run"
    );
    println!("  receiver duplicates   {receiver_duplicates:>8}   2xx deliveries beyond the first per job id");
    println!("  delivered and dead    {both:>8}");
    println!("  lost                  {lost:>8}");
    println!(
        "  receiver requests     {:>8}   ({} answered 503, {} answered 400)",
        state.requests, state.answered_503, state.answered_400
    );
    println!("  elapsed               {:>8.1} s", elapsed.as_secs_f64());
    println!(
        "  throughput            {jobs_per_s:>8.0} jobs/s (produce start to drained, {} workers)",
        args.workers
    );
    println!(
        "{}",
        json!({
            "produced": produced,
            "delivered": delivered,
            "retried": retried.iter().map(|(t, n)| (t.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "retried_total": retried_total,
            "dead_lettered": dlq_ids.len(),
            "dedupe_skipped": dedupe_skipped,
            "receiver_duplicates": receiver_duplicates,
            "lost": lost,
            "elapsed_s": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
            "jobs_per_s": jobs_per_s.round(),
        })
    );
    if lost > 0 || delivered + dlq_ids.len() as u64 != unique.len() as u64 {
        bail!("reconciliation failed: {lost} job(s) lost");
    }
    Ok(())
}

/// Serves the receiver alone and logs its counts until stopped.
async fn receive_only(address: &str) -> anyhow::Result<()> {
    let receiver: Shared = Arc::default();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to listen on --receive-only {address:?}"))?;
    println!("receiver listening on {}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    loop {
        ticker.tick().await;
        let state = receiver.lock().unwrap_or_else(|p| p.into_inner());
        let duplicates: u64 = state
            .delivered
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum();
        println!(
            "{}",
            json!({
                "requests": state.requests,
                "delivered": state.delivered.len(),
                "answered_503": state.answered_503,
                "answered_400": state.answered_400,
                "receiver_duplicates": duplicates,
            })
        );
    }
}

/// Waits until the group's committed offsets reach the log end on every
/// partition of `topics`, twice in a row. A retry copy appears on its tier
/// topic before the source offset commits, so zero lag everywhere means
/// that nothing is in flight.
async fn wait_for_drain(
    kafka: &KafkaSettings,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut zero_rounds = 0;
    let mut last_report = Instant::now();
    loop {
        let mut lag = 0;
        for topic in topics {
            let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.clone());
            let offsets =
                tokio::task::spawn_blocking(move || group_offsets(&kafka, &group, &topic))
                    .await??;
            lag += offsets.iter().map(|p| p.lag()).sum::<i64>();
        }
        zero_rounds = if lag == 0 { zero_rounds + 1 } else { 0 };
        if zero_rounds >= 2 {
            return Ok(());
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            println!("  waiting: lag {lag} across {} topics", topics.len());
            last_report = Instant::now();
        }
        if Instant::now() >= deadline {
            bail!(
                "topics did not drain within {} s; lag is still {lag}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends SIGTERM to each worker and collects the summary it prints.
async fn stop_workers(workers: Vec<Child>) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut summaries = Vec::new();
    for mut worker in workers {
        if let Some(pid) = worker.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let stdout = worker
            .stdout
            .take()
            .context("worker stdout was not captured")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let status = tokio::time::timeout(Duration::from_secs(60), worker.wait())
            .await
            .context("a worker did not stop within 60 s of SIGTERM")??;
        while let Some(line) = lines.next_line().await? {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(summary) = value.get("worker_summary") {
                    summaries.push(summary.clone());
                }
            }
        }
        println!("worker stopped: {status}");
    }
    Ok(summaries)
}
