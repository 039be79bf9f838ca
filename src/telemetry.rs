//! Logs: human-readable on a terminal, JSON lines otherwise (or as `log.format` says), to
//! standard error. `RUST_LOG` overrides `log.level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
    // Libraries' noise stays out unless RUST_LOG asks for it: the AWS SDK's warnings while it
    // looks for a region and credentials (the loader says in one line what was not found), and
    // sqlx's slow-acquire warnings (the loader reports database trouble itself).
    let quiet = ",aws_config=error,sqlx::pool::acquire=error";
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{}{quiet}", config.level)))
        .unwrap_or_else(|_| EnvFilter::new(format!("info{quiet}")));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
    // Already set (tests that build several apps in one process): keep the first.
    let _ = result;
}
