//! Support for integration tests against a real Kafka broker and a real
//! Redis: unique topics that delete themselves, producing raw records,
//! reading topics and group offsets, a scripted in-process handler, and the
//! real `sluice` binary as a child process.
//!
//! The broker and Redis addresses come from `SLUICE_TEST_BROKERS` (default
//! `127.0.0.1:9092`) and `SLUICE_TEST_REDIS` (default
//! `redis://127.0.0.1:6379`); `make test` starts both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline::admin::offsets::{group_offsets, PartitionOffsets};
use pipeline::admin::topics::{self, TopicSpec};
use pipeline::config::{
    DedupeSettings, KafkaSettings, PayloadFormat, PipelineSettings, RetrySettings, TierSettings,
    TopicSettings, WorkerSettings,
};
use pipeline::envelope::{HeaderList, Record};
use pipeline::produce::{JobProducer, OutgoingRecord};
use pipeline::{Handler, HandlerError, Job};

pub fn brokers() -> String {
    std::env::var("SLUICE_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn kafka() -> KafkaSettings {
    KafkaSettings {
        brokers: brokers(),
        ..KafkaSettings::default()
    }
}

/// Returns a name no other test uses: `<prefix>-<random>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "t-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Test tiers: short delays so a test walks them in seconds.
pub fn short_tiers() -> Vec<TierSettings> {
    vec![
        TierSettings {
            name: "retry-1s".into(),
            delay_ms: 1_000,
            attempts: 1,
        },
        TierSettings {
            name: "retry-2s".into(),
            delay_ms: 2_000,
            attempts: 1,
        },
    ]
}

/// Settings for a fresh topic set and group, dedupe on the shared Redis.
pub fn settings(name: &str, partitions: i32) -> PipelineSettings {
    PipelineSettings {
        kafka: kafka(),
        topic: TopicSettings {
            name: unique(name),
            partitions,
            replication_factor: 1,
            retention_ms: 3_600_000,
            dlq_retention_ms: 3_600_000,
        },
        retry: RetrySettings {
            tiers: short_tiers(),
        },
        dedupe: DedupeSettings {
            redis_url: redis_url(),
            lease_ms: 20_000,
            ..DedupeSettings::default()
        },
        worker: WorkerSettings {
            group_id: unique(&format!("{name}-group")),
            max_in_flight: 32,
            max_pending_per_partition: 500,
            handler_timeout_ms: 10_000,
            drain_deadline_ms: 10_000,
            commit_interval_ms: 200,
            payload_format: PayloadFormat::Json,
            max_record_bytes: 983_040,
            job_id_field: None,
        },
    }
}

/// The topics of one test; deleted when dropped.
pub struct Topics {
    pub settings: PipelineSettings,
}

impl Topics {
    /// Creates the main, tier and dead-letter topics of `settings`.
    pub async fn create(settings: &PipelineSettings) -> Topics {
        let specs = topics::specs(settings);
        topics::ensure(&settings.kafka, &specs)
            .await
            .unwrap_or_else(|e| {
                panic!("failed to create test topics (is the stack up? run `make stack-up`): {e}")
            });
        Topics {
            settings: settings.clone(),
        }
    }

    pub fn main(&self) -> &str {
        &self.settings.topic.name
    }

    pub fn tier(&self, index: usize) -> String {
        self.settings
            .topic
            .tier_topic(&self.settings.retry.tiers[index])
    }

    pub fn dlq(&self) -> String {
        self.settings.topic.dlq_topic()
    }

    pub fn all(&self) -> Vec<String> {
        topics::specs(&self.settings)
            .into_iter()
            .map(|s: TopicSpec| s.name)
            .collect()
    }
}

impl Drop for Topics {
    fn drop(&mut self) {
        let kafka = self.settings.kafka.clone();
        let names = self.all();
        // Drop may run inside a runtime, so the cleanup gets its own thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let _ = runtime.block_on(topics::delete(&kafka, &refs));
            }
        })
        .join();
    }
}

/// Builds a JSON job with a key and a job id header.
pub fn job(topic: &str, id: &str, key: &str, body: serde_json::Value) -> OutgoingRecord {
    OutgoingRecord::job(
        topic,
        Some(id),
        Some(key.as_bytes().to_vec()),
        body.to_string().into_bytes(),
    )
}

/// Sends records and waits until each is durable.
pub async fn produce(records: &[OutgoingRecord]) {
    let producer = JobProducer::new(&kafka()).expect("producer");
    let mut pending = Vec::new();
    for record in records {
        pending.push(producer.enqueue(record).await.expect("enqueue"));
    }
    for delivery in pending {
        delivery.wait().await.expect("delivery");
    }
}

/// Reads every record of `topic`.
pub async fn read_all(topic: &str) -> Vec<Record> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || pipeline::admin::read::read_topic(&kafka(), &topic))
        .await
        .expect("join")
        .expect("read topic")
}

pub async fn offsets(group: &str, topic: &str) -> Vec<PartitionOffsets> {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || group_offsets(&kafka(), &group, &topic))
        .await
        .expect("join")
        .expect("group offsets")
}

/// Sum of the group's lag over `topics`.
pub async fn lag(group: &str, topics: &[String]) -> i64 {
    let mut total = 0;
    for topic in topics {
        total += offsets(group, topic)
            .await
            .iter()
            .map(PartitionOffsets::lag)
            .sum::<i64>();
    }
    total
}

/// Polls `check` every 100 ms until it returns true; panics with `what`
/// after `timeout`. The timeout is a hang guard, not a speed assertion.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Value of the last header named `name`, as text.
pub fn header<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// What a scripted handler does with a job, chosen by the payload's `mode`.
///
/// - `ok` (or no mode): succeed,
/// - `fail`: retryable error on every attempt,
/// - `fail_first`: retryable error on attempt 1 only,
/// - `reject`: permanent error,
/// - `reject_until_redriven`: permanent error until a redrive brings it back,
/// - `panic`: panic on attempt 1, succeed after,
/// - `sleep`: sleep `sleep_ms`, then succeed.
#[derive(Clone, Default)]
pub struct Scripted {
    pub calls: Arc<Mutex<Vec<Call>>>,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub job_id: String,
    pub attempt: u32,
    pub topic: String,
    pub finished: bool,
    pub at: Instant,
}

impl Scripted {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Successful runs per job id.
    pub fn successes(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for call in self.calls().into_iter().filter(|c| c.finished) {
            *out.entry(call.job_id).or_default() += 1;
        }
        out
    }
}

impl Handler for Scripted {
    async fn handle(&self, job: &Job) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(job.payload()).unwrap_or_default();
        let mode = body["mode"].as_str().unwrap_or("ok").to_owned();
        let index = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                job_id: job.id.clone(),
                attempt: job.attempt,
                topic: job.record.topic.clone(),
                finished: false,
                at: Instant::now(),
            });
            calls.len() - 1
        };
        let result = match mode.as_str() {
            "fail" => Err(HandlerError::retryable("test_retryable", "always fails")),
            "fail_first" if job.attempt == 1 => Err(HandlerError::retryable(
                "test_retryable",
                "first attempt fails",
            )),
            "reject" => Err(HandlerError::permanent("test_permanent", "rejected")),
            "reject_until_redriven" if job.lineage.redrive_count.is_none() => Err(
                HandlerError::permanent("test_permanent", "rejected before a redrive"),
            ),
            "panic" if job.attempt == 1 => panic!("scripted panic"),
            "sleep" => {
                tokio::time::sleep(Duration::from_millis(
                    body["sleep_ms"].as_u64().unwrap_or(100),
                ))
                .await;
                Ok(())
            }
            _ => Ok(()),
        };
        if result.is_ok() {
            self.calls.lock().unwrap()[index].finished = true;
        }
        result
    }
}

/// Returns the `sluice` binary next to the test executable (`make test`
/// builds it).
pub fn sluice_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = dir.join("sluice");
    assert!(
        binary.exists(),
        "{} not found; build it with `cargo build --workspace --bins` (make test does)",
        binary.display()
    );
    binary
}

/// Writes a settings file for the binary with an HTTP or no-op handler.
pub fn write_config(dir: &Path, settings: &PipelineSettings, handler: &str) -> PathBuf {
    let tiers: Vec<String> = settings
        .retry
        .tiers
        .iter()
        .map(|t| {
            format!(
                "{{ name = \"{}\", delay_ms = {}, attempts = {} }}",
                t.name, t.delay_ms, t.attempts
            )
        })
        .collect();
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"

[topic]
name = "{topic}"
partitions = {partitions}

[retry]
tiers = [{tiers}]

[dedupe]
redis_url = "{redis}"
lease_ms = {lease}

[worker]
group_id = "{group}"
max_in_flight = {in_flight}
handler_timeout_ms = {timeout}
drain_deadline_ms = {drain}
commit_interval_ms = {commit}

[handler]
{handler}

[server]
listen = "127.0.0.1:{port}"
"#,
        brokers = settings.kafka.brokers,
        topic = settings.topic.name,
        partitions = settings.topic.partitions,
        tiers = tiers.join(", "),
        redis = settings.dedupe.redis_url,
        lease = settings.dedupe.lease_ms,
        group = settings.worker.group_id,
        in_flight = settings.worker.max_in_flight,
        timeout = settings.worker.handler_timeout_ms,
        drain = settings.worker.drain_deadline_ms,
        commit = settings.worker.commit_interval_ms,
        port = free_port(),
    );
    let path = dir.join(format!("{}.toml", settings.topic.name));
    std::fs::write(&path, text).expect("write config");
    path
}

/// A `sluice work` child process; killed when dropped.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

/// Returns the `server.listen` address written into a settings file.
pub fn server_address(config: &Path) -> String {
    let text = std::fs::read_to_string(config).expect("read config");
    let line = text
        .lines()
        .find(|line| line.starts_with("listen = "))
        .expect("listen line");
    line.trim_start_matches("listen = ")
        .trim_matches('"')
        .to_owned()
}

impl WorkerProcess {
    pub fn start(config: &Path) -> WorkerProcess {
        Self::start_with_env(config, &[])
    }

    /// Starts a worker with extra environment variables (`OTEL_*`, say).
    pub fn start_with_env(config: &Path, env: &[(&str, String)]) -> WorkerProcess {
        let log = config.with_extension(format!("{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(sluice_binary())
            .args(["work", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,pipeline=debug")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start sluice work");
        WorkerProcess { child, log }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private `redis-server` on a free port, for tests that stop and start
/// Redis without disturbing the shared one.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = PrivateRedis {
            port,
            child: None,
            dir,
        };
        redis.resume();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it accepts
    /// connections.
    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server; data is lost as after a crash.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Returns a TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One request the test webhook received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub idempotency_key: String,
    pub attempt: u32,
    pub status: u16,
}

/// An HTTP endpoint for the `http` handler, scripted by the payload like
/// [`Scripted`]: `mode` = `ok`, `fail` (503), `fail_first` (503 on attempt
/// 1), `reject` (400), `redirect` (301), with an optional `sleep_ms` before
/// the response.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub deliveries: Arc<Mutex<Vec<Delivery>>>,
}

impl Webhook {
    pub async fn start() -> Webhook {
        use axum::routing::post;
        let deliveries: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let state = deliveries.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let state = state.clone();
                    async move {
                        let text = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        let attempt: u32 = text("sluice-attempt").parse().unwrap_or(0);
                        let value: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        if let Some(ms) = value["sleep_ms"].as_u64() {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let status = match value["mode"].as_str().unwrap_or("ok") {
                            "redirect" => 301,
                            "fail" => 503,
                            "fail_first" if attempt == 1 => 503,
                            "reject" => 400,
                            _ => 204,
                        };
                        state.lock().unwrap().push(Delivery {
                            idempotency_key: text("idempotency-key"),
                            attempt,
                            status,
                        });
                        let status = axum::http::StatusCode::from_u16(status)
                            .unwrap_or(axum::http::StatusCode::OK);
                        (status, [(axum::http::header::LOCATION, "/elsewhere")])
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Webhook { url, deliveries }
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    /// Returns the job ids that got a 2xx response, with their counts.
    pub fn delivered(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for d in self.deliveries().into_iter().filter(|d| d.status < 300) {
            *out.entry(d.idempotency_key).or_default() += 1;
        }
        out
    }

    pub fn handler_section(&self) -> String {
        format!("kind = \"http\"\nurl = \"{}\"\ntimeout_ms = 5000", self.url)
    }
}

/// One span as an OTLP receiver decoded it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP span kind: 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: HashMap<String, String>,
    pub status_code: i32,
}

/// An OTLP/HTTP receiver for traces that decodes the protobuf requests
/// exporters send to `/v1/traces`.
#[derive(Clone)]
pub struct OtlpReceiver {
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn any_value_text(value: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;

        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let state = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut spans = state.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                spans.push(ReceivedSpan {
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_span_id: hex(&span.parent_span_id),
                                    name: span.name.clone(),
                                    kind: span.kind,
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .filter_map(|kv| {
                                            Some((
                                                kv.key.clone(),
                                                any_value_text(kv.value.as_ref()?),
                                            ))
                                        })
                                        .collect(),
                                    status_code: span.status.as_ref().map_or(0, |s| s.code),
                                });
                            }
                        }
                    }
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        OtlpReceiver { endpoint, spans }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Environment that makes a `sluice` process export to this receiver
    /// quickly.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            ("OTEL_SERVICE_NAME", "sluice-test".to_owned()),
        ]
    }
}

/// Fetches `url` and returns the status and the body.
pub async fn http_get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(error) => (0, error.to_string()),
    }
}

/// Value of one sample in Prometheus text, by its exact series name with
/// labels, for example `sluice_dedupe_hits_total`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line[series.len()..].trim().parse().ok())
}

/// A worker running in this process with a [`Scripted`] handler.
pub struct Running {
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<pipeline::telemetry::Summary>,
}

/// Starts an in-process worker; panics on invalid settings.
pub fn start(settings: &PipelineSettings, handler: Scripted) -> Running {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = pipeline::Worker::new(settings.clone(), handler).expect("worker settings");
    let token = shutdown.clone();
    let task = tokio::spawn(async move { worker.run(token).await.expect("worker run") });
    Running { shutdown, task }
}

impl Running {
    /// Stops the worker through its drain path and returns its summary.
    pub async fn stop(self) -> pipeline::telemetry::Summary {
        self.shutdown.cancel();
        self.task.await.expect("worker task")
    }
}
