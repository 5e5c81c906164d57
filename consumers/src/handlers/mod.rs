//! Built-in handlers and the one the settings file selects.

pub mod http;

use pipeline::{Handler, HandlerError, Job};

use crate::settings::HandlerSettings;

/// The handler chosen by `[handler] kind`.
pub enum BuiltIn {
    Http(http::HttpPush),
    Noop,
}

impl BuiltIn {
    pub fn from_settings(settings: &HandlerSettings) -> anyhow::Result<Self> {
        Ok(match settings {
            HandlerSettings::Http(http) => BuiltIn::Http(http::HttpPush::new(http)?),
            HandlerSettings::Noop {} => BuiltIn::Noop,
        })
    }
}

impl Handler for BuiltIn {
    async fn handle(&self, job: &Job) -> Result<(), HandlerError> {
        match self {
            BuiltIn::Http(http) => http.push(job).await,
            BuiltIn::Noop => Ok(()),
        }
    }
}
