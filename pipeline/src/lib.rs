//! sluice: a job pipeline on Apache Kafka.
//!
//! The modules follow a job's path:
//!
//! - [`produce`]: producers append jobs (records) to the main topic.
//! - [`envelope`]: a record's sluice headers and the [`envelope::Job`] decoded from it.
//! - [`consume`]: a group member fetches records, runs them per key lane,
//!   and commits only the contiguous prefix of terminal offsets.
//! - [`handler`]: the code that does a job's work.
//! - [`dedupe`]: Redis claims and done markers that make handling idempotent.
//! - [`route`]: where a failed job goes next (a retry tier or the
//!   dead-letter topic).
//! - [`admin`]: topic creation and offset queries.
//! - [`telemetry`]: what a worker did.
//!
//! [`config`] holds the typed settings of all of them, [`kafka`] the
//! librdkafka settings they share, and [`backoff`] the one retry delay policy.

pub mod admin;
pub mod backoff;
pub mod config;
pub mod consume;
pub mod dedupe;
pub mod envelope;
pub mod handler;
pub mod kafka;
pub mod produce;
pub mod recover;
pub mod route;
pub mod telemetry;

pub use consume::{Worker, WorkerError};
pub use envelope::Job;
pub use handler::{Handler, HandlerError};
