//! Options and helpers shared by the operator commands.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use pipeline::config::KafkaSettings;

use crate::settings::ServiceSettings;

/// Which cluster to talk to.
#[derive(Debug, Args)]
pub struct KafkaArgs {
    /// Bootstrap servers; overrides `kafka.brokers` of --config.
    #[arg(long, env = "SLUICE_KAFKA__BROKERS", hide_env_values = true)]
    brokers: Option<String>,
    /// Settings file to take the Kafka section from (brokers, SASL, TLS).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl KafkaArgs {
    pub fn settings(&self) -> anyhow::Result<KafkaSettings> {
        let mut kafka = match &self.config {
            Some(path) => ServiceSettings::load(path)?.kafka,
            None => KafkaSettings::default(),
        };
        if let Some(brokers) = &self.brokers {
            kafka.brokers = brokers.clone();
        }
        Ok(kafka)
    }
}

/// A `--partitions 0,2,5` list.
#[derive(Debug, Clone)]
pub struct Partitions(pub Vec<i32>);

/// Parses `--partitions 0,2,5`.
pub fn parse_partitions(text: &str) -> Result<Partitions, String> {
    text.split(',')
        .map(|part| {
            part.trim()
                .parse::<i32>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| format!("invalid partition {part:?}: use numbers such as 0,2,5"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Partitions)
}

/// Parses a rate such as `500` or `500/s` (records per second).
pub fn parse_rate(text: &str) -> Result<u32, String> {
    text.trim_end_matches("/s")
        .parse::<u32>()
        .ok()
        .filter(|rate| *rate > 0)
        .ok_or_else(|| {
            format!("invalid rate {text:?}: use records per second such as 500 or 500/s")
        })
}

/// Asks on a terminal whether to go on; `yes` skips the question. Without a
/// terminal and without `yes` nothing is written, so a script cannot
/// change a live cluster by accident.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question} needs confirmation: pass --yes to go on without a terminal");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_and_rates_parse_or_explain() {
        assert_eq!(parse_partitions("0, 2,5").unwrap().0, vec![0, 2, 5]);
        assert!(parse_partitions("0,x").unwrap_err().contains("\"x\""));
        assert_eq!(parse_rate("500/s").unwrap(), 500);
        assert_eq!(parse_rate("20").unwrap(), 20);
        assert!(parse_rate("0").is_err());
    }
}
