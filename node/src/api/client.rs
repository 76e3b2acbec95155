//! The local API client used by the `iom` command line (and tests): HTTP over the node's unix
//! socket.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::ErrorBody;

/// Why a call to the node failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node is listening on the data dir's socket.
    #[error(
        "no iom node is running for data dir {data_dir} (no socket at {socket}); start one with \
         `iom node run --data-dir {data_dir}`"
    )]
    NotRunning {
        /// The data dir.
        data_dir: String,
        /// The socket path tried.
        socket: String,
    },
    /// The node answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code.
        code: String,
        /// Message from the node.
        message: String,
    },
    /// Transport failure talking to the node.
    #[error("talking to the node failed: {0}")]
    Transport(String),
}

/// A client bound to one data dir's socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    data_dir: PathBuf,
    socket: PathBuf,
}

const BASE: &str = "http://iom.local";

impl ApiClient {
    /// A client for the node on `data_dir`.
    pub fn new(data_dir: &Path) -> Result<ApiClient, ClientError> {
        let socket = data_dir.join("iom.sock");
        // Plain HTTP over a local socket: no TLS, so no certificate store either (a machine
        // without CA certificates, such as a minimal container, must still reach its node).
        let http = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .tls_certs_only(std::iter::empty())
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(ApiClient {
            http,
            data_dir: data_dir.to_path_buf(),
            socket,
        })
    }

    fn not_running(&self) -> ClientError {
        ClientError::NotRunning {
            data_dir: self.data_dir.display().to_string(),
            socket: self.socket.display().to_string(),
        }
    }

    fn map_send(&self, e: reqwest::Error) -> ClientError {
        if e.is_connect() || !self.socket.exists() {
            self.not_running()
        } else {
            ClientError::Transport(e.to_string())
        }
    }

    async fn decode(resp: reqwest::Response) -> Result<Value, ClientError> {
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Transport(format!("bad JSON from node: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            }),
            Err(_) => Err(ClientError::Api {
                status: status.as_u16(),
                code: "http".into(),
                message: format!("{status}: {}", String::from_utf8_lossy(&bytes)),
            }),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut req = self.http.request(method, format!("{BASE}{path}"));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.map_send(e))?;
        Self::decode(resp).await
    }

    /// `GET path` → JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body → JSON.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    /// `DELETE path` → JSON.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// `POST path` streaming a file as the body → JSON.
    pub async fn post_file(&self, path: &str, file: tokio::fs::File) -> Result<Value, ClientError> {
        self.post_file_progress(path, file, |_| {}).await
    }

    /// Like [`post_file`](Self::post_file), calling `sent(bytes)` for every piece read.
    pub async fn post_file_progress(
        &self,
        path: &str,
        file: tokio::fs::File,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, ClientError> {
        use futures::StreamExt;
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |piece| {
                if let Ok(b) = piece {
                    sent(b.len() as u64);
                }
            });
        let resp = self
            .http
            .post(format!("{BASE}{path}"))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| self.map_send(e))?;
        Self::decode(resp).await
    }

    /// `POST path` with a JSON body, as a raw response (a streamed download).
    pub async fn post_raw(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<reqwest::Response, ClientError> {
        let sent = self
            .http
            .post(format!("{BASE}{path}"))
            .json(body)
            .send()
            .await;
        self.raw(sent).await
    }

    /// `GET path` as a raw response, for streaming downloads and event streams.
    pub async fn get_raw(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let sent = self.http.get(format!("{BASE}{path}")).send().await;
        self.raw(sent).await
    }

    /// A successful response as it is; an error response decoded into its error.
    async fn raw(
        &self,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = sent.map_err(|e| self.map_send(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(Self::decode(resp)
                .await
                .err()
                .unwrap_or(ClientError::Transport("unexpected success body".into())))
        }
    }
}

/// Splits a `text/event-stream` body into the data of its events as the bytes arrive (a chunk
/// may end anywhere, even inside a character).
#[derive(Debug, Default)]
pub struct SseEvents {
    buf: Vec<u8>,
}

impl SseEvents {
    /// Adds bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The data of the next complete event (its `data:` lines joined by newlines); events
    /// without data (comments, keep-alives) are skipped.
    pub fn next_data(&mut self) -> Option<String> {
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let data = String::from_utf8_lossy(&block)
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            if !data.is_empty() {
                return Some(data);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::SseEvents;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let body = ": keep-alive\n\ndata: {\"t\":\"é\"}\n\ndata: a\ndata: b\n\n".as_bytes();
        let mut sse = SseEvents::default();
        let mut got = Vec::new();
        for piece in body.chunks(3) {
            sse.push(piece);
            while let Some(d) = sse.next_data() {
                got.push(d);
            }
        }
        assert_eq!(got, ["{\"t\":\"é\"}", "a\nb"]);
    }
}
