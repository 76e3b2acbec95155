//! Backups of one device and recovery kits (see `docs/recovery.md`).
//!
//! An archive is an [age](https://age-encryption.org) file (passphrase or X25519 recipient,
//! [`crypt`]) whose plaintext is a versioned manifest and one record per entry ([`mod@format`]):
//! the data dir's keys, config and workspaces, the certificates, the node's state records,
//! every document and, with `--blobs`, the blobs. [`snapshot`] takes it (from a running node
//! through the local API, or from a stopped node's store), [`restore`] checks and restores it
//! onto an empty data dir, as the same device or as a new one, [`catalog`] keeps the plaintext
//! list beside archives that makes later backups into one directory incremental, and [`kit`]
//! is the person key's recovery kit.

pub mod catalog;
pub mod create;
pub mod crypt;
pub mod format;
pub mod kit;
pub mod restore;
pub mod schedule;
pub mod snapshot;

use std::io::{Read, Write};
use std::path::Path;

/// Why a backup, a verification or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The archive's plaintext was refused.
    #[error(transparent)]
    Format(#[from] format::FormatError),
    /// Encryption or decryption failed.
    #[error(transparent)]
    Crypt(#[from] crypt::CryptError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The keys failed to load.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The restore target is not empty.
    #[error(
        "{0} is not empty; restore onto an empty or new data dir (move the old one away first)"
    )]
    NotEmpty(String),
    /// The archive is consistent but its content is not acceptable.
    #[error("the archive is damaged: {0}")]
    Content(String),
    /// An incremental archive needs an earlier archive that is not there.
    #[error(
        "this archive is incremental: {count} blobs are in {archive}, which is not in {dir}; put \
         the earlier archives of the backup directory beside it"
    )]
    MissingBase {
        /// The earlier archive's file name.
        archive: String,
        /// Where it was looked for.
        dir: String,
        /// Blobs it should hold.
        count: usize,
    },
    /// A restore as a new device was impossible.
    #[error("{0}")]
    NewDevice(String),
}

impl BackupError {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
        move |e| BackupError::Io(format!("{}: {e}", path.display()))
    }
}

/// Writes an archive to `path`: `write_plain` writes the plaintext, which is encrypted with
/// `seal` into `path.partial`, synced, and renamed to `path` only when complete. Returns the
/// archive's size.
pub fn write_archive(
    path: &Path,
    seal: &crypt::Seal,
    write_plain: impl FnOnce(&mut dyn Write) -> Result<(), BackupError>,
) -> Result<u64, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = path.with_extension("partial");
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(BackupError::io(&partial))?;
        let mut sealed = seal.wrap(std::io::BufWriter::with_capacity(1 << 20, file))?;
        write_plain(&mut sealed)?;
        let buffered = sealed.finish().map_err(BackupError::io(&partial))?;
        let file = buffered
            .into_inner()
            .map_err(|e| BackupError::Io(format!("{}: {e}", partial.display())))?;
        file.sync_all().map_err(BackupError::io(&partial))?;
        let len = file.metadata().map_err(BackupError::io(&partial))?.len();
        std::fs::rename(&partial, path).map_err(BackupError::io(path))?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// A reader that copies what it reads into a writer (the plaintext from a running node is
/// read for its manifest while it is encrypted).
#[derive(Debug)]
pub struct Tee<R, W> {
    /// The source.
    pub r: R,
    /// The copy.
    pub w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Copies a plaintext from `plain` into `w`, reading its manifest on the way.
pub fn copy_plaintext(
    plain: impl Read,
    w: &mut dyn Write,
) -> Result<format::Manifest, BackupError> {
    let mut tee = Tee { r: plain, w };
    let manifest = format::read_start(&mut tee)?;
    std::io::copy(&mut tee, &mut std::io::sink()).map_err(format::FormatError::Io)?;
    Ok(manifest)
}
