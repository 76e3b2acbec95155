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
            ExitCode::from(1)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
        Err(Failure::Quiet) => ExitCode::from(1),
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
