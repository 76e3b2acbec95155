//! Group commit: concurrent callers of [`Store::flush`](super::Store::flush) share one sled
//! flush (one fsync) instead of queueing one each.
//!
//! Every caller takes a ticket after its write. One flusher at a time runs on the blocking
//! pool: it notes the newest ticket, flushes, and reports that ticket as covered; callers
//! whose ticket is covered return. A flush that starts after a caller's write made that write
//! durable, so a caller that missed a report still learns the truth from a later one. While a
//! flush runs, new callers gather for the next one: under load there is one flush in flight
//! and one batch waiting.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::StoreError;

/// What the last finished flush covered.
#[derive(Debug, Clone, Default)]
struct Covered {
    /// Every ticket up to this one was taken before the flush started.
    ticket: u64,
    /// The flush's error, if it failed.
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Tickets {
    /// The newest ticket handed out.
    issued: u64,
    /// The newest ticket a finished flush covered.
    flushed: u64,
    /// A flusher is running.
    running: bool,
}

/// The shared flusher of one sled database. It does not own the database: each flusher
/// thread holds a handle only while it runs, and drops it before reporting its last flush (so
/// a store dropped after its last flush can be opened again at once).
#[derive(Debug)]
pub(super) struct GroupFlush {
    tickets: Mutex<Tickets>,
    covered: watch::Sender<Covered>,
}

impl GroupFlush {
    pub(super) fn new() -> Arc<GroupFlush> {
        Arc::new(GroupFlush {
            tickets: Mutex::new(Tickets::default()),
            covered: watch::Sender::new(Covered::default()),
        })
    }

    fn tickets(&self) -> std::sync::MutexGuard<'_, Tickets> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once a flush that started after this call has finished.
    pub(super) async fn flush(self: &Arc<Self>, db: &sled::Db) -> Result<(), StoreError> {
        let mut covered = self.covered.subscribe();
        let ticket = {
            let mut t = self.tickets();
            t.issued += 1;
            if !t.running {
                t.running = true;
                let (this, db) = (self.clone(), db.clone());
                tokio::task::spawn_blocking(move || this.run(db));
            }
            t.issued
        };
        loop {
            {
                let c = covered.borrow_and_update();
                if c.ticket >= ticket {
                    return match &c.error {
                        None => Ok(()),
                        Some(e) => Err(StoreError::FlushFailed(e.clone())),
                    };
                }
            }
            if covered.changed().await.is_err() {
                return Err(StoreError::FlushFailed("the flusher stopped".into()));
            }
        }
    }

    /// The flusher: flushes until every ticket handed out is covered.
    fn run(&self, db: sled::Db) {
        loop {
            let target = {
                let mut t = self.tickets();
                if t.flushed >= t.issued {
                    t.running = false;
                    return;
                }
                t.issued
            };
            let error = db.flush().err().map(|e| e.to_string());
            let last = {
                let mut t = self.tickets();
                t.flushed = target;
                t.running = t.flushed < t.issued;
                !t.running
            };
            let covered = Covered {
                ticket: target,
                error,
            };
            if last {
                drop(db);
                self.covered.send_replace(covered);
                return;
            }
            self.covered.send_replace(covered);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_flushes_share_fsyncs_and_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let group = GroupFlush::new();
        let mut tasks = Vec::new();
        for w in 0..16u32 {
            let (group, tree, db) = (group.clone(), tree.clone(), db.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..20u32 {
                    tree.insert(format!("{w}/{i}"), &i.to_le_bytes()[..])
                        .unwrap();
                    group.flush(&db).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let t = group.tickets();
        assert_eq!(t.issued, 16 * 20);
        assert_eq!(t.flushed, t.issued, "every ticket was covered");
        drop(t);
        assert_eq!(tree.len(), 16 * 20);
    }

    #[tokio::test]
    async fn a_flush_after_an_idle_period_starts_a_new_flusher() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let group = GroupFlush::new();
        group.flush(&db).await.unwrap();
        // Let the first flusher see that nothing is left and stop.
        for _ in 0..100 {
            if !group.tickets().running {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(!group.tickets().running);
        group.flush(&db).await.unwrap();
        assert_eq!(group.tickets().flushed, 2);
    }
}
