//! Creating an archive: where it goes (a backup directory or one file), which blobs earlier
//! archives of the directory already hold, and the catalog written beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::BackupError;
use super::catalog::{self, Catalog, Dest};
use super::crypt::Seal;
use super::format::Manifest;
use super::snapshot::{self, Snapshot, SnapshotOptions};
use crate::identity::Identity;
use crate::store::Store;

/// Where a new archive goes and what earlier archives hold.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The archive's path.
    pub path: PathBuf,
    /// Whether it goes into a backup directory (then a catalog is written beside it).
    pub in_dir: bool,
    /// The snapshot options (blobs, and the blobs earlier archives hold).
    pub options: SnapshotOptions,
    key: [u8; 32],
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Created {
    /// The archive.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its size in bytes.
    pub size: u64,
    /// The catalog beside it (backup directories only).
    pub catalog: Option<Catalog>,
}

/// Plans a backup of the device in `data_dir` to `dest` (a backup directory is created, mode
/// 0700, if missing).
pub fn plan(dest: &Dest, data_dir: &Path, blobs: bool) -> Result<Plan, BackupError> {
    let identity = Identity::load(data_dir)?;
    let device = identity.device.id().to_string();
    let key = snapshot::catalog_key(&identity.device);
    match dest {
        Dest::Dir(dir) => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(BackupError::io(dir))?;
            let known = if blobs {
                catalog::known_blobs(dir, &device)?
            } else {
                HashMap::new()
            };
            Ok(Plan {
                path: catalog::new_archive_path(dir, crate::time::now_secs(), &device),
                in_dir: true,
                options: SnapshotOptions { blobs, known },
                key,
            })
        }
        Dest::File(path) => Ok(Plan {
            path: path.clone(),
            in_dir: false,
            options: SnapshotOptions {
                blobs,
                known: HashMap::new(),
            },
            key,
        }),
    }
}

impl Plan {
    /// Records the archive written (its catalog, in a backup directory).
    pub fn finish(self, manifest: Manifest, size: u64) -> Result<Created, BackupError> {
        let catalog = if self.in_dir {
            Some(catalog::write_catalog(
                &self.path, &manifest, size, &self.key,
            )?)
        } else {
            None
        };
        Ok(Created {
            path: self.path,
            manifest,
            size,
            catalog,
        })
    }
}

/// Backs up from a store this process holds open (a stopped node's, or the running node's own
/// for scheduled backups; flush it first). Blocking.
pub fn from_store(
    store: &Store,
    data_dir: &Path,
    dest: &Dest,
    blobs: bool,
    seal: &Seal,
) -> Result<Created, BackupError> {
    let plan = plan(dest, data_dir, blobs)?;
    let snap = Snapshot::collect(store, data_dir, &plan.options)?;
    let manifest = snap.manifest().clone();
    let size = super::write_archive(&plan.path, seal, |w| snap.write(store, w))?;
    plan.finish(manifest, size)
}
