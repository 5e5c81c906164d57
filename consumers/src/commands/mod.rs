//! One module per subcommand.

pub mod common;
pub mod config;
pub mod dlq;
pub mod group;
pub mod probe;
pub mod produce;
pub mod replay;
pub mod status;
pub mod topics;
pub mod work;
