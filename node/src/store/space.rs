//! The disk reserve: writes of documents and blobs are refused while the filesystem holding the
//! store has less free space than the reserve, so a full disk stops new data with a clear
//! error instead of failing half-way through a write. Reads, certificates (a revocation must
//! always get through) and compaction are never refused. Writes resume by themselves once
//! space is freed: every check reads the free space again (at most every
//! [`RECHECK`], counting the bytes written since).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StoreError;

/// How long a reading of the free space is trusted (less the bytes written since).
pub const RECHECK: Duration = Duration::from_millis(250);

/// Where the free space comes from: the filesystem (`statvfs`), or a test's numbers.
pub trait FreeSpace: Send + Sync {
    /// Bytes available to this process on the filesystem holding `dir`.
    fn free_bytes(&self, dir: &Path) -> std::io::Result<u64>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct Statvfs;

impl FreeSpace for Statvfs {
    fn free_bytes(&self, dir: &Path) -> std::io::Result<u64> {
        usage(dir).map(|(free, _)| free)
    }
}

/// `(free, total)` bytes of the filesystem holding `dir` (free: what an unprivileged user may
/// still write).
pub fn usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frag = st.fragment_size();
    Ok((
        st.blocks_available().saturating_mul(frag),
        st.blocks().saturating_mul(frag),
    ))
}

/// The last reading: when, how much was free, and what was written since.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    free: u64,
    written_since: u64,
}

/// Refuses writes that would eat into the reserve.
pub struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    source: Box<dyn FreeSpace>,
    last: Mutex<Option<Reading>>,
}

impl std::fmt::Debug for SpaceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaceGuard")
            .field("dir", &self.dir)
            .field("reserve", &self.reserve)
            .finish_non_exhaustive()
    }
}

/// What [`SpaceGuard::state`] reports (for `iom status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceState {
    /// Bytes free on the store's filesystem (the last reading).
    pub free: u64,
    /// The reserve.
    pub reserve: u64,
}

impl SpaceState {
    /// Whether writes are accepted.
    pub fn writable(&self) -> bool {
        self.free >= self.reserve
    }
}

impl SpaceGuard {
    /// A guard for the store in `dir` keeping `reserve` bytes free, reading `source`.
    pub fn new(dir: &Path, reserve: u64, source: Box<dyn FreeSpace>) -> SpaceGuard {
        SpaceGuard {
            dir: dir.to_path_buf(),
            reserve,
            source,
            last: Mutex::new(None),
        }
    }

    /// `Ok` if `bytes` more can be written without going below the reserve.
    pub fn check(&self, bytes: u64) -> Result<(), StoreError> {
        if self.reserve == 0 {
            // No reserve: nothing to refuse, and no statvfs on the write path.
            return Ok(());
        }
        let free = self.free(bytes)?;
        if free.saturating_sub(bytes) < self.reserve {
            return Err(StoreError::DiskFull {
                dir: self.dir.display().to_string(),
                free,
                reserve: self.reserve,
            });
        }
        Ok(())
    }

    /// Counts `bytes` as written (so the estimate between readings stays honest).
    pub fn wrote(&self, bytes: u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = last.as_mut() {
            r.written_since = r.written_since.saturating_add(bytes);
        }
    }

    /// The free space now and the reserve.
    pub fn state(&self) -> Result<SpaceState, StoreError> {
        Ok(SpaceState {
            free: self.free(0)?,
            reserve: self.reserve,
        })
    }

    /// Free bytes: the last reading less what was written since, read again when it is old
    /// or when the estimate says the write would not fit (the estimate only ever errs low).
    fn free(&self, bytes: u64) -> Result<u64, StoreError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = *last {
            let estimate = r.free.saturating_sub(r.written_since);
            if r.at.elapsed() < RECHECK && estimate.saturating_sub(bytes) >= self.reserve {
                return Ok(estimate);
            }
        }
        let free = self
            .source
            .free_bytes(&self.dir)
            .map_err(|source| StoreError::ChunkFile {
                path: self.dir.display().to_string(),
                source,
            })?;
        *last = Some(Reading {
            at: Instant::now(),
            free,
            written_since: 0,
        });
        Ok(free)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Free space a test sets.
    #[derive(Clone, Default)]
    struct Fake(Arc<AtomicU64>);

    impl FreeSpace for Fake {
        fn free_bytes(&self, _: &Path) -> std::io::Result<u64> {
            Ok(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn writes_stop_at_the_reserve_and_resume_when_space_is_freed() {
        let fake = Fake::default();
        fake.0.store(100 << 20, Ordering::SeqCst);
        let guard = SpaceGuard::new(Path::new("/data"), 10 << 20, Box::new(fake.clone()));
        guard.check(1 << 20).expect("plenty of room");
        // Another program fills the disk: seen at the next reading, at most RECHECK later.
        fake.0.store(5 << 20, Ordering::SeqCst);
        std::thread::sleep(RECHECK);
        let err = guard.check(1).expect_err("below the reserve");
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("/data") && text.contains("reserve"), "{text}");
        assert!(!guard.state().expect("state").writable());
        // Space is freed: the next check sees it at once (a refusal always reads again).
        fake.0.store(50 << 20, Ordering::SeqCst);
        guard.check(1 << 20).expect("room again");
        assert!(guard.state().expect("state").writable());
    }

    #[test]
    fn bytes_written_between_readings_count() {
        let fake = Fake::default();
        fake.0.store(20 << 20, Ordering::SeqCst);
        let guard = SpaceGuard::new(Path::new("/data"), 10 << 20, Box::new(fake.clone()));
        guard.check(0).expect("first reading");
        // Our own writes fill the disk faster than the readings are refreshed.
        for _ in 0..9 {
            guard.check(1 << 20).expect("fits");
            guard.wrote(1 << 20);
            fake.0.fetch_sub(1 << 20, Ordering::SeqCst);
        }
        assert!(
            guard.check(2 << 20).is_err(),
            "the estimate counts what was written"
        );
    }

    #[test]
    fn a_write_larger_than_what_is_left_is_refused() {
        let fake = Fake::default();
        fake.0.store(12 << 20, Ordering::SeqCst);
        let guard = SpaceGuard::new(Path::new("/data"), 10 << 20, Box::new(fake));
        guard.check(1 << 20).expect("fits");
        assert!(guard.check(3 << 20).is_err());
    }

    #[test]
    fn statvfs_reads_a_real_filesystem() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(Statvfs.free_bytes(dir.path()).expect("statvfs") > 0);
    }
}
