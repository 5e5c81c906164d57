//! The settings file of the `sluice` binary: the pipeline's sections plus
//! `[handler]`.

use std::path::Path;
use std::time::Duration;

use pipeline::config::{
    self, ConfigError, DedupeSettings, KafkaSettings, PipelineSettings, RetrySettings,
    TopicSettings, WorkerSettings,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    #[serde(default)]
    pub kafka: KafkaSettings,
    pub topic: TopicSettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub dedupe: DedupeSettings,
    pub worker: WorkerSettings,
    pub handler: HandlerSettings,
    #[serde(default)]
    pub server: ServerSettings,
}

/// The metrics and health endpoints of `sluice work`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// `host:port` to serve `/metrics`, `/healthz` and `/readyz` on; port 0
    /// picks a free port and logs it.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "0.0.0.0:9464".to_owned()
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: default_listen(),
        }
    }
}

/// Which built-in handler runs the jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HandlerSettings {
    /// POST each payload to a URL.
    Http(HttpSettings),
    /// Succeed at once without doing anything; for benchmarks and dry runs.
    Noop {},
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Endpoint that receives `POST` requests, `http://` or `https://`.
    pub url: String,
    /// Timeout of one request, connection included. Keep it below
    /// `worker.handler_timeout_ms`.
    #[serde(default = "default_request_timeout_ms")]
    pub timeout_ms: u64,
    /// Idle connections kept open to the endpoint for reuse.
    #[serde(default = "default_max_idle_connections")]
    pub max_idle_connections: usize,
}

fn default_request_timeout_ms() -> u64 {
    10_000
}

fn default_max_idle_connections() -> usize {
    64
}

impl HttpSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl ServiceSettings {
    /// Reads and validates the settings file with its environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let settings: ServiceSettings = config::load(path)?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pipeline().validate()?;
        pipeline::kafka::check_properties(&self.kafka)?;
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "server.listen",
                value: format!("{:?}", self.server.listen),
                reason: "must be an IP address and port such as \"0.0.0.0:9464\"".to_owned(),
            });
        }
        if let HandlerSettings::Http(http) = &self.handler {
            if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    key: "handler.url",
                    value: format!("{:?}", http.url),
                    reason: "must be an http:// or https:// URL".to_owned(),
                });
            }
            if http.timeout_ms == 0 || http.timeout_ms >= self.worker.handler_timeout_ms {
                return Err(ConfigError::Invalid {
                    key: "handler.timeout_ms",
                    value: http.timeout_ms.to_string(),
                    reason: format!(
                        "must be positive and below worker.handler_timeout_ms ({}) so the request times out before the job does",
                        self.worker.handler_timeout_ms
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn pipeline(&self) -> PipelineSettings {
        PipelineSettings {
            kafka: self.kafka.clone(),
            topic: self.topic.clone(),
            retry: self.retry.clone(),
            dedupe: self.dedupe.clone(),
            worker: self.worker.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServiceSettings, String> {
        let settings: ServiceSettings = ::config::Config::builder()
            .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| e.to_string())?;
        settings.validate().map_err(|e| e.to_string())?;
        Ok(settings)
    }

    const BASE: &str = "[topic]\nname = \"jobs\"\n[worker]\ngroup_id = \"g\"\n";

    #[test]
    fn http_handler_parses() {
        let text = format!("{BASE}[handler]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/hook\"\n");
        let settings = parse(&text).unwrap();
        assert!(matches!(settings.handler, HandlerSettings::Http(ref h) if h.timeout_ms == 10_000));
    }

    #[test]
    fn unknown_handler_key_is_rejected() {
        let text = format!("{BASE}[handler]\nkind = \"http\"\nurl = \"http://x\"\nretries = 3\n");
        let error = parse(&text).unwrap_err();
        assert!(error.contains("retries"), "{error}");
    }

    #[test]
    fn unknown_handler_kind_is_rejected() {
        let error = parse(&format!("{BASE}[handler]\nkind = \"grpc\"\n")).unwrap_err();
        assert!(error.contains("grpc"), "{error}");
    }

    #[test]
    fn bad_url_and_timeout_are_rejected() {
        let text = format!("{BASE}[handler]\nkind = \"http\"\nurl = \"ftp://x\"\n");
        assert!(parse(&text).unwrap_err().contains("handler.url"));
        let text =
            format!("{BASE}[handler]\nkind = \"http\"\nurl = \"http://x\"\ntimeout_ms = 60000\n");
        assert!(parse(&text).unwrap_err().contains("handler.timeout_ms"));
    }

    #[test]
    fn reserved_kafka_property_is_rejected() {
        let text = format!(
            "{BASE}[handler]\nkind = \"noop\"\n[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n"
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("kafka.properties"), "{error}");
        assert!(error.contains("enable.auto.commit"), "{error}");
    }
}
