//! One module per subcommand.

pub mod config;
pub mod produce;
pub mod status;
pub mod topics;
pub mod work;
