//! Runs the fake Anthropic Messages API server on its own, for manual runs and benchmarks.
//!
//! ```text
//! fake-anthropic [--port PORT] [--key KEY] [--instant]
//! ```
//!
//! Prints the base URL (for `ANTHROPIC_BASE_URL`) on stdout, then serves until Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;

use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};

const USAGE: &str = "usage: fake-anthropic [--port PORT] [--key KEY] [--instant]";

fn parse_args() -> Result<FakeConfig, String> {
    let mut cfg = FakeConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let port: u16 = args
                    .next()
                    .ok_or("--port needs a value")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?;
                cfg.addr = SocketAddr::from(([127, 0, 0, 1], port));
            }
            "--key" => cfg.api_key = args.next().ok_or("--key needs a value")?,
            "--instant" => cfg.instant = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    let server = match FakeAnthropic::start(cfg).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("fake-anthropic: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", server.url());
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("fake-anthropic: cannot wait for Ctrl-C: {e}");
    }
    match server.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-anthropic: {e}");
            ExitCode::FAILURE
        }
    }
}
