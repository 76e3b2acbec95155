//! Backup directories: archives named by time and device, each with a plaintext catalog beside
//! it (`NAME.age.catalog`, JSON) that lets a later backup into the same directory copy only the
//! blobs no earlier archive holds, and lets `iom backup list` show the archives without their
//! passphrase.
//!
//! A catalog names the archive, its device id, time and counts, the earlier archives it
//! refers to, and the blobs it holds as *catalog hashes*: SHA-256 of a key derived from the
//! device key and the blob's hash (see [`super::snapshot::catalog_hash`]), so the catalog does
//! not reveal which contents the archives hold. Only the device that wrote them (or its
//! restored self) can match them, so a device restored with `--new-device` starts a new full
//! chain.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::BackupError;
use super::format::{EntryKind, Manifest};
use super::snapshot::catalog_hash;

/// The catalog's file-name suffix (after the archive's name).
pub const SUFFIX: &str = ".catalog";

/// What the catalog beside an archive says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The catalog format (1).
    pub format: u16,
    /// The archive's file name.
    pub archive: String,
    /// When its snapshot was taken.
    pub created_at: u64,
    /// The backed-up device.
    pub device: String,
    /// Its name.
    pub name: String,
    /// Documents held.
    pub documents: usize,
    /// Blobs held in this archive.
    pub blobs_here: usize,
    /// Blobs it refers to in earlier archives.
    pub blobs_elsewhere: usize,
    /// The earlier archives it needs to restore every blob.
    pub needs: Vec<String>,
    /// The archive's size in bytes.
    pub size: u64,
    /// Catalog hashes of the blobs it holds.
    pub blobs: Vec<String>,
}

/// Where `iom backup create --to` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// Into a backup directory (named archive, catalog, incremental).
    Dir(PathBuf),
    /// Exactly this file (always complete, no catalog).
    File(PathBuf),
}

impl Dest {
    /// An existing directory, or a path that does not end in `.age`, is a backup directory
    /// (created if missing); a path ending in `.age` is one archive file.
    pub fn parse(path: &Path) -> Dest {
        if path.is_dir() || path.extension().is_none_or(|e| e != "age") {
            Dest::Dir(path.to_path_buf())
        } else {
            Dest::File(path.to_path_buf())
        }
    }
}

/// A new archive's file name in `dir`: `iom-backup-<UTC time>-<device prefix>.age`, with a
/// counter if that exists already.
pub fn new_archive_path(dir: &Path, now: u64, device: &str) -> PathBuf {
    let time = chrono::DateTime::from_timestamp(now as i64, 0)
        .map(|t| t.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|| now.to_string());
    let short: String = device
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut n = 0;
    loop {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let p = dir.join(format!("iom-backup-{time}-{short}{suffix}.age"));
        if !p.exists() {
            return p;
        }
        n += 1;
    }
}

/// The catalogs of `dir` (unreadable ones are skipped with a warning), oldest first.
pub fn catalogs(dir: &Path) -> Result<Vec<Catalog>, BackupError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(BackupError::Io(format!("{}: {e}", dir.display()))),
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.to_string_lossy().ends_with(SUFFIX) {
            continue;
        }
        match std::fs::read(&path).map(|b| serde_json::from_slice::<Catalog>(&b)) {
            Ok(Ok(c)) => out.push(c),
            Ok(Err(err)) => {
                tracing::warn!(path = %path.display(), %err, "unreadable backup catalog")
            }
            Err(err) => tracing::warn!(path = %path.display(), %err, "unreadable backup catalog"),
        }
    }
    out.sort_by(|a, b| {
        (a.created_at, collision_index(&a.archive), &a.archive).cmp(&(
            b.created_at,
            collision_index(&b.archive),
            &b.archive,
        ))
    });
    Ok(out)
}

/// The `-N` an archive's name got because an earlier one of the same second had its name
/// (see the naming above), 0 for none: archives of one second are in the order they were made,
/// which a plain name order gets wrong (`…-1.age` sorts before `….age`).
fn collision_index(archive: &str) -> u32 {
    let stem = archive.strip_suffix(".age").unwrap_or(archive);
    let parts: Vec<&str> = stem.split('-').collect();
    match parts.as_slice() {
        ["iom", "backup", _time, _device, n] => n.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The blobs earlier archives of `device` in `dir` hold (catalog hash → archive), counting
/// only archives that are still there.
pub fn known_blobs(dir: &Path, device: &str) -> Result<HashMap<String, String>, BackupError> {
    let mut known = HashMap::new();
    for c in catalogs(dir)? {
        if c.device != device || !dir.join(&c.archive).is_file() {
            continue;
        }
        for h in c.blobs {
            known.entry(h).or_insert_with(|| c.archive.clone());
        }
    }
    Ok(known)
}

/// Writes the catalog of the archive at `archive` (in its directory).
pub fn write_catalog(
    archive: &Path,
    manifest: &Manifest,
    size: u64,
    key: &[u8; 32],
) -> Result<Catalog, BackupError> {
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BackupError::Io(format!("{} has no file name", archive.display())))?
        .to_string();
    let mut blobs = Vec::new();
    for e in manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Blob)
    {
        let id: [u8; 32] = hex::decode(&e.name)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| BackupError::Content(format!("blob name {:?}", e.name)))?;
        blobs.push(catalog_hash(key, &id));
    }
    let mut needs: Vec<String> = manifest
        .external_blobs
        .iter()
        .map(|b| b.archive.clone())
        .collect();
    needs.sort();
    needs.dedup();
    let catalog = Catalog {
        format: 1,
        archive: name.clone(),
        created_at: manifest.created_at,
        device: manifest.device.clone(),
        name: manifest.name.clone(),
        documents: manifest.count(EntryKind::Doc),
        blobs_here: blobs.len(),
        blobs_elsewhere: manifest.external_blobs.len(),
        needs,
        size,
        blobs,
    };
    let path = archive.with_file_name(format!("{name}{SUFFIX}"));
    let bytes = serde_json::to_vec_pretty(&catalog).map_err(|e| BackupError::Io(e.to_string()))?;
    crate::secret_file::write_secret(&path, &bytes)
        .map_err(|e| BackupError::Io(format!("{}: {e}", path.display())))?;
    Ok(catalog)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backup::format::{Entry, FORMAT_VERSION};

    fn manifest(blobs: &[[u8; 32]]) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            created_at: 100,
            device: "dev".into(),
            person: "p".into(),
            name: "home".into(),
            holds_person_key: true,
            with_blobs: true,
            entries: blobs
                .iter()
                .map(|b| Entry {
                    kind: EntryKind::Blob,
                    name: hex::encode(b),
                    len: 1,
                    sha256: hex::encode(b),
                    mode: 0,
                })
                .collect(),
            external_blobs: Vec::new(),
        }
    }

    #[test]
    fn dest_by_path_shape() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Dest::parse(dir.path()), Dest::Dir(dir.path().into()));
        assert_eq!(
            Dest::parse(Path::new("/x/backups")),
            Dest::Dir("/x/backups".into())
        );
        assert_eq!(
            Dest::parse(Path::new("/x/one.age")),
            Dest::File("/x/one.age".into())
        );
    }

    #[test]
    fn known_blobs_come_from_archives_still_there_of_the_same_device() {
        let dir = tempfile::tempdir().unwrap();
        let key = [3u8; 32];
        let a = new_archive_path(dir.path(), 0, "devdevdevdev");
        assert!(
            a.to_string_lossy()
                .ends_with("iom-backup-19700101T000000Z-evdevdev.age")
        );
        std::fs::write(&a, b"x").unwrap();
        write_catalog(&a, &manifest(&[[1; 32]]), 1, &key).unwrap();
        let b = new_archive_path(dir.path(), 0, "devdevdevdev");
        assert_ne!(a, b, "a counter when the name is taken");
        write_catalog(&b, &manifest(&[[2; 32]]), 1, &key).unwrap(); // archive file missing
        let known = known_blobs(dir.path(), "dev").unwrap();
        assert_eq!(known.len(), 1);
        assert_eq!(
            known.get(&catalog_hash(&key, &[1; 32])).map(String::as_str),
            a.file_name().and_then(|n| n.to_str())
        );
        assert!(known_blobs(dir.path(), "other").unwrap().is_empty());
        // The catalog does not contain the blob hash itself.
        let text = std::fs::read_to_string(format!("{}{SUFFIX}", a.display())).unwrap();
        assert!(!text.contains(&hex::encode([1u8; 32])));
    }

    #[test]
    fn archives_of_one_second_are_listed_in_the_order_they_were_made() {
        let dir = tempfile::tempdir().unwrap();
        let key = [3u8; 32];
        let mut made = Vec::new();
        for i in 0..12u8 {
            let path = new_archive_path(dir.path(), 0, "devdevdevdev");
            std::fs::write(&path, b"x").unwrap();
            write_catalog(&path, &manifest(&[[i; 32]]), 1, &key).unwrap();
            made.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
        let listed: Vec<String> = catalogs(dir.path())
            .unwrap()
            .into_iter()
            .map(|c| c.archive)
            .collect();
        assert_eq!(
            listed, made,
            "`…-1.age` after `….age`, `…-10.age` after `…-9.age`"
        );
        assert_eq!(
            collision_index("iom-backup-19700101T000000Z-evdevdev-10.age"),
            10
        );
        assert_eq!(
            collision_index("iom-backup-19700101T000000Z-evdevdev.age"),
            0
        );
        assert_eq!(collision_index("something-else.age"), 0);
    }
}
