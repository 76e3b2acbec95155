//! Sandbox latency benchmark against the local Docker engine.
//!
//! Measures (a) the overhead of a tool call in a warm container (50 × `true`), (b) a first call
//! that has to create and start the container (5 runs), and (c) `docker run --rm` via the CLI as
//! a reference. Run with `cargo run -p iom-node --example sandbox_bench [--release]`.

use std::time::{Duration, Instant};

use iom_node::agent::sandbox::image::{DEFAULT_IMAGE, build_default_image};
use iom_node::agent::sandbox::{Sandbox, SandboxConfig};
use serde_json::json;

const WARM_CALLS: usize = 50;
const COLD_RUNS: usize = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn summary(label: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{label:<48} n={:<3} p50={:<9} p99={:<9} min={:<9} max={}",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(v[0]),
        ms(v[v.len() - 1])
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = tempfile::tempdir()?;
    let sandbox = Sandbox::connect(
        SandboxConfig::default(),
        data.path().to_path_buf(),
        format!("bench{}", std::process::id()),
    )
    .await?;
    if sandbox.docker().inspect_image(DEFAULT_IMAGE).await.is_err() {
        let t = Instant::now();
        build_default_image(sandbox.docker(), None).await?;
        println!("built {DEFAULT_IMAGE} in {}", ms(t.elapsed()));
    }
    let input = json!({"command": "true"});

    // (a) warm container
    sandbox.ensure_container("warm").await?;
    for _ in 0..5 {
        sandbox.run_tool("warm", "bash", &input).await;
    }
    let mut warm = Vec::with_capacity(WARM_CALLS);
    for _ in 0..WARM_CALLS {
        let t = Instant::now();
        let out = sandbox.run_tool("warm", "bash", &input).await;
        warm.push(t.elapsed());
        if out.is_error {
            return Err(format!("warm call failed: {}", out.output).into());
        }
    }

    // (b) cold: create + start + exec
    let mut cold = Vec::with_capacity(COLD_RUNS);
    for i in 0..COLD_RUNS {
        let conv = format!("cold{i}");
        let t = Instant::now();
        let out = sandbox.run_tool(&conv, "bash", &input).await;
        cold.push(t.elapsed());
        if out.is_error {
            return Err(format!("cold call failed: {}", out.output).into());
        }
    }
    sandbox.shutdown().await;

    // (c) reference: docker run --rm via the CLI
    let mut cli = Vec::with_capacity(COLD_RUNS);
    for _ in 0..COLD_RUNS {
        let t = Instant::now();
        let st = tokio::process::Command::new("docker")
            .args(["run", "--rm", "--network", "none", DEFAULT_IMAGE, "true"])
            .status()
            .await?;
        cli.push(t.elapsed());
        if !st.success() {
            return Err("docker run failed".into());
        }
    }

    println!(
        "sandbox_bench ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    summary("(a) warm tool call, bash `true`", warm);
    summary("(b) cold first call (create+start+exec)", cold);
    summary("(c) `docker run --rm iom-sandbox:1 true` (CLI)", cli);
    Ok(())
}
