//! Scheduled backups: with `[backup] every` set, the running node backs itself up into
//! `[backup] dir` at that interval (incremental like `iom backup create --to DIR`), counting
//! from the last successful one (kept across restarts in the state record `backup/last`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::catalog::Dest;
use super::crypt::{self, Seal};
use crate::config::BackupConfig;
use crate::store::Store;

const LAST_KEY: &[u8] = b"backup/last";
const ERROR_KEY: &[u8] = b"backup/last_error";
/// A failed backup is tried again after this long (or the interval, if shorter).
const RETRY: Duration = Duration::from_secs(300);

/// The last scheduled backup: when it succeeded, and the last error since.
pub fn last(store: &Store) -> (Option<u64>, Option<String>) {
    let last = store
        .state_get(LAST_KEY)
        .ok()
        .flatten()
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes);
    let error = store
        .state_get(ERROR_KEY)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    (last, error)
}

fn seal(cfg: &BackupConfig) -> Result<Seal, crypt::CryptError> {
    match (&cfg.passphrase_file, &cfg.recipient) {
        (Some(f), _) => Ok(Seal::Passphrase(crypt::passphrase_file(f)?)),
        (None, Some(r)) => Seal::recipient(r),
        (None, None) => Err(crypt::CryptError::BadKey(
            "no passphrase_file or recipient".into(),
        )),
    }
}

/// Runs scheduled backups until `cancel`.
pub async fn run(
    store: Store,
    data_dir: std::path::PathBuf,
    cfg: BackupConfig,
    every: Duration,
    cancel: CancellationToken,
) {
    let Some(dir) = cfg.dir.clone() else { return };
    loop {
        let now = crate::time::now_secs();
        let wait = match last(&store).0 {
            Some(last) => {
                Duration::from_secs(last.saturating_add(every.as_secs()).saturating_sub(now))
            }
            None => Duration::ZERO,
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if let Err(e) = store.flush().await {
            tracing::warn!(%e, "scheduled backup: flush failed");
        }
        let (s, d, c, dest) = (
            store.clone(),
            data_dir.clone(),
            cfg.clone(),
            Dest::Dir(dir.clone()),
        );
        let result = tokio::task::spawn_blocking(move || {
            let seal = seal(&c)?;
            super::create::from_store(&s, &d, &dest, c.blobs, &seal)
        })
        .await;
        match result {
            Ok(Ok(created)) => {
                tracing::info!(archive = %created.path.display(), bytes = created.size, "scheduled backup written");
                let _ = store.state_put(LAST_KEY, &crate::time::now_secs().to_be_bytes());
                let _ = store.state_remove(ERROR_KEY);
                let _ = store.flush().await;
            }
            Ok(Err(e)) => {
                tracing::warn!(%e, "scheduled backup failed");
                let _ = store.state_put(ERROR_KEY, e.to_string().as_bytes());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY.min(every)) => {}
                }
            }
            Err(e) => {
                tracing::warn!(%e, "scheduled backup task failed");
                return;
            }
        }
    }
}
