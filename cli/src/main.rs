//! `iom`: the command line. Thin: parse arguments, set up logging, load configuration, and call
//! into the node or its local API.
// A binary: nothing here is reachable from outside, so `pub` only marks module interfaces.
#![allow(unreachable_pub)]

mod args;
mod commands;
mod output;
mod progress;
mod unit;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Cli;

/// A failure that maps to an exit code.
#[derive(Debug)]
pub enum Failure {
    /// Exit 1: the operation failed.
    Failed(anyhow::Error),
    /// Exit 2: bad usage (arguments or configuration).
    Usage(anyhow::Error),
    /// Exit 1 with nothing more to say (the output told what is wrong).
    Quiet,
    /// Exit 3: the agent's daily token budget is used up (`iom ask`).
    Budget(anyhow::Error),
    /// Exit 4: the request is queued, not answered yet (`iom ask --no-wait`, or the agent
    /// is unreachable); the sentence says where it stands.
    Queued(String),
}

/// Exit codes (documented in docs/cli.md).
pub mod exit {
    /// The operation failed.
    pub const FAILED: u8 = 1;
    /// Bad usage.
    pub const USAGE: u8 = 2;
    /// The daily token budget is used up.
    pub const BUDGET: u8 = 3;
    /// Queued, not answered yet.
    pub const QUEUED: u8 = 4;
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Failed(e.into())
    }
}

fn main() -> ExitCode {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IOM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,iom_node=info")),
        )
        .with_writer(std::io::stderr)
        .finish()
        .with(CountProblems)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Failed(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(exit::FAILED)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(exit::USAGE)
        }
        Err(Failure::Budget(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(exit::BUDGET)
        }
        Err(Failure::Queued(note)) => {
            eprintln!("queued: {note}");
            ExitCode::from(exit::QUEUED)
        }
        Err(Failure::Quiet) => ExitCode::from(exit::FAILED),
    }
}

/// Counts every WARN and ERROR event for the metrics (`iom_errors_total`).
struct CountProblems;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountProblems {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let m = iom_node::metrics::node();
        match *event.metadata().level() {
            tracing::Level::WARN => m.log_warnings.inc(),
            tracing::Level::ERROR => m.log_errors.inc(),
            _ => {}
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}
