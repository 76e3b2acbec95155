//! `iom events`: the WebSocket API (`GET /v1/ws`) over the node's unix socket, one JSON
//! message per line on stdout until the node closes the socket (or Ctrl-C).

use std::io::Write;

use anyhow::{Context, anyhow};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::Global;
use crate::Failure;

/// `iom events`.
pub async fn events(g: &Global) -> Result<(), Failure> {
    // The same check and message as every other command when no node runs.
    let _ = g.client()?;
    let path = g.data_dir.join("iom.sock");
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| format!("cannot connect to the node at {}", path.display()))?;
    let (mut ws, _) = tokio_tungstenite::client_async("ws://localhost/v1/ws", stream)
        .await
        .context("the node refused the WebSocket")?;
    let mut out = std::io::stdout();
    while let Some(msg) = ws.next().await {
        match msg.context("the event socket broke off")? {
            Message::Text(t)
                if writeln!(out, "{}", t.as_str())
                    .and_then(|()| out.flush())
                    .is_err() =>
            {
                return Ok(()); // stdout closed (`iom events | head`): done
            }
            Message::Close(Some(c)) if u16::from(c.code) != 1000 => {
                return Err(
                    anyhow!("the node closed the socket: {} ({})", c.reason, c.code).into(),
                );
            }
            Message::Close(_) => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}
