//! The handler API: the code that does a job's work.

use std::future::Future;

use crate::envelope::Job;
use crate::route::FailureKind;

/// Why a handler did not finish a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct HandlerError {
    pub kind: FailureKind,
    /// Short, bounded error class (for example `http_503` or `timeout`). It is
    /// written to the retry and dead-letter copies and used as a metric
    /// label, so it must come from a fixed set, never from input data.
    pub class: &'static str,
    /// Human-readable detail; cut to 512 bytes on the copies.
    pub message: String,
}

impl HandlerError {
    /// Builds a failure that may pass on a later attempt, so the job walks
    /// the tiers.
    pub fn retryable(class: &'static str, message: impl Into<String>) -> Self {
        HandlerError {
            kind: FailureKind::Retryable,
            class,
            message: message.into(),
        }
    }

    /// Builds a failure that no retry can fix, so the job goes to the
    /// dead-letter topic.
    pub fn permanent(class: &'static str, message: impl Into<String>) -> Self {
        HandlerError {
            kind: FailureKind::Permanent,
            class,
            message: message.into(),
        }
    }
}

/// Runs jobs. One value serves every job of a worker, concurrently.
///
/// The worker catches a panic in `handle` and treats it as a retryable error
/// of class `panic`, and a run longer than `worker.handler_timeout_ms` as a
/// retryable error of class `timeout` (the future is dropped). Use
/// [`Job::id`] as the idempotency key of any side effect downstream: a job
/// can run more than once when a member dies between the side effect and the
/// done marker.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, job: &Job) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A shared handler, for example one whose counters a test or a benchmark
/// reads while the worker runs.
impl<H: Handler> Handler for std::sync::Arc<H> {
    fn handle(&self, job: &Job) -> impl Future<Output = Result<(), HandlerError>> + Send {
        H::handle(self, job)
    }
}
