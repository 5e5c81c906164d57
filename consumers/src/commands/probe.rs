//! `sluice probe URL`: a health check for images that have no curl.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// URL to fetch, for example http://127.0.0.1:9464/readyz.
    url: String,
    /// Seconds to wait for the response.
    #[arg(long, default_value_t = 3)]
    timeout_s: u64,
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        .build()?;
    match client.get(&args.url).send().await {
        Ok(response) if response.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            eprintln!("{} returned {status}: {}", args.url, body.trim());
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            eprintln!("failed to reach {}: {error}", args.url);
            Ok(ExitCode::FAILURE)
        }
    }
}
