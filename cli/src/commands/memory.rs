//! `iom memory show|append|edit`.

use anyhow::Context;
use serde_json::json;

use super::Global;
use crate::Failure;
use crate::args::MemoryCommand;
use crate::output;

/// Runs a `memory` subcommand.
pub async fn run(g: &Global, cmd: MemoryCommand) -> Result<(), Failure> {
    let c = g.client()?;
    let r = match cmd {
        MemoryCommand::Show => c.get("/v1/memory").await?,
        MemoryCommand::Append { text } => {
            c.post("/v1/memory/append", &json!({ "text": text }))
                .await?
        }
        MemoryCommand::Edit => {
            let current = c.get("/v1/memory").await?;
            let edited = edit_in_editor(output::s(&current, "text"))?;
            if edited == output::s(&current, "text") {
                eprintln!("memory unchanged");
                current
            } else {
                c.put("/v1/memory", &json!({ "text": edited })).await?
            }
        }
    };
    if g.json {
        output::json(&r);
    } else {
        print!("{}", output::s(&r, "text"));
        if !output::s(&r, "text").ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

fn edit_in_editor(text: &str) -> Result<String, Failure> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let dir = tempfile_dir()?;
    let path = dir.join("MEMORY.md");
    std::fs::write(&path, text).context("writing the temporary file")?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&path)
        .status()
        .with_context(|| format!("cannot start the editor {editor:?} (set $EDITOR)"))?;
    if !status.success() {
        return Err(anyhow::anyhow!("the editor exited with {status}; memory unchanged").into());
    }
    let edited = std::fs::read_to_string(&path).context("reading the edited file")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(edited)
}

fn tempfile_dir() -> Result<std::path::PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("iom-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("creating a temporary directory")?;
    Ok(dir)
}
