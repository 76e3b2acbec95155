//! One `docker exec` with stdin, a deadline and an output cap.

use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::SandboxError;
use super::image::SANDBOX_UID;

/// The whole environment of tool processes. Nothing from the node's environment is passed.
pub(crate) const SANDBOX_ENV: &[&str] = &["HOME=/workspace", "PATH=/bin:/usr/bin"];

/// What a finished exec produced.
#[derive(Debug)]
pub(crate) struct ExecOutput {
    /// stdout and stderr interleaved in arrival order, at most the cap.
    pub(crate) output: Vec<u8>,
    /// Exit status, when the engine reported one.
    pub(crate) exit_code: Option<i64>,
    /// True when output beyond the cap was dropped.
    pub(crate) truncated: bool,
    /// Something the runtime did that the model should know about (e.g. a reset).
    pub(crate) note: Option<String>,
}

/// Runs `cmd` in the running container `id`, feeding `stdin` if given.
///
/// Returns [`SandboxError::Timeout`] when `deadline` passes first; the caller must then remove
/// the container, which is the only reliable way to end every process the call started.
pub(crate) async fn run(
    docker: &Docker,
    id: &str,
    cmd: Vec<String>,
    stdin: Option<Vec<u8>>,
    cap: usize,
    deadline: Instant,
    limit: Duration,
) -> Result<ExecOutput, SandboxError> {
    let user = format!("{SANDBOX_UID}:{SANDBOX_UID}");
    let exec = docker
        .create_exec(
            id,
            CreateExecOptions {
                cmd: Some(cmd),
                attach_stdin: Some(stdin.is_some()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                env: Some(SANDBOX_ENV.iter().map(|s| (*s).to_string()).collect()),
                user: Some(user),
                working_dir: Some("/workspace".to_string()),
                ..Default::default()
            },
        )
        .await
        .map_err(SandboxError::docker("exec create"))?;
    let started = tokio::time::timeout_at(
        deadline,
        docker.start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: Some(64 * 1024),
            }),
        ),
    )
    .await
    .map_err(|_| SandboxError::Timeout(limit))?
    .map_err(SandboxError::docker("exec start"))?;
    let StartExecResults::Attached { mut output, input } = started else {
        return Err(SandboxError::Rootfs(
            "exec started detached although attached was requested".into(),
        ));
    };

    let writer = stdin.map(|data| {
        let mut input = input;
        tokio::spawn(async move {
            // A process that exits without reading all of stdin makes this fail; that is its
            // business, the exit code tells the story.
            let _ = input.write_all(&data).await;
            let _ = input.shutdown().await;
        })
    });

    let mut buf = Vec::new();
    let mut truncated = false;
    loop {
        let next = tokio::time::timeout_at(deadline, output.next()).await;
        let item = match next {
            Err(_) => {
                if let Some(w) = &writer {
                    w.abort();
                }
                return Err(SandboxError::Timeout(limit));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(SandboxError::docker("exec output")(e)),
            Ok(Some(Ok(item))) => item,
        };
        let bytes = match item {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => message,
            LogOutput::StdIn { .. } => continue,
        };
        let room = cap.saturating_sub(buf.len());
        if bytes.len() > room {
            buf.extend_from_slice(&bytes[..room]);
            truncated = true;
            break;
        }
        buf.extend_from_slice(&bytes);
    }
    drop(output);
    if let Some(w) = writer {
        w.abort();
    }

    let exit_code = exit_code(docker, &exec.id, if truncated { 2 } else { 50 }).await;
    Ok(ExecOutput {
        output: buf,
        exit_code,
        truncated,
        note: None,
    })
}

/// Did the call run out of processes (pids_limit)? Leftover processes would break later calls.
pub(crate) fn hit_process_limit(out: &ExecOutput) -> bool {
    if out.exit_code == Some(0) {
        return false;
    }
    let text = String::from_utf8_lossy(&out.output);
    text.contains("can't fork") || text.contains("Resource temporarily unavailable")
}

/// Polls the exec's exit code briefly: the engine may report it a moment after the stream ends.
async fn exit_code(docker: &Docker, exec_id: &str, tries: u32) -> Option<i64> {
    for _ in 0..tries {
        match docker.inspect_exec(exec_id).await {
            Ok(info) if info.running != Some(true) => return info.exit_code,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => return None,
        }
    }
    None
}
