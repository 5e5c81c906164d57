//! One trace per job, carried in Kafka headers as W3C trace context.
//!
//! Every hop is a child of the hop before it:
//!
//! ```text
//! send jobs ─► process jobs ─► send jobs.retry-30s ─► process jobs.retry-30s
//!          ─► send jobs.retry-5m ─► process jobs.retry-5m ─► send jobs.dlq
//! ```
//!
//! A producer span starts per record and its context is written to that
//! record's `traceparent` and `tracestate` headers, replacing any there. A
//! process span continues the context of the record it handles, so a record
//! from a client that sent no trace context starts a new trace, and records
//! of one fetched batch each keep their own.
//!
//! Names and attributes follow the OpenTelemetry semantic conventions for
//! messaging, version [`SEMCONV_VERSION`], for Kafka: span names
//! `send <topic>` and `process <topic>`, `messaging.system = "kafka"`,
//! `messaging.operation.type`, `messaging.destination.name`,
//! `messaging.destination.partition.id`, `messaging.kafka.offset`,
//! `messaging.kafka.message.key`, `messaging.consumer.group.name`, and
//! `error.type` on failures. sluice adds `sluice.job.id`, `sluice.attempt`,
//! `sluice.tier` and `sluice.outcome`.
//!
//! Spans exist only while tracing is [`enable`]d, which the `sluice` binary
//! does when an OTLP endpoint is configured. Otherwise no span is created and
//! trace headers pass through untouched.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::{HeaderList, Record};

/// Version of the OpenTelemetry semantic conventions the spans follow.
pub const SEMCONV_VERSION: &str = "1.27.0";

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span creation and context injection on. Call it once after
/// installing a `tracing-opentelemetry` layer.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

struct HeaderExtractor<'a>(&'a HeaderList);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .and_then(|(_, value)| value.as_deref())
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// Collected `traceparent`/`tracestate` pairs.
#[derive(Default)]
struct Collected(Vec<(String, String)>);

impl Injector for Collected {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// Returns the W3C trace headers of `span` (empty when the span is not
/// recorded).
pub fn context_headers(span: &Span) -> Vec<(String, String)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut collected = Collected::default();
    TraceContextPropagator::new().inject_context(&context, &mut collected);
    collected.0
}

/// Replaces the trace headers of `headers` with the context of `span`.
pub fn inject(span: &Span, headers: &mut HeaderList) {
    let fresh = context_headers(span);
    if fresh.is_empty() {
        return;
    }
    headers.retain(|(name, _)| {
        !name.eq_ignore_ascii_case(TRACEPARENT) && !name.eq_ignore_ascii_case(TRACESTATE)
    });
    headers.extend(fresh.into_iter().map(|(k, v)| (k, Some(v.into_bytes()))));
}

/// Starts the producer span of one record to `topic`, a child of the
/// current span (the process span of a job being forwarded) or a new root.
pub fn send_span(topic: &str, job_id: Option<&str>) -> Span {
    tracing::info_span!(
        "send",
        otel.name = %format_args!("send {topic}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %topic,
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        sluice.job.id = job_id.unwrap_or_default(),
        error.type = Empty,
    )
}

/// Starts the process span of `record`, continuing the trace context in its
/// headers or starting a new trace when it has none.
pub fn process_span(record: &Record, group_id: &str) -> Span {
    let key = record
        .key
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {}", record.topic),
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %record.topic,
        messaging.destination.partition.id = %record.partition,
        messaging.kafka.offset = record.offset,
        messaging.kafka.message.key = %key,
        messaging.consumer.group.name = %group_id,
        sluice.job.id = Empty,
        sluice.attempt = Empty,
        sluice.tier = Empty,
        sluice.outcome = Empty,
        error.type = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(&record.headers));
    // A context without a valid span means no trace headers: the job starts
    // a new trace instead of joining whatever span is current.
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    } else {
        let _ = span.set_parent(opentelemetry::Context::new());
    }
    // Log lines inside the span carry these ids, so a log line leads to its
    // trace.
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span.record("trace_id", tracing::field::display(span_context.trace_id()));
    span.record("span_id", tracing::field::display(span_context.span_id()));
    span
}

/// Marks `span` failed with a bounded error class and a message.
pub fn record_error(span: &Span, class: &str, message: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", message);
    span.record("error.type", class);
}
