//! `make bench`: sluice against the plainest rdkafka programs on the same
//! broker, Redis and input, in one run.
//!
//! Every scenario runs on fresh topics and groups, three times by default;
//! the summary records the median, minimum and maximum of each figure with
//! the machine and the versions, in `target/bench/summary.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use pipeline::admin::offsets::group_offsets;
use pipeline::admin::topics::{self, TopicSpec};
use pipeline::config::{
    DedupeSettings, KafkaSettings, PayloadFormat, PipelineSettings, RetrySettings, TierSettings,
    TopicSettings, WorkerSettings,
};
use pipeline::envelope::headers;
use pipeline::produce::bulk::BulkProducer;
use pipeline::produce::{JobProducer, OutgoingRecord};
use pipeline::{Handler, HandlerError, Job, Worker};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// `worker.max_in_flight` of every worker in the benchmark.
const BENCH_IN_FLIGHT: usize = 256;

#[derive(Debug, Parser)]
#[command(about = "Benchmark sluice against raw rdkafka producers and consumers")]
struct Args {
    /// NDJSON input with `id` and `repo` fields; a generated stand-in of the
    /// same shape when the file is missing.
    #[arg(
        long,
        default_value = "../shared/data/gharchive-min-2019-09-26-h00/events.ndjson"
    )]
    input: PathBuf,
    /// Jobs per throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: usize,
    /// Jobs of the memory run.
    #[arg(long, default_value_t = 5_000_000)]
    rss_jobs: usize,
    /// Repetitions of each scenario.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// The `sluice` binary for the memory run.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    #[arg(long, default_value = "target/bench/summary.json")]
    out: PathBuf,
}

/// The input lines, repeated with rewritten ids.
struct Input {
    lines: Vec<(String, String, String)>,
}

impl Input {
    fn load(path: &Path) -> anyhow::Result<(Input, String)> {
        let mut lines = Vec::new();
        let source = match std::fs::read_to_string(path) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let value: Value = serde_json::from_str(line)?;
                    let id = value["id"].as_str().context("line without id")?.to_owned();
                    let repo = value["repo"]
                        .as_str()
                        .context("line without repo")?
                        .to_owned();
                    lines.push((id, repo, line.to_owned()));
                }
                format!("{} ({} lines)", path.display(), lines.len())
            }
            Err(_) => {
                for n in 0..62_952u64 {
                    let id = (10_497_107_027 + n).to_string();
                    let repo = format!("owner{}/repo{}", n % 24_975, n % 7);
                    let line = json!({"id": id, "dt": "2019-09-26T00:00:00Z", "repo": repo, "type": "push", "actor": format!("user{}", n % 21_149), "commits": 1}).to_string();
                    lines.push((id, repo, line));
                }
                format!(
                    "generated stand-in ({} lines of the GitHub hour's shape)",
                    lines.len()
                )
            }
        };
        Ok((Input { lines }, source))
    }

    /// Job `index` of the repeated input: key, job id and payload.
    fn job(&self, index: usize) -> (String, String, Vec<u8>) {
        let (id, repo, line) = &self.lines[index % self.lines.len()];
        let round = index / self.lines.len();
        let new_id = format!("{id}-{round}");
        let payload = line.replacen(
            &format!("\"id\":\"{id}\""),
            &format!("\"id\":\"{new_id}\""),
            1,
        );
        (repo.clone(), new_id, payload.into_bytes())
    }
}

fn kafka(args: &Args) -> KafkaSettings {
    KafkaSettings {
        brokers: args.brokers.clone(),
        ..KafkaSettings::default()
    }
}

fn unique(prefix: &str) -> String {
    format!("bench-{prefix}-{:08x}", rand::random::<u32>())
}

async fn create_topic(kafka: &KafkaSettings, name: &str, partitions: i32) -> anyhow::Result<()> {
    let spec = TopicSpec {
        name: name.to_owned(),
        partitions,
        replication_factor: 1,
        retention_ms: 3_600_000,
    };
    topics::ensure(kafka, &[spec]).await?;
    Ok(())
}

async fn delete_topics(kafka: &KafkaSettings, names: &[String]) {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = topics::delete(kafka, &refs).await;
}

/// The plainest producer: librdkafka's own batching with the settings of
/// sluice's producer (idempotent, `acks=all`, same linger and batch size).
fn raw_produce(
    kafka: &KafkaSettings,
    topic: &str,
    input: &Input,
    jobs: usize,
) -> anyhow::Result<f64> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        pipeline::kafka::producer_config(kafka).create()?;
    let started = Instant::now();
    for index in 0..jobs {
        let (key, _, payload) = input.job(index);
        let mut record = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

/// sluice's library producer as `sluice produce` uses it: jobs with their
/// job id header, every delivery report checked.
async fn sluice_produce(
    kafka: &KafkaSettings,
    topic: &str,
    input: &Input,
    range: std::ops::Range<usize>,
) -> anyhow::Result<f64> {
    let producer = BulkProducer::new(kafka)?;
    let count = range.len();
    let started = Instant::now();
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        for index in range {
            let (key, id, payload) = input.job(index);
            let record = OutgoingRecord::job(topic, Some(&id), Some(key.into_bytes()), payload);
            producer.send(&record, index as u64)?;
        }
        let totals = producer.flush(Duration::from_secs(120))?;
        if totals.failed > 0 {
            bail!(
                "{} deliveries failed: {:?}",
                totals.failed,
                totals.first_failure
            );
        }
        Ok(())
    })?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The plainest at-least-once consumer: subscribe, store each offset after
/// a no-op step, let librdkafka auto-commit the stored offsets.
fn raw_consume(kafka: &KafkaSettings, topic: &str, jobs: usize) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut count = 0usize;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < jobs {
        if Instant::now() > deadline {
            bail!("raw consumer read only {count} of {jobs} records in 600 s");
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                started.get_or_insert_with(Instant::now);
                std::hint::black_box(message.payload());
                consumer.store_offset_from_message(&message)?;
                count += 1;
            }
            Some(Err(error)) => eprintln!("raw consumer: {error}"),
            None => {}
        }
    }
    let elapsed = started.map_or(0.0, |s: Instant| s.elapsed().as_secs_f64());
    Ok(jobs as f64 / elapsed)
}

/// A no-op handler that counts jobs and notes when handling started.
#[derive(Default)]
struct Counting {
    count: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    /// Handler start per job id (the pickup scenario).
    starts: Option<Mutex<HashMap<String, Instant>>>,
    /// Lateness of retries behind their due time, in ms.
    retry_lateness_ms: Option<Mutex<Vec<i64>>>,
}

impl Handler for Counting {
    async fn handle(&self, job: &Job) -> Result<(), HandlerError> {
        let now = Instant::now();
        if let Some(lateness) = &self.retry_lateness_ms {
            if job.attempt == 1 {
                return Err(HandlerError::retryable("bench", "first attempt fails"));
            }
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            if let Some(due) = job.due_ms {
                lateness.lock().unwrap().push(now_ms - due);
            }
        }
        if let Some(starts) = &self.starts {
            starts.lock().unwrap().insert(job.id.clone(), now);
        }
        self.first.lock().unwrap().get_or_insert(now);
        *self.last.lock().unwrap() = Some(now);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn worker_settings(
    args: &Args,
    topic: &str,
    group: &str,
    dedupe: bool,
    tiers: Vec<TierSettings>,
) -> PipelineSettings {
    PipelineSettings {
        kafka: kafka(args),
        topic: TopicSettings {
            name: topic.to_owned(),
            partitions: 6,
            replication_factor: 1,
            retention_ms: 3_600_000,
            dlq_retention_ms: 3_600_000,
        },
        retry: RetrySettings { tiers },
        dedupe: DedupeSettings {
            enabled: dedupe,
            redis_url: args.redis.clone(),
            key_prefix: "bench".to_owned(),
            done_ttl_ms: 600_000,
            ..DedupeSettings::default()
        },
        worker: WorkerSettings {
            group_id: group.to_owned(),
            // With dedupe, each job waits for two Redis round trips, so
            // throughput is about max_in_flight / (2 x round trip); 256
            // keeps the pipeline full on this machine.
            max_in_flight: BENCH_IN_FLIGHT,
            max_pending_per_partition: 2_000,
            handler_timeout_ms: 10_000,
            drain_deadline_ms: 10_000,
            commit_interval_ms: 1_000,
            payload_format: PayloadFormat::Json,
            max_record_bytes: 983_040,
            job_id_field: None,
        },
    }
}

/// Creates the tier and dead-letter topics a worker of `settings` needs.
async fn worker_topics(settings: &PipelineSettings) -> anyhow::Result<Vec<String>> {
    let specs = topics::specs(settings);
    topics::ensure(&settings.kafka, &specs[1..]).await?;
    Ok(specs[1..].iter().map(|s| s.name.clone()).collect())
}

/// Runs `members` in-process workers in one group until they handled
/// `jobs`; returns jobs per second from the first handled job to the last.
async fn sluice_consume(
    args: &Args,
    topic: &str,
    jobs: usize,
    dedupe: bool,
    members: usize,
) -> anyhow::Result<f64> {
    let group = unique("group");
    let settings = worker_settings(args, topic, &group, dedupe, Vec::new());
    let extra = worker_topics(&settings).await?;
    let handler = Arc::new(Counting::default());
    let shutdown = CancellationToken::new();
    let mut running = Vec::new();
    for _ in 0..members {
        let worker = Worker::new(settings.clone(), handler.clone())?;
        running.push(tokio::spawn(worker.run(shutdown.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    while (handler.count.load(Ordering::Relaxed) as usize) < jobs {
        if Instant::now() > deadline {
            bail!(
                "workers handled only {} of {jobs} jobs in 900 s",
                handler.count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = handler.first.lock().unwrap().context("no job handled")?;
    let last = handler.last.lock().unwrap().context("no job handled")?;
    shutdown.cancel();
    for task in running {
        task.await??;
    }
    delete_topics(&settings.kafka, &extra).await;
    Ok(jobs as f64 / last.duration_since(first).as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Produces at `rate` jobs/s into a worker that is already running and
/// returns the p50 and p99 of delivery report to handler start, in ms.
async fn pickup(args: &Args, input: &Input, rate: f64, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let kafka = kafka(args);
    let topic = unique("pickup");
    create_topic(&kafka, &topic, 6).await?;
    let group = unique("group");
    let settings = worker_settings(args, &topic, &group, true, Vec::new());
    let extra = worker_topics(&settings).await?;
    let handler = Arc::new(Counting {
        starts: Some(Mutex::new(HashMap::new())),
        ..Counting::default()
    });
    let shutdown = CancellationToken::new();
    let worker = Worker::new(settings.clone(), handler.clone())?;
    let health = worker.health();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    let ready_by = Instant::now() + Duration::from_secs(30);
    while health.ready().is_err() && Instant::now() < ready_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let producer = JobProducer::new(&kafka)?;
    let delivered: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let total = (rate * seconds as f64) as usize;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for index in 0..total {
        let due = started + Duration::from_secs_f64(index as f64 / rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let (key, id, payload) = input.job(index);
        let record = OutgoingRecord::job(&topic, Some(&id), Some(key.into_bytes()), payload);
        let delivery = producer.enqueue(&record).await?;
        let delivered = delivered.clone();
        pending.push(async move {
            let result = delivery.wait().await;
            delivered.lock().unwrap().insert(id, Instant::now());
            result
        });
        while let Some(Some(result)) = futures::FutureExt::now_or_never(pending.next()) {
            result?;
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    let wait_by = Instant::now() + Duration::from_secs(120);
    while (handler.count.load(Ordering::Relaxed) as usize) < total && Instant::now() < wait_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await??;

    let starts = handler
        .starts
        .as_ref()
        .map(|s| s.lock().unwrap().clone())
        .unwrap_or_default();
    let delivered = delivered.lock().unwrap().clone();
    let mut latencies: Vec<f64> = starts
        .iter()
        .filter_map(|(id, start)| {
            let report = delivered.get(id)?;
            // A handler can start before the producer saw the report; that
            // counts as zero.
            Some(start.saturating_duration_since(*report).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mut names = vec![topic];
    names.extend(extra);
    delete_topics(&kafka, &names).await;
    Ok((percentile(&latencies, 0.5), percentile(&latencies, 0.99)))
}

/// Sends jobs that fail their first attempt into a 1 s tier and returns the
/// p99 of how late attempt 2 started after its due time, in ms.
async fn retry_delay(args: &Args, input: &Input, jobs: usize) -> anyhow::Result<f64> {
    let kafka = kafka(args);
    let topic = unique("retry");
    create_topic(&kafka, &topic, 6).await?;
    let tier = TierSettings {
        name: "retry-1s".to_owned(),
        delay_ms: 1_000,
        attempts: 1,
    };
    let settings = worker_settings(args, &topic, &unique("group"), true, vec![tier]);
    let extra = worker_topics(&settings).await?;
    sluice_produce(&kafka, &topic, input, 0..jobs).await?;
    let handler = Arc::new(Counting {
        retry_lateness_ms: Some(Mutex::new(Vec::new())),
        ..Counting::default()
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Worker::new(settings.clone(), handler.clone())?.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(300);
    while (handler.count.load(Ordering::Relaxed) as usize) < jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await??;
    let mut lateness: Vec<f64> = handler
        .retry_lateness_ms
        .as_ref()
        .map(|l| l.lock().unwrap().iter().map(|ms| *ms as f64).collect())
        .unwrap_or_default();
    lateness.sort_by(f64::total_cmp);
    let mut names = vec![topic];
    names.extend(extra);
    delete_topics(&kafka, &names).await;
    Ok(percentile(&lateness, 0.99))
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

/// Runs the real `sluice work` binary over `jobs` jobs and returns its peak
/// RSS and its growth from 20 % of the run to the end, in MB.
async fn memory(args: &Args, input: &Input, jobs: usize) -> anyhow::Result<(f64, f64)> {
    let kafka = kafka(args);
    let topic = unique("rss");
    create_topic(&kafka, &topic, 6).await?;
    let group = unique("group");
    let settings = worker_settings(args, &topic, &group, true, Vec::new());
    let extra = worker_topics(&settings).await?;
    println!("  producing {jobs} jobs for the memory run");
    sluice_produce(&kafka, &topic, input, 0..jobs).await?;

    let dir = std::env::temp_dir().join(unique("rss"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[topic]\nname = \"{topic}\"\n[retry]\ntiers = []\n[dedupe]\nredis_url = \"{}\"\nkey_prefix = \"bench\"\ndone_ttl_ms = 600000\n[worker]\ngroup_id = \"{group}\"\nmax_in_flight = {BENCH_IN_FLIGHT}\n[handler]\nkind = \"noop\"\n[server]\nlisten = \"127.0.0.1:0\"\n",
            args.brokers, args.redis
        ),
    )?;
    let mut child = tokio::process::Command::new(&args.sluice)
        .args(["work", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start sluice work")?;
    let pid = child.id().context("worker pid")?;

    let mut peak_kib = 0u64;
    let mut at_fifth: Option<u64> = None;
    let mut last_kib = 0u64;
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(kib) = rss_kib(pid, "VmRSS:") {
            last_kib = kib;
            peak_kib = peak_kib.max(kib);
        }
        let (kafka, group, name) = (kafka.clone(), group.clone(), topic.clone());
        let offsets =
            tokio::task::spawn_blocking(move || group_offsets(&kafka, &group, &name)).await??;
        let committed: i64 = offsets.iter().map(|p| p.committed.unwrap_or(0)).sum();
        if at_fifth.is_none() && committed as usize >= jobs / 5 {
            at_fifth = Some(last_kib);
        }
        if committed as usize >= jobs {
            break;
        }
        if Instant::now() > deadline {
            bail!("memory run did not finish: {committed} of {jobs} committed");
        }
    }
    if let Some(kib) = rss_kib(pid, "VmHWM:") {
        peak_kib = peak_kib.max(kib);
    }
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let mut names = vec![topic];
    names.extend(extra);
    delete_topics(&kafka, &names).await;
    let growth_kib = last_kib.saturating_sub(at_fifth.unwrap_or(last_kib));
    Ok((peak_kib as f64 / 1024.0, growth_kib as f64 / 1024.0))
}

/// Median, min and max of repeated measurements.
fn stats(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    json!({
        "median": round(sorted[sorted.len() / 2]),
        "min": round(sorted[0]),
        "max": round(sorted[sorted.len() - 1]),
        "runs": sorted.iter().map(|v| round(*v)).collect::<Vec<_>>(),
    })
}

fn machine() -> Value {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0.0, |kib| {
            (kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0
        });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": memory,
        "cpu": cpu,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kafka = kafka(&args);
    let (input, source) = Input::load(&args.input)?;
    println!(
        "input: {source}, repeated with rewritten ids to {} jobs",
        args.jobs
    );
    let reps = args.repetitions.max(1);
    let mut figures: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();

    for rep in 1..=reps {
        println!("repetition {rep} of {reps}");
        let raw_topic = unique("raw-produce");
        create_topic(&kafka, &raw_topic, 6).await?;
        let (producer_kafka, topic, jobs) = (kafka.clone(), raw_topic.clone(), args.jobs);
        let input_ref = &input;
        let raw = std::thread::scope(|scope| {
            scope
                .spawn(|| raw_produce(&producer_kafka, &topic, input_ref, jobs))
                .join()
        })
        .map_err(|_| anyhow::anyhow!("raw producer panicked"))??;
        println!("  raw producer            {raw:>10.0} records/s");

        let topic = unique("jobs");
        create_topic(&kafka, &topic, 6).await?;
        let produced = sluice_produce(&kafka, &topic, &input, 0..args.jobs).await?;
        println!("  sluice produce          {produced:>10.0} jobs/s");

        let (consumer_kafka, name, jobs) = (kafka.clone(), topic.clone(), args.jobs);
        let raw_consumed =
            tokio::task::spawn_blocking(move || raw_consume(&consumer_kafka, &name, jobs))
                .await??;
        println!("  raw consumer            {raw_consumed:>10.0} records/s");
        let off = sluice_consume(&args, &topic, args.jobs, false, 1).await?;
        println!("  sluice, dedupe off      {off:>10.0} jobs/s");
        let on = sluice_consume(&args, &topic, args.jobs, true, 1).await?;
        println!("  sluice, dedupe on       {on:>10.0} jobs/s");
        let two = sluice_consume(&args, &topic, args.jobs, true, 2).await?;
        println!("  sluice, two workers     {two:>10.0} jobs/s");
        delete_topics(&kafka, &[raw_topic, topic]).await;

        // Half of the measured maximum: the one-worker rate with dedupe on.
        let rate = on / 2.0;
        let (p50, p99) = pickup(&args, &input, rate, 10).await?;
        println!("  pickup at {rate:.0}/s      p50 {p50:.2} ms, p99 {p99:.2} ms");
        let late = retry_delay(&args, &input, 5_000).await?;
        println!("  retry delay error       p99 {late:.0} ms");

        rates
            .entry("raw_producer_records_per_s")
            .or_default()
            .push(raw);
        rates
            .entry("sluice_produce_jobs_per_s")
            .or_default()
            .push(produced);
        rates
            .entry("raw_consumer_records_per_s")
            .or_default()
            .push(raw_consumed);
        rates
            .entry("sluice_dedupe_off_jobs_per_s")
            .or_default()
            .push(off);
        rates
            .entry("sluice_dedupe_on_jobs_per_s")
            .or_default()
            .push(on);
        rates
            .entry("sluice_two_workers_jobs_per_s")
            .or_default()
            .push(two);
        figures
            .entry("produce_ratio")
            .or_default()
            .push(produced / raw);
        figures
            .entry("consume_ratio_dedupe_off")
            .or_default()
            .push(off / raw_consumed);
        figures
            .entry("consume_ratio_dedupe_on")
            .or_default()
            .push(on / raw_consumed);
        figures
            .entry("two_workers_ratio")
            .or_default()
            .push(two / on);
        figures.entry("pickup_p50_ms").or_default().push(p50);
        figures.entry("pickup_p99_ms").or_default().push(p99);
        figures
            .entry("retry_delay_error_p99_ms")
            .or_default()
            .push(late);
    }

    println!(
        "memory run: {} jobs through `sluice work` (dedupe on, no-op handler)",
        args.rss_jobs
    );
    let (peak, growth) = memory(&args, &input, args.rss_jobs).await?;
    println!("  peak RSS {peak:.1} MB, growth {growth:.1} MB");
    figures.entry("worker_peak_rss_mb").or_default().push(peak);
    figures
        .entry("worker_rss_growth_mb")
        .or_default()
        .push(growth);

    let mut summary = serde_json::Map::new();
    for (key, values) in &figures {
        summary.insert((*key).to_owned(), stats(values));
    }
    let mut raw_rates = serde_json::Map::new();
    for (key, values) in &rates {
        raw_rates.insert((*key).to_owned(), stats(values));
    }
    let redis_version = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let report = json!({
        "figures": summary,
        "rates": raw_rates,
        "jobs_per_run": args.jobs,
        "memory_run_jobs": args.rss_jobs,
        "repetitions": reps,
        "input": source,
        "machine": machine(),
        "versions": {
            "sluice": env!("CARGO_PKG_VERSION"),
            "librdkafka": rdkafka::util::get_rdkafka_version().1,
            "kafka": std::env::var("KAFKA_VERSION").unwrap_or_else(|_| "4.1.1".to_owned()),
            "redis": redis_version,
        },
        "header_schema": headers::SCHEMA_VERSION,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;

    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "figure", "median", "min", "max"
    );
    let mut keys: Vec<_> = summary.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let value = &summary[&key];
        println!(
            "{key:<28} {:>12} {:>12} {:>12}",
            value["median"], value["min"], value["max"]
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
