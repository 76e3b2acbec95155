//! `iom blob add|get|list`.

use anyhow::Context;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::Global;
use crate::Failure;
use crate::args::BlobCommand;
use crate::output;
use crate::progress::Progress;

/// Runs a `blob` subcommand.
pub async fn run(g: &Global, cmd: BlobCommand) -> Result<(), Failure> {
    let c = g.client()?;
    match cmd {
        BlobCommand::Add { file } => {
            let f = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("cannot open {}", file.display()))?;
            let len = f.metadata().await.ok().map(|m| m.len());
            let bar = std::sync::Arc::new(Progress::new(
                &format!("adding {}", file.display()),
                len,
                g.json,
            ));
            let sent = bar.clone();
            let r = c
                .post_file_progress("/v1/blobs", f, move |n| sent.add(n))
                .await;
            bar.finish();
            let r = r?;
            if g.json {
                output::json(&r);
            } else {
                println!("{}", output::s(&r, "hash"));
            }
        }
        BlobCommand::Get { hash, output: out } => {
            let resp = c.get_raw(&format!("/v1/blobs/{hash}")).await?;
            let expected = resp.content_length();
            let tmp = out.with_extension("iom-partial");
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut stream = resp.bytes_stream();
            let mut got = 0u64;
            let bar = Progress::new(&format!("getting {}", out.display()), expected, g.json);
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        return Err(anyhow::anyhow!(
                            "download of {hash} failed (the node found a corrupt chunk or stopped): {e}"
                        )
                        .into());
                    }
                };
                got += chunk.len() as u64;
                bar.add(chunk.len() as u64);
                f.write_all(&chunk)
                    .await
                    .context("writing the output file")?;
            }
            bar.finish();
            f.sync_all().await.context("writing the output file")?;
            // The node verifies every chunk against its hash as it reads; a short body means
            // the transfer broke off.
            if let Some(len) = expected
                && len != got
            {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(anyhow::anyhow!(
                    "download of {hash} incomplete: expected {len} bytes, received {got}"
                )
                .into());
            }
            tokio::fs::rename(&tmp, &out)
                .await
                .with_context(|| format!("cannot write {}", out.display()))?;
            if !g.json {
                println!("wrote {got} bytes to {}", out.display());
            } else {
                output::json(&serde_json::json!({ "hash": hash, "len": got, "path": out }));
            }
        }
        BlobCommand::List => {
            let r = c.get("/v1/blobs").await?;
            if g.json {
                output::json(&r);
            } else {
                for b in r["blobs"].as_array().into_iter().flatten() {
                    println!("{}  {:>12} bytes", output::s(b, "hash"), b["len"]);
                }
            }
        }
    }
    Ok(())
}
