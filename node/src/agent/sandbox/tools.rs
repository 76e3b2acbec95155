//! The tools offered to the model, each run inside the conversation's container.
//!
//! | tool | runs in the container |
//! |---|---|
//! | `bash { command }` | `/bin/sh -c command` in `/workspace` |
//! | `read_file { path }` | `cat path` |
//! | `write_file { path, content }` | `mkdir -p dir && cat > path`, content on stdin |
//! | `edit_file { path, old, new }` | `cat`, replace one exact occurrence, `cat >` back |
//! | `list_files { path? }` | `ls -la path` |
//!
//! The host never opens a path the model chose: every file operation is an exec inside the
//! container, so the container's mounts and permissions are the only boundary that matters.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::SandboxError;
use super::container::Sandbox;
use super::exec::ExecOutput;

/// Largest file `edit_file` will load.
pub const EDIT_MAX_BYTES: usize = 8 << 20;

/// The result of one tool call, ready to become a `tool_result` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    /// Text for the model: output, or what went wrong.
    pub output: String,
    /// True when the call failed (bad input, non-zero exit, timeout, Docker error).
    pub is_error: bool,
    /// Wall-clock time of the call, container start included.
    pub duration: Duration,
}

/// The Anthropic `tools` array (name, description, JSON schema) for the sandbox tools.
pub fn tool_definitions() -> serde_json::Value {
    json!([
        {
            "name": "bash",
            "description": "Run a shell command (busybox sh) in an isolated Linux sandbox with no \
                network access. The working directory is /workspace, which persists for this \
                conversation; /tmp is scratch space. Output (stdout and stderr) is capped, and \
                each call has a time limit; background processes that keep output open hold the \
                call until the limit.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The shell command to run."}
                },
                "required": ["command"]
            }
        },
        {
            "name": "read_file",
            "description": "Read a text file in the sandbox. Relative paths are relative to \
                /workspace.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path."}
                },
                "required": ["path"]
            }
        },
        {
            "name": "write_file",
            "description": "Create or overwrite a file in the sandbox with the given content. \
                Parent directories are created. Relative paths are relative to /workspace.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path."},
                    "content": {"type": "string", "description": "The full new content."}
                },
                "required": ["path", "content"]
            }
        },
        {
            "name": "edit_file",
            "description": "Replace exactly one occurrence of `old` with `new` in a file in the \
                sandbox. Fails if `old` is missing or occurs more than once; include enough \
                surrounding text to make it unique.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path."},
                    "old": {"type": "string", "description": "Exact text to replace."},
                    "new": {"type": "string", "description": "Replacement text."}
                },
                "required": ["path", "old", "new"]
            }
        },
        {
            "name": "list_files",
            "description": "List a directory in the sandbox (ls -la). Defaults to /workspace.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Directory path (optional)."}
                }
            }
        }
    ])
}

#[derive(Deserialize)]
struct BashInput {
    command: String,
}

#[derive(Deserialize)]
struct PathInput {
    path: String,
}

#[derive(Deserialize)]
struct WriteInput {
    path: String,
    content: String,
}

#[derive(Deserialize)]
struct EditInput {
    path: String,
    old: String,
    new: String,
}

#[derive(Deserialize)]
struct ListInput {
    #[serde(default)]
    path: Option<String>,
}

/// A failed tool call, as text for the model.
struct ToolFailure(String);

impl From<SandboxError> for ToolFailure {
    fn from(e: SandboxError) -> Self {
        Self(e.to_string())
    }
}

impl Sandbox {
    /// Runs the tool `name` with `input` in the conversation's container.
    ///
    /// Never panics on bad input: unknown tools, malformed input and Docker failures come back
    /// as an `is_error` outcome with a clear message.
    pub async fn run_tool(
        &self,
        conversation_id: &str,
        name: &str,
        input: &serde_json::Value,
    ) -> ToolOutcome {
        let started = Instant::now();
        let result = match name {
            "bash" => match parse::<BashInput>(name, input) {
                Ok(i) => self.bash(conversation_id, i).await,
                Err(e) => Err(e),
            },
            "read_file" => match parse::<PathInput>(name, input) {
                Ok(i) => self.read_file(conversation_id, i).await,
                Err(e) => Err(e),
            },
            "write_file" => match parse::<WriteInput>(name, input) {
                Ok(i) => self.write_file(conversation_id, i).await,
                Err(e) => Err(e),
            },
            "edit_file" => match parse::<EditInput>(name, input) {
                Ok(i) => self.edit_file(conversation_id, i).await,
                Err(e) => Err(e),
            },
            "list_files" => match parse::<ListInput>(name, input) {
                Ok(i) => self.list_files(conversation_id, i).await,
                Err(e) => Err(e),
            },
            other => Err(ToolFailure(format!(
                "unknown tool {other:?}; available: bash, read_file, write_file, edit_file, \
                 list_files"
            ))),
        };
        let (output, is_error) = match result {
            Ok((text, is_error)) => (text, is_error),
            Err(ToolFailure(msg)) => (format!("{name}: {msg}"), true),
        };
        ToolOutcome {
            output,
            is_error,
            duration: started.elapsed(),
        }
    }

    async fn bash(&self, conv: &str, i: BashInput) -> Result<(String, bool), ToolFailure> {
        let cap = self.config().output_cap_bytes;
        let out = self
            .exec(
                conv,
                vec!["/bin/sh".into(), "-c".into(), i.command],
                None,
                cap,
            )
            .await?;
        let failed = out.exit_code != Some(0) && !out.truncated;
        Ok((render(&out, cap, true), failed))
    }

    async fn read_file(&self, conv: &str, i: PathInput) -> Result<(String, bool), ToolFailure> {
        let path = arg_path(&i.path)?;
        let cap = self.config().output_cap_bytes;
        let out = self
            .exec(conv, vec!["/bin/cat".into(), path], None, cap)
            .await?;
        if out.exit_code != Some(0) && !out.truncated {
            return Err(ToolFailure(lossy(&out.output).trim_end().to_string()));
        }
        Ok((render(&out, cap, false), false))
    }

    async fn write_file(&self, conv: &str, i: WriteInput) -> Result<(String, bool), ToolFailure> {
        let path = arg_path(&i.path)?;
        let len = i.content.len();
        self.write_bytes(conv, &path, i.content.into_bytes(), true)
            .await?;
        Ok((format!("wrote {len} bytes to {}", i.path), false))
    }

    async fn edit_file(&self, conv: &str, i: EditInput) -> Result<(String, bool), ToolFailure> {
        let path = arg_path(&i.path)?;
        if i.old.is_empty() {
            return Err(ToolFailure("`old` must not be empty".into()));
        }
        let out = self
            .exec(
                conv,
                vec!["/bin/cat".into(), path.clone()],
                None,
                EDIT_MAX_BYTES,
            )
            .await?;
        if out.truncated {
            return Err(ToolFailure(format!(
                "{} is larger than {} MiB; edit it with bash (sed) instead",
                i.path,
                EDIT_MAX_BYTES >> 20
            )));
        }
        if out.exit_code != Some(0) {
            return Err(ToolFailure(lossy(&out.output).trim_end().to_string()));
        }
        let content = out.output;
        let hits = find_all(&content, i.old.as_bytes());
        let at = match hits.as_slice() {
            [] => {
                return Err(ToolFailure(format!(
                    "`old` not found in {}; read the file and copy the text exactly",
                    i.path
                )));
            }
            [one] => *one,
            many => {
                return Err(ToolFailure(format!(
                    "`old` occurs {} times in {}; include more surrounding text so it is unique",
                    many.len(),
                    i.path
                )));
            }
        };
        let mut updated = Vec::with_capacity(content.len() + i.new.len());
        updated.extend_from_slice(&content[..at]);
        updated.extend_from_slice(i.new.as_bytes());
        updated.extend_from_slice(&content[at + i.old.len()..]);
        self.write_bytes(conv, &path, updated, false).await?;
        let line = content[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Ok((format!("edited {} at line {line}", i.path), false))
    }

    async fn list_files(&self, conv: &str, i: ListInput) -> Result<(String, bool), ToolFailure> {
        let path = match i.path.as_deref() {
            None | Some("") => ".".to_string(),
            Some(p) => arg_path(p)?,
        };
        let cap = self.config().output_cap_bytes;
        let out = self
            .exec(conv, vec!["/bin/ls".into(), "-la".into(), path], None, cap)
            .await?;
        if out.exit_code != Some(0) && !out.truncated {
            return Err(ToolFailure(lossy(&out.output).trim_end().to_string()));
        }
        Ok((render(&out, cap, false), false))
    }

    /// The bytes of a file in the conversation's container (read there, never by the host),
    /// at most `max`; a missing file, a directory or a bigger file is an error for the model.
    pub(crate) async fn read_bytes(
        &self,
        conv: &str,
        path: &str,
        max: usize,
    ) -> Result<Vec<u8>, String> {
        let arg = arg_path(path).map_err(|ToolFailure(m)| m)?;
        let script = r#"[ -f "$1" ] && exec cat -- "$1" 2>/dev/null"#;
        let out = self
            .exec(conv, sh_script(script, arg), None, max.saturating_add(1))
            .await
            .map_err(|e| e.to_string())?;
        if out.truncated || out.output.len() > max {
            return Err(format!("{path} is larger than {max} bytes"));
        }
        if out.exit_code != Some(0) {
            return Err(format!("{path} is not a readable file in the workspace"));
        }
        Ok(out.output)
    }

    async fn write_bytes(
        &self,
        conv: &str,
        path: &str,
        data: Vec<u8>,
        make_parents: bool,
    ) -> Result<(), ToolFailure> {
        let script = if make_parents {
            r#"mkdir -p "$(dirname "$1")" && cat > "$1""#
        } else {
            r#"cat > "$1""#
        };
        let out = self
            .exec(
                conv,
                sh_script(script, path.into()),
                Some(data),
                self.config().output_cap_bytes,
            )
            .await?;
        if out.exit_code != Some(0) {
            let msg = lossy(&out.output).trim_end().to_string();
            return Err(ToolFailure(if msg.is_empty() {
                format!("writing {path} failed (exit {:?})", out.exit_code)
            } else {
                msg
            }));
        }
        Ok(())
    }
}

fn parse<T: for<'de> Deserialize<'de>>(
    tool: &str,
    input: &serde_json::Value,
) -> Result<T, ToolFailure> {
    T::deserialize(input).map_err(|e| {
        ToolFailure(format!(
            "invalid input: {e}; see the input_schema of {tool}"
        ))
    })
}

/// `/bin/sh -c SCRIPT sh ARG`: the argument reaches the script as `$1`, never as shell text.
fn sh_script(script: &str, arg: String) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        script.into(),
        "sh".into(),
        arg,
    ]
}

/// A path argument that a command cannot mistake for an option.
fn arg_path(p: &str) -> Result<String, ToolFailure> {
    if p.is_empty() {
        return Err(ToolFailure("`path` must not be empty".into()));
    }
    if p.contains('\0') {
        return Err(ToolFailure("`path` must not contain NUL".into()));
    }
    Ok(if p.starts_with('-') {
        format!("./{p}")
    } else {
        p.to_string()
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Output text for the model, with truncation and exit-status notes.
fn render(out: &ExecOutput, cap: usize, show_exit: bool) -> String {
    let mut s = lossy(&out.output);
    if out.truncated {
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!(
            "[output truncated: only the first {cap} bytes are shown]"
        ));
    }
    if show_exit {
        match out.exit_code {
            Some(0) => {}
            Some(c) => {
                if !s.is_empty() && !s.ends_with('\n') {
                    s.push('\n');
                }
                s.push_str(&format!("[exit code {c}]"));
            }
            None if out.truncated => {}
            None => s.push_str("\n[exit code unknown]"),
        }
        if s.is_empty() {
            s.push_str("(no output)");
        }
    }
    if let Some(note) = &out.note {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!("[{note}]"));
    }
    s
}

/// Start offsets of every (non-overlapping) occurrence of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut hits = Vec::new();
    if needle.is_empty() || needle.len() > hay.len() {
        return hits;
    }
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if &hay[i..i + needle.len()] == needle {
            hits.push(i);
            i += needle.len();
        } else {
            i += 1;
        }
    }
    hits
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_five_tools_with_object_schemas() {
        let defs = tool_definitions();
        let arr = defs.as_array().unwrap();
        let names: Vec<&str> = arr.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["bash", "read_file", "write_file", "edit_file", "list_files"]
        );
        for t in arr {
            assert_eq!(t["input_schema"]["type"], "object");
            assert!(t["description"].as_str().unwrap().len() > 20);
        }
    }

    #[test]
    fn find_all_counts_non_overlapping_hits() {
        assert_eq!(find_all(b"abcabc", b"bc"), vec![1, 4]);
        assert_eq!(find_all(b"aaaa", b"aa"), vec![0, 2]);
        assert!(find_all(b"abc", b"x").is_empty());
        assert!(find_all(b"ab", b"abc").is_empty());
    }

    #[test]
    fn option_like_paths_are_made_safe() {
        assert_eq!(arg_path("-rf").ok().unwrap(), "./-rf");
        assert_eq!(arg_path("a/b").ok().unwrap(), "a/b");
        assert!(arg_path("").is_err());
    }

    #[test]
    fn rendering_notes_truncation_and_exit() {
        let out = ExecOutput {
            output: b"abc".to_vec(),
            exit_code: Some(2),
            truncated: false,
            note: None,
        };
        assert_eq!(render(&out, 10, true), "abc\n[exit code 2]");
        let out = ExecOutput {
            output: b"abc".to_vec(),
            exit_code: None,
            truncated: true,
            note: None,
        };
        assert!(render(&out, 3, true).contains("truncated"));
        let out = ExecOutput {
            output: vec![],
            exit_code: Some(0),
            truncated: false,
            note: Some("reset".into()),
        };
        assert_eq!(render(&out, 3, true), "(no output)\n[reset]");
    }
}
