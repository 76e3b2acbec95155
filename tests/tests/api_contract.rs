//! The API contract: schemathesis (from PyPI, installed by `scripts/install-deps.sh`) generates
//! requests from `docs/openapi.yaml` — examples, boundary values, fuzzed and schema-violating
//! bodies, and stateful sequences that follow the spec's links — against a real node that holds
//! the agent role (answering through the fake Messages API), and checks every response against
//! the spec: no 5xx, only documented status codes and content types, response bodies and SSE
//! events that match their schemas, schema-valid requests accepted and invalid ones refused.
//! The few operations whose rules a JSON schema cannot state are listed, with the reason, in
//! `tests/api/schemathesis.toml`. The run must end with zero failures.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{AgentHttpNode, agent_http_node, runtime, scenario};

/// The schemathesis this test is pinned to (the version `scripts/install-deps.sh` installs).
const SCHEMATHESIS: &str = "4.32.5";

#[test]
fn the_server_and_docs_openapi_yaml_agree() {
    scenario(body);
}

fn body() -> Result<()> {
    let version = Command::new("schemathesis")
        .arg("--version")
        .output()
        .context("schemathesis is not installed (scripts/install-deps.sh installs it from PyPI)")?;
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    ensure!(
        version.contains(SCHEMATHESIS),
        "schemathesis {SCHEMATHESIS} is needed (scripts/install-deps.sh), found: {version}"
    );

    let rt = runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
    let AgentHttpNode {
        node, base, token, ..
    } = agent_http_node("contract", &fake.node_env())?;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let report = node.dir.join("schemathesis");
    let out = Command::new("schemathesis")
        .arg("--config-file")
        .arg(root.join("tests/api/schemathesis.toml"))
        .arg("run")
        .arg(root.join("docs/openapi.yaml"))
        .args(["--url", &base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--max-examples", "30", "--seed", "1"])
        .args(["--workers", "1", "--request-timeout", "10", "--no-color"])
        .arg("--report-dir")
        .arg(&report)
        .current_dir(&node.dir)
        .output()
        .context("running schemathesis")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    if !out.status.success() {
        bail!(
            "schemathesis found failures ({}):\n{}\n{}",
            out.status,
            tail(&stdout, 200),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A run that tested nothing also exits 0: make sure every operation was exercised.
    ensure!(
        stdout.contains("Tested: ") && !stdout.contains("Tested: 0"),
        "schemathesis tested no operation:\n{}",
        tail(&stdout, 60)
    );
    ensure!(
        stdout.contains(" passed"),
        "no passing case:\n{}",
        tail(&stdout, 60)
    );
    node.assert_no_panic()?;
    Ok(())
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
