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
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = job
                .header(name)
                .and_then(|v| HeaderValue::from_bytes(v).ok())
            {
                request = request.header(HeaderName::from_static(name), value);
            }
        }
        let response = request
            .body(job.payload().to_vec())
            .send()
            .await
            .map_err(classify_error)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        // One line: an HTML error page would otherwise span many log lines.
        let body: String = pipeline::envelope::headers::truncate(&body, MAX_BODY_IN_ERROR)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Err(classify_status(status, &body))
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
