//! Typed settings for every part of the pipeline.
//!
//! A settings file (TOML) is read with the `config` crate, then `SLUICE_`
//! environment variables override single keys, with `__` between sections
//! (`SLUICE_KAFKA__BROKERS`, `SLUICE_WORKER__MAX_IN_FLIGHT`). Unknown keys are
//! rejected so that a typo never silently falls back to a default. User-facing
//! keys carry their unit (`_ms`, `_bytes`); the code works with `Duration`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Prefix of the environment variables that override settings file keys.
pub const ENV_PREFIX: &str = "SLUICE";

/// Everything that fails while loading or validating settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("failed to read settings from {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("invalid setting `{key}` = {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Connection settings shared by every Kafka client sluice creates.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext` or
    /// `sasl_ssl`.
    #[serde(default)]
    pub security_protocol: Option<String>,
    /// `sasl.mechanism`, for example `SCRAM-SHA-512`.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// Set it from a secret (`SLUICE_KAFKA__SASL_PASSWORD`), not in the file.
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// `ssl.ca.location`: CA bundle that signed the brokers' certificates.
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
    /// librdkafka properties applied last, for anything the keys above do
    /// not cover. Values are hidden in `Debug` output because they may hold
    /// passwords.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".to_owned()
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: default_brokers(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            properties: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.properties.keys().map(String::as_str).collect();
        let hidden = self.sasl_password.as_ref().map(|_| "***");
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &hidden)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("properties", &format_args!("{keys:?} (values hidden)"))
            .finish()
    }
}

/// The main topic and the shape of every topic derived from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Main topic name. Tier topics are `<name>.<tier>` and the dead-letter
    /// topic is `<name>.dlq`.
    pub name: String,
    /// Partitions of the main and tier topics, used by `topics ensure`.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// `retention.ms` of the main and tier topics.
    #[serde(default = "default_retention_ms")]
    pub retention_ms: i64,
    /// `retention.ms` of the dead-letter topic, longer by default because
    /// operators inspect and redrive it days after an incident.
    #[serde(default = "default_dlq_retention_ms")]
    pub dlq_retention_ms: i64,
}

fn default_partitions() -> i32 {
    6
}
fn default_replication_factor() -> i32 {
    1
}
fn default_retention_ms() -> i64 {
    7 * 24 * 3_600_000
}
fn default_dlq_retention_ms() -> i64 {
    28 * 24 * 3_600_000
}

impl TopicSettings {
    pub fn tier_topic(&self, tier: &TierSettings) -> String {
        format!("{}.{}", self.name, tier.name)
    }

    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.name)
    }
}

/// One retry tier: a topic whose jobs wait `delay_ms` after the failure
/// before they run again, for up to `attempts` attempts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    /// Topic suffix, for example `retry-30s`.
    pub name: String,
    pub delay_ms: u64,
    #[serde(default = "default_tier_attempts")]
    pub attempts: u32,
}

fn default_tier_attempts() -> u32 {
    1
}

impl TierSettings {
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(default = "default_tiers")]
    pub tiers: Vec<TierSettings>,
}

fn default_tiers() -> Vec<TierSettings> {
    vec![
        TierSettings {
            name: "retry-30s".to_owned(),
            delay_ms: 30_000,
            attempts: 1,
        },
        TierSettings {
            name: "retry-5m".to_owned(),
            delay_ms: 300_000,
            attempts: 1,
        },
    ]
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            tiers: default_tiers(),
        }
    }
}

/// What the worker does when Redis cannot be reached.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RedisUnavailable {
    /// Stop handling and commit nothing until Redis responds again.
    Pause,
    /// Run jobs without a claim. Duplicates become possible; an operator
    /// chooses this only when availability matters more than idempotency.
    RunWithoutDedupe,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeSettings {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// Redis ACL user; overrides a user in the URL.
    #[serde(default)]
    pub redis_username: Option<String>,
    /// Set it from a secret (`SLUICE_DEDUPE__REDIS_PASSWORD`); overrides a
    /// password in the URL.
    #[serde(default)]
    pub redis_password: Option<String>,
    /// First segment of every dedupe key: `<prefix>:<group>:<job id>`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a claim protects a running job. A claim left by a crashed
    /// member expires after this, so it must exceed the handler timeout.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// How long a done marker keeps a finished job from running again.
    #[serde(default = "default_done_ttl_ms")]
    pub done_ttl_ms: u64,
    #[serde(default = "default_redis_unavailable")]
    pub on_redis_unavailable: RedisUnavailable,
}

fn default_true() -> bool {
    true
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".to_owned()
}
fn default_key_prefix() -> String {
    "sluice".to_owned()
}
fn default_lease_ms() -> u64 {
    120_000
}
fn default_done_ttl_ms() -> u64 {
    7 * 24 * 3_600_000
}
fn default_redis_unavailable() -> RedisUnavailable {
    RedisUnavailable::Pause
}

impl Default for DedupeSettings {
    fn default() -> Self {
        DedupeSettings {
            enabled: true,
            redis_url: default_redis_url(),
            redis_username: None,
            redis_password: None,
            key_prefix: default_key_prefix(),
            lease_ms: default_lease_ms(),
            done_ttl_ms: default_done_ttl_ms(),
            on_redis_unavailable: default_redis_unavailable(),
        }
    }
}

impl fmt::Debug for DedupeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeSettings")
            .field("enabled", &self.enabled)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_username", &self.redis_username)
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "***"),
            )
            .field("key_prefix", &self.key_prefix)
            .field("lease_ms", &self.lease_ms)
            .field("done_ttl_ms", &self.done_ttl_ms)
            .field("on_redis_unavailable", &self.on_redis_unavailable)
            .finish()
    }
}

/// Replaces the password of a `scheme://user:password@host` URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// How payloads are checked before a handler sees them.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// The value must be valid UTF-8 JSON.
    Json,
    /// Any bytes; only a null value is rejected.
    Bytes,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Consumer group id shared by all members of the deployment.
    pub group_id: String,
    /// Jobs that may run at once in this member, across all partitions.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Jobs fetched but not yet terminal per partition before the member
    /// pauses that partition (backpressure).
    #[serde(default = "default_max_pending_per_partition")]
    pub max_pending_per_partition: usize,
    /// A handler that runs longer fails with a retryable timeout error.
    #[serde(default = "default_handler_timeout_ms")]
    pub handler_timeout_ms: u64,
    /// How long a stop or a revoke waits for running jobs before it commits
    /// what is terminal and gives up the rest.
    #[serde(default = "default_drain_deadline_ms")]
    pub drain_deadline_ms: u64,
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    #[serde(default = "default_payload_format")]
    pub payload_format: PayloadFormat,
    /// Largest record (key, payload and headers) a worker runs; larger ones
    /// go to the dead-letter topic as `oversized`. It must leave room for the
    /// sluice headers under the producer's `message.max.bytes`, or a retry
    /// copy could never be written.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// JSON pointer to the job id inside the payload, used when a record has
    /// no `sluice-job-id` header. Without either, the job id is the record's
    /// first position on the main topic.
    #[serde(default)]
    pub job_id_field: Option<String>,
}

fn default_max_in_flight() -> usize {
    64
}
fn default_max_pending_per_partition() -> usize {
    2_000
}
fn default_handler_timeout_ms() -> u64 {
    30_000
}
fn default_drain_deadline_ms() -> u64 {
    25_000
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_payload_format() -> PayloadFormat {
    PayloadFormat::Json
}
/// 960 KiB: librdkafka's default `message.max.bytes` (1,000,000) minus
/// [`COPY_HEADROOM_BYTES`].
fn default_max_record_bytes() -> usize {
    983_040
}

/// Room kept for the sluice headers a retry or dead-letter copy adds (the
/// error message alone may take 512 bytes).
pub const COPY_HEADROOM_BYTES: usize = 16_384;

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl WorkerSettings {
    pub fn handler_timeout(&self) -> Duration {
        Duration::from_millis(self.handler_timeout_ms)
    }
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_millis(self.drain_deadline_ms)
    }
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

/// The pipeline's part of a settings file. Services add their own sections
/// (the `sluice` binary adds `[handler]`) and call [`PipelineSettings::validate`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    #[serde(default)]
    pub kafka: KafkaSettings,
    pub topic: TopicSettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub dedupe: DedupeSettings,
    pub worker: WorkerSettings,
}

impl PipelineSettings {
    /// Checks values that parse but cannot work, naming the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "\"\"",
                "set it to host:port of at least one broker",
            ));
        }
        validate_topic_name("topic.name", &self.topic.name)?;
        if self.topic.partitions < 1 {
            return Err(ConfigError::invalid(
                "topic.partitions",
                self.topic.partitions,
                "must be at least 1",
            ));
        }
        if self.topic.replication_factor < 1 {
            return Err(ConfigError::invalid(
                "topic.replication_factor",
                self.topic.replication_factor,
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("topic.retention_ms", self.topic.retention_ms),
            ("topic.dlq_retention_ms", self.topic.dlq_retention_ms),
        ] {
            if value < -1 || value == 0 {
                return Err(ConfigError::invalid(
                    key,
                    value,
                    "must be a positive number of milliseconds, or -1 for no time limit",
                ));
            }
        }
        self.validate_tiers()?;
        self.validate_dedupe()?;
        self.validate_worker()
    }

    fn validate_tiers(&self) -> Result<(), ConfigError> {
        let mut seen = Vec::new();
        for tier in &self.retry.tiers {
            if tier.name.is_empty() || tier.name == "dlq" || !tier.name.chars().all(is_topic_char) {
                return Err(ConfigError::invalid(
                    "retry.tiers.name",
                    format!("{:?}", tier.name),
                    "use letters, digits, '.', '_' or '-', and not the reserved name \"dlq\"",
                ));
            }
            if seen.contains(&&tier.name) {
                return Err(ConfigError::invalid(
                    "retry.tiers.name",
                    format!("{:?}", tier.name),
                    "each tier needs its own name because the name is its topic suffix",
                ));
            }
            seen.push(&tier.name);
            if tier.attempts == 0 {
                return Err(ConfigError::invalid(
                    "retry.tiers.attempts",
                    format!("0 (tier {})", tier.name),
                    "must be at least 1; remove the tier to skip it",
                ));
            }
            validate_topic_name("retry.tiers.name", &self.topic.tier_topic(tier))?;
        }
        Ok(())
    }

    fn validate_dedupe(&self) -> Result<(), ConfigError> {
        let dedupe = &self.dedupe;
        if !dedupe.enabled {
            return Ok(());
        }
        if !(dedupe.redis_url.starts_with("redis://")
            || dedupe.redis_url.starts_with("rediss://")
            || dedupe.redis_url.starts_with("redis+unix://")
            || dedupe.redis_url.starts_with("unix://"))
        {
            return Err(ConfigError::invalid(
                "dedupe.redis_url",
                redact_url(&dedupe.redis_url),
                "use redis://host:port, rediss://host:port for TLS, or unix:///path",
            ));
        }
        if dedupe.key_prefix.is_empty() {
            return Err(ConfigError::invalid(
                "dedupe.key_prefix",
                "\"\"",
                "set a short prefix such as \"sluice\"",
            ));
        }
        if dedupe.lease_ms <= self.worker.handler_timeout_ms {
            return Err(ConfigError::invalid(
                "dedupe.lease_ms",
                dedupe.lease_ms,
                format!(
                    "must exceed worker.handler_timeout_ms ({}) so that a claim outlives the job it protects",
                    self.worker.handler_timeout_ms
                ),
            ));
        }
        if dedupe.done_ttl_ms == 0 {
            return Err(ConfigError::invalid(
                "dedupe.done_ttl_ms",
                0,
                "must be positive because every dedupe key needs a TTL",
            ));
        }
        Ok(())
    }

    fn validate_worker(&self) -> Result<(), ConfigError> {
        let worker = &self.worker;
        if worker.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "worker.group_id",
                "\"\"",
                "set the consumer group id shared by all members",
            ));
        }
        let positive = [
            ("worker.max_in_flight", worker.max_in_flight as u64),
            (
                "worker.max_pending_per_partition",
                worker.max_pending_per_partition as u64,
            ),
            ("worker.handler_timeout_ms", worker.handler_timeout_ms),
            ("worker.drain_deadline_ms", worker.drain_deadline_ms),
            ("worker.commit_interval_ms", worker.commit_interval_ms),
            ("worker.max_record_bytes", worker.max_record_bytes as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, 0, "must be at least 1"));
            }
        }
        let message_max_bytes = self
            .kafka
            .properties
            .get("message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        if worker.max_record_bytes + COPY_HEADROOM_BYTES > message_max_bytes {
            return Err(ConfigError::invalid(
                "worker.max_record_bytes",
                worker.max_record_bytes,
                format!(
                    "must be at most message.max.bytes ({message_max_bytes}) minus {COPY_HEADROOM_BYTES} bytes for the headers of retry copies; lower it or raise kafka.properties.\"message.max.bytes\" (and the broker's limit)"
                ),
            ));
        }
        if let Some(pointer) = &worker.job_id_field {
            if !pointer.starts_with('/') {
                return Err(ConfigError::invalid(
                    "worker.job_id_field",
                    format!("{pointer:?}"),
                    format!("must be a JSON pointer such as \"/{pointer}\""),
                ));
            }
        }
        Ok(())
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks Kafka's topic name rules: 1 to 249 characters of `[a-zA-Z0-9._-]`.
pub fn validate_topic_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 249
        || !name.chars().all(is_topic_char)
        || name == "."
        || name == ".."
    {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?}"),
            "a topic name has 1 to 249 characters of letters, digits, '.', '_' or '-'",
        ));
    }
    Ok(())
}

/// Reads `path` and the `SLUICE_` environment overrides into `T`.
///
/// `T` is usually a service's settings struct with `deny_unknown_fields` on
/// every section, so unknown keys fail here with their name.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let display = path.display().to_string();
    let wrap = |source| ConfigError::Load {
        path: display.clone(),
        source,
    };
    if !path.exists() {
        return Err(ConfigError::Load {
            path: display.clone(),
            source: config::ConfigError::Message(
                "file not found; pass --config with the path of a TOML settings file".to_owned(),
            ),
        });
    }
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        )
        .build()
        .map_err(wrap)?
        .try_deserialize()
        .map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PipelineSettings, String> {
        let settings: PipelineSettings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| e.to_string())?;
        settings.validate().map_err(|e| e.to_string())?;
        Ok(settings)
    }

    const MINIMAL: &str = "[topic]\nname = \"jobs\"\n[worker]\ngroup_id = \"g\"\n";

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let settings = parse(MINIMAL).unwrap();
        assert_eq!(settings.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(settings.retry.tiers.len(), 2);
        assert_eq!(settings.retry.tiers[0].name, "retry-30s");
        assert_eq!(settings.retry.tiers[1].delay(), Duration::from_secs(300));
        assert_eq!(settings.topic.dlq_topic(), "jobs.dlq");
        assert_eq!(
            settings.topic.tier_topic(&settings.retry.tiers[0]),
            "jobs.retry-30s"
        );
        assert!(settings.dedupe.enabled);
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let error = parse(&format!("{MINIMAL}max_inflight = 3\n")).unwrap_err();
        assert!(error.contains("max_inflight"), "{error}");
    }

    #[test]
    fn zero_in_flight_names_key_and_fix() {
        let error = parse(&format!("{MINIMAL}max_in_flight = 0\n")).unwrap_err();
        assert!(error.contains("worker.max_in_flight"), "{error}");
        assert!(error.contains("at least 1"), "{error}");
    }

    #[test]
    fn lease_shorter_than_timeout_is_rejected() {
        let text = format!("{MINIMAL}handler_timeout_ms = 5000\n[dedupe]\nlease_ms = 4000\n");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("dedupe.lease_ms"), "{error}");
        assert!(error.contains("handler_timeout_ms"), "{error}");
    }

    #[test]
    fn invalid_topic_and_tier_names_are_rejected() {
        let error = parse("[topic]\nname = \"a b\"\n[worker]\ngroup_id = \"g\"\n").unwrap_err();
        assert!(error.contains("topic.name"), "{error}");

        let text = format!("{MINIMAL}[retry]\ntiers = [{{ name = \"dlq\", delay_ms = 10 }}]\n");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("retry.tiers.name"), "{error}");

        let text = format!(
            "{MINIMAL}[retry]\ntiers = [{{ name = \"a\", delay_ms = 10 }}, {{ name = \"a\", delay_ms = 20 }}]\n"
        );
        assert!(parse(&text).unwrap_err().contains("its own name"));
    }

    #[test]
    fn zero_tier_attempts_is_rejected() {
        let text = format!(
            "{MINIMAL}[retry]\ntiers = [{{ name = \"r\", delay_ms = 10, attempts = 0 }}]\n"
        );
        assert!(parse(&text).unwrap_err().contains("retry.tiers.attempts"));
    }

    #[test]
    fn record_limit_leaves_room_for_copy_headers() {
        let error = parse(&format!("{MINIMAL}max_record_bytes = 1000000\n")).unwrap_err();
        assert!(error.contains("worker.max_record_bytes"), "{error}");
        assert!(error.contains("message.max.bytes"), "{error}");
        let text = format!("{MINIMAL}max_record_bytes = 1000000\n[kafka.properties]\n\"message.max.bytes\" = \"2000000\"\n");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn job_id_field_must_be_a_pointer() {
        let error = parse(&format!("{MINIMAL}job_id_field = \"id\"\n")).unwrap_err();
        assert!(error.contains("\"/id\""), "{error}");
    }

    #[test]
    fn redis_password_is_redacted() {
        assert_eq!(
            redact_url("redis://app:s3cret@cache:6379/0"),
            "redis://app:***@cache:6379/0"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        let mut settings = parse(MINIMAL).unwrap();
        settings.dedupe.redis_url = "redis://app:s3cret@cache:6379".to_owned();
        settings
            .kafka
            .properties
            .insert("sasl.password".to_owned(), "hunter2".to_owned());
        settings.kafka.sasl_password = Some("kafka-secret".to_owned());
        settings.dedupe.redis_password = Some("redis-secret".to_owned());
        let dump = format!("{settings:?}");
        for secret in ["s3cret", "hunter2", "kafka-secret", "redis-secret"] {
            assert!(!dump.contains(secret), "{secret} in {dump}");
        }
    }
}
