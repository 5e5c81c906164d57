//! Redis claims and done markers that make handling idempotent.
//!
//! Before a handler runs, the worker claims the job id with a lease
//! (`SET key token PX lease` when the key is absent). After success the claim
//! becomes a done marker with a TTL; after a failure it is released once the
//! retry or dead-letter copy is durable, so the next tier can claim the job.
//! A done job is skipped, a job claimed by another live member waits, and a
//! claim left by a crashed member expires with its lease. Every key has a TTL.
//!
//! Requests from all running jobs go through one batching task that sends
//! whatever is waiting as a single pipeline, so a busy worker makes one round
//! trip for many claims instead of one per job.
//!
//! Keys are `<prefix>:<group>:<job id>`: two consumer groups reading the same
//! topic are two services, and each handles every job once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{redact_url, DedupeSettings};
use crate::telemetry::health::Health;

/// How often an idle worker checks that Redis responds.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Most requests sent in one pipeline.
const MAX_BATCH: usize = 512;
/// Requests waiting for the batching task before callers wait for room.
const QUEUE_CAPACITY: usize = 4096;
/// Value of a done marker. Claims hold a member token instead.
const DONE: &str = "done";

/// Deletes the key only while it still contains our claim token.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupeError {
    #[error("invalid Redis URL {url}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: RedisError,
    },
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    #[error("unexpected Redis reply to {operation}: {reply}")]
    UnexpectedReply {
        operation: &'static str,
        reply: String,
    },
}

/// Result of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This member holds the job until it marks it done or releases it.
    Claimed(ClaimToken),
    /// The job already succeeded; skip it.
    Done,
    /// Another member holds a live claim that expires in `expires_in`.
    Busy { expires_in: Duration },
}

/// Proof of a claim, needed to release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken(String);

enum Request {
    Claim {
        key: String,
        token: String,
        reply: oneshot::Sender<Result<Claim, DedupeError>>,
    },
    Done {
        key: String,
        reply: oneshot::Sender<Result<(), DedupeError>>,
    },
    Release {
        key: String,
        token: String,
        reply: oneshot::Sender<Result<(), DedupeError>>,
    },
}

/// Handle to the dedupe store; cheap to clone.
#[derive(Clone)]
pub struct Dedupe {
    requests: mpsc::Sender<Request>,
    key_base: Arc<str>,
    member: Arc<str>,
    next_token: Arc<AtomicU64>,
}

impl Dedupe {
    /// Connects lazily: Redis may be down at start, and the first request
    /// fails as [`DedupeError::Unavailable`] until it is up.
    ///
    /// Must be called inside a Tokio runtime, which runs the batching task.
    ///
    /// `health` records whether Redis responds; an idle worker pings Redis
    /// every [`PING_INTERVAL`] so that readiness stays current.
    pub fn connect(
        settings: &DedupeSettings,
        group_id: &str,
        member: &str,
        health: Arc<Health>,
    ) -> Result<Self, DedupeError> {
        let invalid = |source| DedupeError::InvalidUrl {
            url: redact_url(&settings.redis_url),
            source,
        };
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.redis_url.as_str())
            .map_err(invalid)?;
        let mut redis_settings = info.redis_settings().clone();
        if let Some(username) = &settings.redis_username {
            redis_settings = redis_settings.set_username(username);
        }
        if let Some(password) = &settings.redis_password {
            redis_settings = redis_settings.set_password(password);
        }
        info = info.set_redis_settings(redis_settings);
        let client = redis::Client::open(info).map_err(invalid)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
        let (requests, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let batcher = Batcher {
            connection,
            release: Script::new(RELEASE_SCRIPT),
            lease_ms: settings.lease_ms,
            done_ttl_ms: settings.done_ttl_ms,
            health,
        };
        tokio::spawn(batcher.run(receiver));
        Ok(Dedupe {
            requests,
            key_base: format!("{}:{}:", settings.key_prefix, group_id).into(),
            member: member.into(),
            next_token: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Returns the Redis key of a job id.
    pub fn key(&self, job_id: &str) -> String {
        format!("{}{job_id}", self.key_base)
    }

    /// Claims `job_id` for this member.
    ///
    /// # Cancellation
    /// Dropping the future may leave a claim behind; it expires with its
    /// lease.
    pub async fn claim(&self, job_id: &str) -> Result<Claim, DedupeError> {
        let sequence = self.next_token.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}:{sequence}", self.member);
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Claim {
            key: self.key(job_id),
            token,
            reply,
        })
        .await?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Turns the claim of `job_id` into a done marker with the done TTL.
    pub async fn mark_done(&self, job_id: &str) -> Result<(), DedupeError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Done {
            key: self.key(job_id),
            reply,
        })
        .await?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Releases the claim of `job_id` if `token` still holds it.
    pub async fn release(&self, job_id: &str, token: &ClaimToken) -> Result<(), DedupeError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Release {
            key: self.key(job_id),
            token: token.0.clone(),
            reply,
        })
        .await?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    async fn submit(&self, request: Request) -> Result<(), DedupeError> {
        self.requests.send(request).await.map_err(|_| stopped())
    }
}

impl DedupeError {
    /// Bounded kind for the `redis_errors` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            DedupeError::InvalidUrl { .. } => "invalid_url",
            DedupeError::Unavailable(_) => "unavailable",
            DedupeError::UnexpectedReply { .. } => "unexpected_reply",
        }
    }
}

fn stopped() -> DedupeError {
    DedupeError::Unavailable("the dedupe batching task stopped".to_owned())
}

struct Batcher {
    connection: ConnectionManager,
    health: Arc<Health>,
    release: Script,
    lease_ms: u64,
    done_ttl_ms: u64,
}

impl Batcher {
    async fn run(mut self, mut receiver: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut available = None;
        loop {
            let received =
                tokio::time::timeout(PING_INTERVAL, receiver.recv_many(&mut batch, MAX_BATCH))
                    .await;
            let outcome = match received {
                Ok(0) => break,
                Ok(_) => {
                    let replies = self.execute(&batch).await;
                    let outcome = replies.first().cloned().map(|reply| reply.map(|_| ()));
                    for (request, reply) in batch.drain(..).zip(replies) {
                        answer(request, reply);
                    }
                    outcome
                }
                // Idle: a ping keeps readiness current.
                Err(_) => Some(self.ping().await),
            };
            if let Some(outcome) = outcome {
                available = Some(self.note_state(available, outcome));
            }
        }
    }

    async fn ping(&mut self) -> Result<(), String> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.connection)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Logs one line per change between reachable and unreachable, however
    /// many jobs wait, and updates readiness. Returns the new state.
    fn note_state(&self, before: Option<bool>, outcome: Result<(), String>) -> bool {
        let now = outcome.is_ok();
        self.health.set_redis_up(now);
        match (before, outcome) {
            (Some(true) | None, Err(error)) => {
                warn!(%error, "Redis is unavailable; handling pauses and nothing is committed until it is back")
            }
            (Some(false), Ok(())) => info!("Redis is reachable again; handling resumes"),
            _ => {}
        }
        now
    }

    /// Sends the batch as one pipeline, loading the scripts first if Redis
    /// lost them (after a restart, for example). Returns one reply per
    /// request.
    async fn execute(&mut self, batch: &[Request]) -> Vec<Result<Value, String>> {
        let mut result = self.send(batch).await;
        if matches!(&result, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)) {
            result = self.load_scripts().await;
            if result.is_ok() {
                result = self.send(batch).await;
            }
        }
        if let Ok(values) = &mut result {
            if let Err(error) = self.resolve_conflicts(batch, values).await {
                result = Err(error);
            }
        }
        match result {
            Ok(values) => values.into_iter().map(Ok).collect(),
            Err(error) => {
                let message = error.to_string();
                batch.iter().map(|_| Err(message.clone())).collect()
            }
        }
    }

    async fn send(&mut self, batch: &[Request]) -> redis::RedisResult<Vec<Value>> {
        let mut pipe = redis::pipe();
        for request in batch {
            match request {
                Request::Claim { key, token, .. } => {
                    // The common case, a job no member claimed, is one plain
                    // SET; conflicts are resolved by `resolve_conflicts`.
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(self.lease_ms);
                }
                Request::Done { key, .. } => {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(DONE)
                        .arg("PX")
                        .arg(self.done_ttl_ms);
                }
                Request::Release { key, token, .. } => {
                    pipe.cmd("EVALSHA")
                        .arg(self.release.get_hash())
                        .arg(1)
                        .arg(key)
                        .arg(token);
                }
            }
        }
        pipe.query_async(&mut self.connection).await
    }

    async fn load_scripts(&mut self) -> redis::RedisResult<Vec<Value>> {
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(RELEASE_SCRIPT);
        pipe.query_async(&mut self.connection).await
    }

    /// Turns the replies to claims into `{1}` (claimed), `{2}` (done) or
    /// `{3, pttl}` (held by another member). A claim whose `SET NX` found
    /// the key needs one more round trip, for all such claims together, to
    /// read what is there.
    async fn resolve_conflicts(
        &mut self,
        batch: &[Request],
        values: &mut [Value],
    ) -> redis::RedisResult<()> {
        let mut conflicts = Vec::new();
        for (index, (request, value)) in batch.iter().zip(values.iter_mut()).enumerate() {
            if let Request::Claim { key, .. } = request {
                match value {
                    Value::Nil => conflicts.push((index, key)),
                    _ => *value = Value::Array(vec![Value::Int(1), Value::Int(0)]),
                }
            }
        }
        if conflicts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (_, key) in &conflicts {
            pipe.cmd("GET").arg(*key);
            pipe.cmd("PTTL").arg(*key);
        }
        let found: Vec<Value> = pipe.query_async(&mut self.connection).await?;
        for ((index, _), pair) in conflicts.iter().zip(found.chunks(2)) {
            let done = matches!(&pair[0], Value::BulkString(bytes) if bytes == DONE.as_bytes());
            let pttl = match pair.get(1) {
                Some(Value::Int(pttl)) => *pttl,
                _ => 0,
            };
            // A key gone since the SET NX reads as busy for a moment; the
            // claim is retried shortly.
            values[*index] = if done {
                Value::Array(vec![Value::Int(2), Value::Int(0)])
            } else {
                Value::Array(vec![Value::Int(3), Value::Int(pttl)])
            };
        }
        Ok(())
    }
}

fn answer(request: Request, reply: Result<Value, String>) {
    match request {
        Request::Claim {
            token, reply: tx, ..
        } => {
            let _ = tx.send(
                reply
                    .map_err(DedupeError::Unavailable)
                    .and_then(|v| parse_claim(v, token)),
            );
        }
        Request::Done { reply: tx, .. } => {
            let _ = tx.send(reply.map(|_| ()).map_err(DedupeError::Unavailable));
        }
        Request::Release { reply: tx, .. } => {
            let _ = tx.send(reply.map(|_| ()).map_err(DedupeError::Unavailable));
        }
    }
}

fn parse_claim(value: Value, token: String) -> Result<Claim, DedupeError> {
    let unexpected = |value: &Value| DedupeError::UnexpectedReply {
        operation: "claim",
        reply: format!("{value:?}"),
    };
    let Value::Array(items) = &value else {
        return Err(unexpected(&value));
    };
    match items.as_slice() {
        [Value::Int(1), _] => Ok(Claim::Claimed(ClaimToken(token))),
        [Value::Int(2), _] => Ok(Claim::Done),
        [Value::Int(3), Value::Int(pttl)] => Ok(Claim::Busy {
            // A key without a TTL (-1) or gone since (-2) is retried soon.
            expires_in: Duration::from_millis((*pttl).max(50) as u64),
        }),
        _ => Err(unexpected(&value)),
    }
}
