//! Running one record to a terminal state.
//!
//! A record is terminal when its handler succeeded, when it was skipped as a
//! confirmed duplicate, or when a copy of it is durable on the next retry
//! tier or the dead-letter topic. Only then is its offset marked for commit.
//! Every wait here (Redis down, a produce failing) backs off and retries
//! until it succeeds or the partition is given up, so nothing is dropped.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{RedisUnavailable, TierSettings};
use crate::consume::Shared;
use crate::dedupe::{Claim, ClaimToken, Dedupe, DedupeError};
use crate::envelope::{self, headers, DecodeRules, Job, Record, SluiceHeaders};
use crate::handler::{Handler, HandlerError};
use crate::produce::{JobProducer, OutgoingRecord};
use crate::route::{next_hop, Hop};
use crate::telemetry::metrics::{
    ClassLabels, JobLabels, KindLabels, Metrics, OutcomeLabels, RetryLabels, TierLabels,
};
use crate::telemetry::{trace, Counters};

/// Everything a job needs besides its record; shared by all lane tasks.
pub(crate) struct JobContext<H> {
    pub handler: H,
    pub dedupe: Option<Dedupe>,
    pub on_redis_unavailable: RedisUnavailable,
    pub producer: JobProducer,
    pub rules: DecodeRules,
    pub tiers: Vec<TierSettings>,
    /// Topic of each tier, in tier order.
    pub tier_topics: Vec<String>,
    pub dlq_topic: String,
    pub handler_timeout: Duration,
    pub counters: Counters,
    pub metrics: Arc<Metrics>,
    pub group_id: String,
    /// Metric labels of each subscribed topic: the topic and its tier
    /// (`main` for the main topic), built once so the hot path only clones
    /// reference counts.
    pub labels: HashMap<String, (Arc<str>, Arc<str>)>,
}

impl<H> JobContext<H> {
    fn labels_of(&self, topic: &str) -> (Arc<str>, Arc<str>) {
        self.labels
            .get(topic)
            .cloned()
            .unwrap_or_else(|| (topic.into(), "unknown".into()))
    }

    fn tier_label(&self, tier: usize) -> Arc<str> {
        self.labels_of(&self.tier_topics[tier]).1
    }
}

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Succeeded,
    Skipped,
    Retried,
    DeadLettered,
    /// Given up before it was terminal (revoke or stop); stays uncommitted.
    Abandoned,
}

/// Runs one worker of the pool: takes the oldest ready record, runs it to a
/// terminal state (or gives it up), reports it, and repeats until `stop`.
/// The pool size is `worker.max_in_flight`, which bounds concurrent jobs
/// without a task per job.
pub(crate) async fn run_worker<H: Handler>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    loop {
        let task = loop {
            // Registered before the queue is checked, so a record admitted
            // in between still wakes this worker.
            let notified = shared.work.notified();
            if stop.is_cancelled() {
                return;
            }
            if let Some(task) = shared.lock().next_task() {
                break task;
            }
            tokio::select! {
                () = notified => {}
                () = stop.cancelled() => return,
            }
        };

        let (record, cancel, done) = task.into_parts();
        let finish = process(&shared.ctx, record, &cancel).await;
        let terminal = finish != Finish::Abandoned;
        let more = shared.lock().finish_task(&done, terminal);
        if more {
            shared.work.notify_one();
        }
        shared.lane_finished();
    }
}

impl Finish {
    /// Value of the `outcome` metric label and the `sluice.outcome` span
    /// attribute.
    fn label(self) -> &'static str {
        match self {
            Finish::Succeeded => "success",
            Finish::Skipped => "duplicate_skipped",
            Finish::Retried => "retry",
            Finish::DeadLettered => "dead_letter",
            Finish::Abandoned => "abandoned",
        }
    }
}

/// Runs one record to a terminal state inside its process span, and counts
/// the outcome.
pub(crate) async fn process<H: Handler>(
    ctx: &JobContext<H>,
    record: Record,
    cancel: &CancellationToken,
) -> Finish {
    let (topic, tier) = ctx.labels_of(&record.topic);
    let span = trace::enabled().then(|| trace::process_span(&record, &ctx.group_id));
    let run = run_record(ctx, record, cancel);
    let (finish, origin_timestamp) = match &span {
        Some(span) => run.instrument(span.clone()).await,
        None => run.await,
    };

    if let Some(span) = &span {
        span.record("sluice.outcome", finish.label());
    }
    if finish != Finish::Abandoned {
        ctx.metrics
            .jobs_handled
            .get_or_create(&JobLabels {
                topic,
                tier,
                outcome: finish.label(),
            })
            .inc();
        if let Some(timestamp) = origin_timestamp {
            let seconds = (now_ms() - timestamp).max(0) as f64 / 1000.0;
            ctx.metrics
                .end_to_end_latency
                .get_or_create(&OutcomeLabels {
                    outcome: finish.label(),
                })
                .observe(seconds);
        }
    }
    finish
}

/// Runs one record to a terminal state, or gives it up when `cancel` fires
/// while the record waits for Redis or Kafka. Returns how it ended and the
/// record timestamp of its job on the main topic, for the latency metric.
async fn run_record<H: Handler>(
    ctx: &JobContext<H>,
    record: Record,
    cancel: &CancellationToken,
) -> (Finish, Option<i64>) {
    let job = match envelope::decode(record, &ctx.rules) {
        Ok(job) => job,
        Err((record, error)) => {
            let origin = envelope::envelope(&record)
                .map(|envelope| envelope.origin.timestamp_ms)
                .unwrap_or(record.timestamp_ms);
            let finish = dead_letter_undecodable(ctx, record, error, cancel).await;
            return (finish, origin);
        }
    };
    let span = tracing::Span::current();
    span.record("sluice.job.id", job.id.as_str());
    span.record("sluice.attempt", job.attempt);
    span.record("sluice.tier", job.tier.as_deref().unwrap_or("main"));
    (run_job(ctx, &job, cancel).await, job.origin.timestamp_ms)
}

async fn run_job<H: Handler>(ctx: &JobContext<H>, job: &Job, cancel: &CancellationToken) -> Finish {
    let token = match claim(ctx, job, cancel).await {
        ClaimOutcome::Run(token) => token,
        ClaimOutcome::Skip => {
            info!(job_id = %job.id, topic = %job.record.topic, offset = job.record.offset, "skipped job: its done marker shows it already succeeded");
            Counters::bump(&ctx.counters.dedupe_skipped);
            ctx.metrics.dedupe_hits.inc();
            return Finish::Skipped;
        }
        ClaimOutcome::Abandon => return Finish::Abandoned,
    };

    let started = Instant::now();
    ctx.metrics.jobs_in_flight.inc();
    let result = run_handler(ctx, job).await;
    ctx.metrics.jobs_in_flight.dec();
    ctx.metrics
        .handler_duration
        .get_or_create(&TierLabels {
            tier: ctx.labels_of(&job.record.topic).1,
        })
        .observe(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        trace::record_error(&tracing::Span::current(), error.class, &error.message);
    }

    let dedupe_id = job.dedupe_id();
    match result {
        Ok(()) => {
            if let Some(dedupe) = &ctx.dedupe {
                let done = retry_redis(ctx, cancel, "mark the job done", || {
                    dedupe.mark_done(&dedupe_id)
                })
                .await;
                if done.is_none() && token.is_some() {
                    // The handler succeeded, but without a done marker the
                    // next owner would run it again: keep it uncommitted.
                    return Finish::Abandoned;
                }
            }
            Counters::bump(&ctx.counters.succeeded);
            Finish::Succeeded
        }
        Err(error) => {
            let finish = forward_failure(ctx, job, &error, cancel).await;
            if finish == Finish::Abandoned {
                release_best_effort(ctx, job, token.as_ref()).await;
                return finish;
            }
            if let (Some(dedupe), Some(token)) = (&ctx.dedupe, &token) {
                // The copy is durable, so the record is terminal whatever
                // happens here; an unreleased claim only delays the next tier
                // until its lease expires.
                retry_redis(ctx, cancel, "release the claim", || {
                    dedupe.release(&dedupe_id, token)
                })
                .await;
            }
            finish
        }
    }
}

enum ClaimOutcome {
    /// Run the handler; `Some` holds the claim to release after a failure.
    Run(Option<ClaimToken>),
    Skip,
    Abandon,
}

async fn claim<H: Handler>(
    ctx: &JobContext<H>,
    job: &Job,
    cancel: &CancellationToken,
) -> ClaimOutcome {
    let Some(dedupe) = &ctx.dedupe else {
        return ClaimOutcome::Run(None);
    };
    let mut backoff = Backoff::for_reconnect();
    loop {
        let wait = match dedupe.claim(&job.dedupe_id()).await {
            Ok(Claim::Claimed(token)) => return ClaimOutcome::Run(Some(token)),
            Ok(Claim::Done) => return ClaimOutcome::Skip,
            Ok(Claim::Busy { expires_in }) => {
                debug!(job_id = %job.id, ?expires_in, "job is claimed by another member; waiting");
                expires_in.min(Duration::from_secs(1))
            }
            Err(error) => {
                Counters::bump(&ctx.counters.redis_errors);
                ctx.metrics
                    .redis_errors
                    .get_or_create(&KindLabels { kind: error.kind() })
                    .inc();
                if ctx.on_redis_unavailable == RedisUnavailable::RunWithoutDedupe {
                    warn!(job_id = %job.id, %error, "running job without a claim because Redis is unavailable and dedupe.on_redis_unavailable = \"run_without_dedupe\"");
                    return ClaimOutcome::Run(None);
                }
                let delay = backoff.next_delay();
                log_redis_wait(&error, "claim a job", backoff.attempts(), delay);
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return ClaimOutcome::Abandon,
        }
    }
}

/// Retries a Redis operation with backoff until it succeeds or `cancel`
/// fires. Returns `None` when cancelled.
async fn retry_redis<H, F, Fut>(
    ctx: &JobContext<H>,
    cancel: &CancellationToken,
    what: &'static str,
    mut operation: F,
) -> Option<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), DedupeError>>,
{
    let mut backoff = Backoff::for_reconnect();
    loop {
        match operation().await {
            Ok(()) => return Some(()),
            Err(error) => {
                Counters::bump(&ctx.counters.redis_errors);
                ctx.metrics
                    .redis_errors
                    .get_or_create(&KindLabels { kind: error.kind() })
                    .inc();
                let delay = backoff.next_delay();
                log_redis_wait(&error, what, backoff.attempts(), delay);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return None,
                }
            }
        }
    }
}

fn log_redis_wait(error: &DedupeError, what: &str, attempts: u32, delay: Duration) {
    // The dedupe client logs when Redis goes away and comes back; per job,
    // a debug line is enough.
    debug!(%error, attempts, retry_in_ms = delay.as_millis() as u64, "failed to {what}; the job waits for Redis");
}

async fn release_best_effort<H>(ctx: &JobContext<H>, job: &Job, token: Option<&ClaimToken>) {
    if let (Some(dedupe), Some(token)) = (&ctx.dedupe, token) {
        if let Err(error) = dedupe.release(&job.dedupe_id(), token).await {
            debug!(job_id = %job.id, %error, "could not release the claim; it expires with its lease");
        }
    }
}

/// Runs the handler with the timeout, turning a panic or a timeout into a
/// retryable error.
async fn run_handler<H: Handler>(ctx: &JobContext<H>, job: &Job) -> Result<(), HandlerError> {
    let call = std::panic::catch_unwind(AssertUnwindSafe(|| ctx.handler.handle(job)));
    let future = match call {
        Ok(future) => future,
        Err(panic) => return Err(panic_error(panic)),
    };
    match tokio::time::timeout(ctx.handler_timeout, AssertUnwindSafe(future).catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(panic_error(panic)),
        Err(_) => Err(HandlerError::retryable(
            "timeout",
            format!(
                "handler ran longer than worker.handler_timeout_ms ({} ms)",
                ctx.handler_timeout.as_millis()
            ),
        )),
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "handler panicked".to_owned());
    HandlerError::retryable("panic", format!("handler panicked: {message}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Writes the retry or dead-letter copy of a failed job.
async fn forward_failure<H: Handler>(
    ctx: &JobContext<H>,
    job: &Job,
    error: &HandlerError,
    cancel: &CancellationToken,
) -> Finish {
    let hop = next_hop(&ctx.tiers, job.attempt, error.kind);
    let copy = failure_copy(ctx, job, hop, error.class, &error.message);
    let rejection = match send_durably(ctx, &copy, cancel, hop).await {
        Sent::Durable => None,
        Sent::Cancelled => return Finish::Abandoned,
        Sent::Rejected(rejection) => Some(rejection),
    };

    if let (Some(rejection), Hop::Retry { .. }) = (rejection, hop) {
        // The broker will never take this copy (it is too large, say), so
        // the job cannot walk the tiers: it becomes a dead letter instead.
        warn!(job_id = %job.id, topic = copy.topic, %rejection, "retry copy rejected by Kafka; dead-lettering the job");
        let message = format!(
            "the retry copy to {} was rejected ({rejection}) after {}: {}",
            copy.topic, error.class, error.message
        );
        let hop = Hop::DeadLetter {
            attempts: job.attempt,
        };
        let dead = failure_copy(ctx, job, hop, "copy_rejected", &message);
        if let Sent::Cancelled = send_durably(ctx, &dead, cancel, hop).await {
            return Finish::Abandoned;
        }
        Counters::bump(&ctx.counters.dead_lettered);
        count_dead_letter(ctx, "copy_rejected");
        return Finish::DeadLettered;
    }

    match hop {
        Hop::Retry { tier, attempt } => {
            debug!(job_id = %job.id, attempt, topic = copy.topic, class = error.class, "job will be retried");
            Counters::bump(&ctx.counters.retried);
            Counters::bump(&ctx.counters.retried_by_tier[tier]);
            ctx.metrics
                .retries
                .get_or_create(&RetryLabels {
                    tier: ctx.tier_label(tier),
                    error_class: error.class.into(),
                })
                .inc();
            Finish::Retried
        }
        Hop::DeadLetter { attempts } => {
            info!(job_id = %job.id, attempts, topic = copy.topic, class = error.class, error = %error.message, "job dead-lettered");
            Counters::bump(&ctx.counters.dead_lettered);
            count_dead_letter(ctx, error.class);
            Finish::DeadLettered
        }
    }
}

fn count_dead_letter<H>(ctx: &JobContext<H>, class: &str) {
    ctx.metrics
        .dead_letters
        .get_or_create(&ClassLabels {
            error_class: class.into(),
        })
        .inc();
}

/// Builds the copy of a failed job for `hop`: same key, payload and user
/// headers, one fresh set of sluice headers.
fn failure_copy<H>(
    ctx: &JobContext<H>,
    job: &Job,
    hop: Hop,
    class: &str,
    message: &str,
) -> OutgoingRecord {
    let (topic, attempt, tier, due_ms) = match hop {
        Hop::Retry { tier, attempt } => (
            ctx.tier_topics[tier].clone(),
            attempt,
            ctx.tiers[tier].name.clone(),
            Some(now_ms() + ctx.tiers[tier].delay_ms as i64),
        ),
        Hop::DeadLetter { attempts } => (ctx.dlq_topic.clone(), attempts, "dlq".to_owned(), None),
    };
    let sluice = SluiceHeaders {
        job_id: Some(job.id.clone()),
        attempt: Some(attempt),
        tier: Some(tier),
        due_ms,
        error_class: Some(class.to_owned()),
        error_message: Some(message.to_owned()),
        origin: Some(job.origin.clone()),
        lineage: job.lineage.clone(),
    };
    OutgoingRecord {
        topic,
        key: job.record.key.clone(),
        payload: job.record.value.clone(),
        headers: headers::replace_sluice_headers(&job.record.headers, &sluice),
    }
}

async fn dead_letter_undecodable<H>(
    ctx: &JobContext<H>,
    record: Record,
    error: envelope::DecodeError,
    cancel: &CancellationToken,
) -> Finish {
    let (job_id, attempt, origin, lineage) = match envelope::envelope(&record) {
        Ok(envelope) => (
            envelope.id,
            envelope.attempt,
            envelope.origin,
            envelope.lineage,
        ),
        Err(_) => (
            record.position().to_string(),
            1,
            record.position(),
            Default::default(),
        ),
    };
    let sluice = SluiceHeaders {
        job_id: Some(job_id.clone()),
        attempt: Some(attempt),
        tier: Some("dlq".to_owned()),
        due_ms: None,
        error_class: Some(error.class().to_owned()),
        error_message: Some(error.to_string()),
        origin: Some(origin),
        lineage,
    };
    let copy = OutgoingRecord {
        topic: ctx.dlq_topic.clone(),
        key: record.key.clone(),
        payload: record.value.clone(),
        headers: headers::replace_sluice_headers(&headers::user_headers(&record.headers), &sluice),
    };
    if let Sent::Cancelled =
        send_durably(ctx, &copy, cancel, Hop::DeadLetter { attempts: attempt }).await
    {
        return Finish::Abandoned;
    }
    warn!(
        job_id,
        topic = record.topic,
        partition = record.partition,
        offset = record.offset,
        class = error.class(),
        %error,
        "undecodable record dead-lettered"
    );
    Counters::bump(&ctx.counters.undecodable);
    Counters::bump(&ctx.counters.dead_lettered);
    count_dead_letter(ctx, error.class());
    Finish::DeadLettered
}

/// How writing a copy ended.
enum Sent {
    Durable,
    /// `cancel` fired while waiting to retry; the source stays uncommitted.
    Cancelled,
    /// Kafka rejected a retry copy for good (only for [`Hop::Retry`]).
    Rejected(crate::produce::ProduceError),
}

/// Produces `copy` until a delivery report confirms it. A retry copy that
/// Kafka can never accept is returned as rejected; a dead letter is retried
/// whatever the error, because dropping it would lose the job.
async fn send_durably<H>(
    ctx: &JobContext<H>,
    copy: &OutgoingRecord,
    cancel: &CancellationToken,
    hop: Hop,
) -> Sent {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        // An attempt in progress is not interrupted by `cancel`: a revoke
        // waits for it within the drain deadline, so the copy usually lands
        // and the record becomes terminal before the partition moves.
        let error = match ctx.producer.send(copy).await {
            Ok(_) => return Sent::Durable,
            Err(error) => error,
        };
        Counters::bump(&ctx.counters.produce_errors);
        ctx.metrics
            .kafka_errors
            .get_or_create(&KindLabels { kind: "produce" })
            .inc();
        if !error.is_retryable() {
            if let Hop::Retry { .. } = hop {
                return Sent::Rejected(error);
            }
            error!(topic = copy.topic, %error, "Kafka rejects the dead-letter copy; the source record stays uncommitted until message.max.bytes or the topic is fixed");
        }
        let delay = backoff.next_delay();
        warn!(topic = copy.topic, %error, retry_in_ms = delay.as_millis() as u64, "failed to write a retry or dead-letter copy; the source record stays uncommitted until it succeeds");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Sent::Cancelled,
        }
    }
}
