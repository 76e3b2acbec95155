//! An MCP server's stdio, carried by the Docker attach stream of its hardened container.
//!
//! The server is the container's main process (a background process would get `/dev/null` as
//! stdin). The container is created with `open_stdin`, `stdin_once`, no TTY (a TTY echoes and
//! mangles newlines) and attached **before** it starts, so no early output is lost.
//!
//! Between Docker's stdout and the MCP client sits a guard (`spawn_guard`): it passes on
//! JSON-RPC lines only. A line that is not JSON-RPC, or one longer than the line cap, is a
//! fault: the stream to the client is closed (pending calls fail at once) and the fault says
//! what the server printed, so the supervisor can report it and restart the server. Stderr
//! goes to the node's log and a short tail is kept for error messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::{AttachContainerOptionsBuilder, CreateContainerOptionsBuilder};
use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Notify;

use crate::agent::sandbox::container::{LABEL_NODE, LABEL_SANDBOX, hardened_body};
use crate::agent::sandbox::policy::{ResolvedMount, SandboxConfig};

/// Label naming the MCP server a container runs.
pub const LABEL_MCP: &str = "iom.mcp";
/// Bytes of stderr kept for error messages.
const STDERR_TAIL: usize = 2048;
/// Bytes of a garbage line quoted in the fault.
const QUOTE: usize = 160;

/// What went wrong with a server's output, shared between the guard and the supervisor.
#[derive(Debug, Default)]
pub struct Health {
    fault: Mutex<Option<String>>,
    stderr: Mutex<Vec<u8>>,
    /// Notified when a fault is recorded or the output ends.
    pub changed: Notify,
}

impl Health {
    /// The fault, if one was recorded.
    pub fn fault(&self) -> Option<String> {
        lock(&self.fault).clone()
    }

    /// Records a fault (the first one wins).
    pub fn set_fault(&self, why: String) {
        let mut f = lock(&self.fault);
        if f.is_none() {
            *f = Some(why);
        }
        drop(f);
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    /// The last lines the server wrote to stderr (lossy UTF-8, trimmed).
    pub fn stderr_tail(&self) -> String {
        let s = lock(&self.stderr);
        let text = String::from_utf8_lossy(&s);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    fn push_stderr(&self, bytes: &[u8]) {
        let mut s = lock(&self.stderr);
        s.extend_from_slice(bytes);
        let over = s.len().saturating_sub(STDERR_TAIL);
        if over > 0 {
            s.drain(..over);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A started server: its container, the client's ends of its stdio, and its health.
pub struct Launched {
    /// The container id.
    pub container: String,
    /// The server's stdout, JSON-RPC lines only (from the guard).
    pub stdout: DuplexStream,
    /// The server's stdin.
    pub stdin: std::pin::Pin<Box<dyn AsyncWrite + Send>>,
    /// Faults and stderr.
    pub health: Arc<Health>,
    /// The guard task (ends with the output).
    pub guard: tokio::task::JoinHandle<()>,
}

/// What a launch needs.
pub struct LaunchSpec<'a> {
    /// The sandbox limits (memory, CPU, pids) the container gets.
    pub cfg: &'a SandboxConfig,
    /// The image.
    pub image: &'a str,
    /// The server's argv.
    pub command: Vec<String>,
    /// Extra environment (after the sandbox's own `HOME`/`PATH`).
    pub env: Vec<String>,
    /// Validated mounts.
    pub mounts: &'a [ResolvedMount],
    /// Node id (label) and container name.
    pub node: &'a str,
    /// Container name.
    pub name: String,
    /// Server name (label).
    pub server: &'a str,
    /// Longest line accepted from stdout.
    pub max_line: usize,
}

/// Creates the hardened container, attaches to it, starts it, and spawns the guard.
pub async fn launch(docker: &Docker, spec: LaunchSpec<'_>) -> Result<Launched, String> {
    let labels = HashMap::from([
        (LABEL_SANDBOX.to_string(), "1".to_string()),
        (LABEL_NODE.to_string(), spec.node.to_string()),
        (LABEL_MCP.to_string(), spec.server.to_string()),
    ]);
    let mut body = hardened_body(
        spec.cfg,
        spec.image,
        spec.command,
        labels,
        None,
        spec.mounts,
    );
    body.open_stdin = Some(true);
    body.stdin_once = Some(true);
    body.attach_stdin = Some(true);
    body.attach_stdout = Some(true);
    body.attach_stderr = Some(true);
    body.tty = Some(false);
    body.working_dir = Some("/tmp".into());
    if let Some(env) = body.env.as_mut() {
        env.extend(spec.env);
    }
    // A leftover of the same name (an earlier run of this node) is replaced.
    crate::agent::sandbox::container::remove_container(docker, &spec.name).await;
    let opts = CreateContainerOptionsBuilder::default()
        .name(&spec.name)
        .build();
    let created = docker
        .create_container(Some(opts), body)
        .await
        .map_err(|e| match &e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            } if message.to_lowercase().contains("image") => format!(
                "image {} not found; build it with `iom sandbox build --python` (see docs/mcp.md)",
                spec.image
            ),
            _ => format!("cannot create the container: {e}"),
        })?;
    let id = created.id;
    let attach = AttachContainerOptionsBuilder::default()
        .stdin(true)
        .stdout(true)
        .stderr(true)
        .stream(true)
        .build();
    let attached = match docker.attach_container(&id, Some(attach)).await {
        Ok(a) => a,
        Err(e) => {
            crate::agent::sandbox::container::remove_container(docker, &id).await;
            return Err(format!("cannot attach to the container: {e}"));
        }
    };
    if let Err(e) = docker.start_container(&id, None).await {
        crate::agent::sandbox::container::remove_container(docker, &id).await;
        return Err(format!("cannot start the container: {e}"));
    }
    let health = Arc::new(Health::default());
    let (client_end, guard_end) = tokio::io::duplex(64 * 1024);
    let guard = spawn_guard(attached.output, guard_end, health.clone(), spec.max_line);
    Ok(Launched {
        container: id,
        stdout: client_end,
        stdin: attached.input,
        health,
        guard,
    })
}

type Output = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;

/// Passes the server's JSON-RPC lines on to `to`; records a fault for anything else.
fn spawn_guard(
    mut output: Output,
    mut to: DuplexStream,
    health: Arc<Health>,
    max_line: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut line: Vec<u8> = Vec::new();
        while let Some(item) = output.next().await {
            let bytes = match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => message,
                Ok(LogOutput::StdErr { message }) => {
                    tracing::debug!(target: "iom::mcp", stderr = %String::from_utf8_lossy(&message).trim_end());
                    health.push_stderr(&message);
                    continue;
                }
                Ok(LogOutput::StdIn { .. }) => continue,
                Err(e) => {
                    tracing::debug!(cause = %e, "MCP server output stream failed");
                    break;
                }
            };
            let mut rest: &[u8] = &bytes;
            while !rest.is_empty() {
                let nl = rest.iter().position(|b| *b == b'\n');
                let (part, more) = match nl {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &[][..]),
                };
                line.extend_from_slice(part);
                if line.len() > max_line {
                    health.set_fault(format!("it flooded stdout: a line over {max_line} bytes"));
                    return;
                }
                if nl.is_some() {
                    if let Err(why) = check_line(&line) {
                        health.set_fault(why);
                        return;
                    }
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        line.push(b'\n');
                        if to.write_all(&line).await.is_err() {
                            return;
                        }
                    }
                    line.clear();
                }
                rest = more;
            }
        }
        // The output ended (the server exited): the client sees end of file.
        let _ = to.shutdown().await;
        health.changed.notify_waiters();
        health.changed.notify_one();
    })
}

/// A stdout line must be a JSON-RPC 2.0 message (an object with `"jsonrpc": "2.0"`), or blank.
fn check_line(line: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(line);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(());
    }
    let quote = || {
        let mut end = trimmed.len().min(QUOTE);
        while !trimmed.is_char_boundary(end) {
            end -= 1;
        }
        let dots = if end < trimmed.len() { "…" } else { "" };
        format!("{:?}{dots}", &trimmed[..end])
    };
    match serde_json::from_str::<serde_json::Value>(trimmed) {
        Ok(v) if v.get("jsonrpc").and_then(|j| j.as_str()) == Some("2.0") => Ok(()),
        Ok(_) => Err(format!(
            "it printed JSON that is not JSON-RPC on stdout: {}",
            quote()
        )),
        Err(_) => Err(format!(
            "it printed garbage instead of JSON-RPC on stdout: {}",
            quote()
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn out(chunks: Vec<&'static [u8]>) -> Output {
        Box::pin(futures::stream::iter(chunks.into_iter().map(|c| {
            Ok(LogOutput::StdOut {
                message: bytes::Bytes::from_static(c),
            })
        })))
    }

    #[tokio::test]
    async fn json_rpc_lines_pass_split_across_chunks() {
        let (mut client, guard) = tokio::io::duplex(4096);
        let health = Arc::new(Health::default());
        let h = spawn_guard(
            out(vec![
                b"{\"jsonrpc\":\"2.0\",",
                b"\"id\":1,\"result\":{}}\n\n{\"jsonrpc\":\"2.0\",\"method\":\"x\"}\n",
            ]),
            guard,
            health.clone(),
            1000,
        );
        h.await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n{\"jsonrpc\":\"2.0\",\"method\":\"x\"}\n"
        );
        assert_eq!(health.fault(), None);
    }

    #[tokio::test]
    async fn garbage_and_floods_are_faults_that_close_the_stream() {
        for (chunks, want) in [
            (vec![&b"hello, I am a server\n"[..]], "garbage"),
            (vec![&b"{\"id\":1}\n"[..]], "not JSON-RPC"),
            (
                vec![&b"{\"jsonrpc\":\"2.0\",\"pad\":\""[..], &[b'x'; 900][..]],
                "flooded",
            ),
        ] {
            let (mut client, guard) = tokio::io::duplex(4096);
            let health = Arc::new(Health::default());
            spawn_guard(out(chunks), guard, health.clone(), 512)
                .await
                .unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(got.is_empty());
            let fault = health.fault().unwrap();
            assert!(fault.contains(want), "{fault}");
        }
    }

    #[test]
    fn stderr_keeps_a_short_tail() {
        let h = Health::default();
        for i in 0..500 {
            h.push_stderr(format!("line {i}\n").as_bytes());
        }
        assert_eq!(h.stderr_tail(), "line 497 | line 498 | line 499");
    }
}
