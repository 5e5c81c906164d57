//! HTTP push: POST each job's payload to an endpoint.
//!
//! The job id travels as `Idempotency-Key`, so the endpoint can drop repeats
//! that at-least-once delivery allows. 2xx is success; 408, 429, 5xx,
//! connection errors and timeouts are retryable; other statuses, redirects
//! included, are permanent.

use anyhow::Context;
use pipeline::{HandlerError, Job};
use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;

use pipeline::telemetry::trace;
use tracing::field::Empty;
use tracing::Instrument;

use crate::settings::HttpSettings;

/// Response body bytes quoted in an error message.
const MAX_BODY_IN_ERROR: usize = 200;

pub struct HttpPush {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpPush {
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(&settings.url)
            .with_context(|| format!("invalid handler.url {:?}", settings.url))?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout())
            .pool_max_idle_per_host(settings.max_idle_connections)
            // A redirect would turn the POST into a GET on most statuses, so
            // a 3xx is reported as a permanent failure instead of followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("failed to build the HTTP client")?;
        Ok(HttpPush { client, url })
    }

    pub async fn push(&self, job: &Job) -> Result<(), HandlerError> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, content_type(job.payload()))
            .header("Idempotency-Key", &job.id)
            .header("Sluice-Attempt", job.attempt.to_string());
        // A `--dedupe bypass` replay runs a job again on purpose. With this
        // header an endpoint that honors Idempotency-Key can accept the repeat.
        if let Some(generation) = &job.lineage.replay_generation {
            request = request.header("Sluice-Replay-Generation", generation.as_str());
        }

        // With tracing on, the request gets a client span of its own and
        // carries that context downstream; otherwise the job's trace headers
        // pass through.
        let span = trace::enabled().then(|| self.client_span());
        match &span {
            Some(span) => {
                for (name, value) in trace::context_headers(span) {
                    request = request.header(name, value);
                }
            }
            None => {
                for name in ["traceparent", "tracestate"] {
                    if let Some(value) = job
                        .header(name)
                        .and_then(|v| HeaderValue::from_bytes(v).ok())
                    {
                        request = request.header(HeaderName::from_static(name), value);
                    }
                }
            }
        }

        let sent = request.body(job.payload().to_vec()).send();
        let sent = match &span {
            Some(span) => sent.instrument(span.clone()).await,
            None => sent.await,
        };
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                let error = classify_error(error);
                if let Some(span) = &span {
                    trace::record_error(span, error.class, &error.message);
                }
                return Err(error);
            }
        };
        let status = response.status();
        if let Some(span) = &span {
            span.record("http.response.status_code", status.as_u16());
        }
        if status.is_success() {
            return Ok(());
        }

        let body = response.text().await.unwrap_or_default();
        // One line: an HTML error page would otherwise span many log lines.
        let body: String = pipeline::envelope::headers::truncate(&body, MAX_BODY_IN_ERROR)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let error = classify_status(status, &body);
        if let Some(span) = &span {
            trace::record_error(span, status.as_str(), &error.message);
        }
        Err(error)
    }

    /// A client span per request, named and attributed after the
    /// OpenTelemetry HTTP semantic conventions.
    fn client_span(&self) -> tracing::Span {
        tracing::info_span!(
            "POST",
            otel.kind = "client",
            otel.status_code = Empty,
            otel.status_description = Empty,
            http.request.method = "POST",
            url.full = %self.url,
            server.address = self.url.host_str().unwrap_or_default(),
            server.port = self.url.port_or_known_default().unwrap_or_default(),
            http.response.status_code = Empty,
            error.type = Empty,
        )
    }
}

fn content_type(payload: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

fn classify_status(status: StatusCode, body: &str) -> HandlerError {
    let message = format!("endpoint returned {status}: {body}");
    match status.as_u16() {
        408 => HandlerError::retryable("http_408", message),
        429 => HandlerError::retryable("http_429", message),
        500..=599 => HandlerError::retryable("http_5xx", message),
        400..=499 => HandlerError::permanent("http_4xx", message),
        _ => HandlerError::permanent("http_status", message),
    }
}

fn classify_error(error: reqwest::Error) -> HandlerError {
    let message = format!("request failed: {error}");
    if error.is_timeout() {
        HandlerError::retryable("http_timeout", message)
    } else if error.is_connect() {
        HandlerError::retryable("http_connect", message)
    } else {
        HandlerError::retryable("http_error", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::route::FailureKind;

    #[test]
    fn statuses_are_classified() {
        let kind = |code| classify_status(StatusCode::from_u16(code).unwrap(), "").kind;
        assert_eq!(kind(408), FailureKind::Retryable);
        assert_eq!(kind(429), FailureKind::Retryable);
        assert_eq!(kind(503), FailureKind::Retryable);
        assert_eq!(kind(500), FailureKind::Retryable);
        assert_eq!(kind(400), FailureKind::Permanent);
        assert_eq!(kind(404), FailureKind::Permanent);
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY, "x").class,
            "http_5xx"
        );
    }
}
