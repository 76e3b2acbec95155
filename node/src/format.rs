//! The data dir's format version: recorded in `DATA/FORMAT`, checked before anything else is
//! opened, and migrated forward one step at a time.
//!
//! - Format 1: every data dir written before the version was recorded (no `FORMAT` file). Its
//!   layout is the one format 2 has; the compatibility fixture of commit 19d953e is one.
//! - Format 2: the layout of format 1 with `FORMAT` written.
//! - Format 3: the store keeps the blob totals (count, digest and bytes of the stored blobs,
//!   `store::blobset`), updated by every blob add. The step itself changes nothing: the store
//!   makes the record at its first open. The format marks that every blob add since has kept
//!   it up to date, so a format-2 binary (which would add blobs without counting them) refuses
//!   the dir.
//!
//! A binary opens every format up to [`CURRENT`], migrating older ones in place (under the data
//! dir lock, each step recorded as it completes, so an interrupted migration resumes), and
//! refuses a newer one with an error that names the version that wrote it. A change to the
//! layout of anything under the data dir adds a format and a `Step`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format this binary writes.
pub const CURRENT: u32 = 3;

/// The format of a data dir with no `FORMAT` file but with keys or a store.
const UNMARKED: u32 = 1;

/// The file name, directly under the data dir.
const FILE: &str = "FORMAT";

/// Errors reading, checking or migrating the format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The data dir was written by a newer iom.
    #[error(
        "{dir} holds data format {found}, written by iom {written_by}; this iom ({ours}) reads \
         formats up to {CURRENT}: install iom {written_by} or newer (nothing was changed)"
    )]
    Newer {
        /// The data dir.
        dir: String,
        /// The format found.
        found: u32,
        /// The version of iom that recorded it.
        written_by: String,
        /// This binary's version.
        ours: &'static str,
    },
    /// `FORMAT` exists but cannot be read or understood.
    #[error(
        "{path} is unreadable ({reason}); if the data dir is intact, remove the file and iom treats the dir as format 1"
    )]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Writing `FORMAT` failed.
    #[error("cannot record the data format in {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A migration step failed; the dir stays at the format before it.
    #[error("migrating {dir} from data format {from} to {to} failed: {reason}")]
    Migration {
        /// The data dir.
        dir: String,
        /// The format migrated from.
        from: u32,
        /// The format migrated to.
        to: u32,
        /// Why.
        reason: String,
    },
}

/// What `FORMAT` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The format of the data dir.
    pub format: u32,
    /// The iom version that wrote this marker.
    pub written_by: String,
}

/// One migration: from `from` to `from + 1`.
struct Step {
    from: u32,
    what: &'static str,
    run: fn(&Path) -> Result<(), String>,
}

/// Every migration, in order. Each step moves a dir from `from` to `from + 1`.
const STEPS: &[Step] = &[
    Step {
        from: 1,
        what: "record the data format (the layout of format 1 is unchanged)",
        run: |_| Ok(()),
    },
    Step {
        from: 2,
        what: "keep the blob totals (the store counts its blobs once at its next open)",
        run: |_| Ok(()),
    },
];

/// The outcome of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The format found before any migration.
    pub found: u32,
    /// What each migration step that ran did.
    pub migrated: Vec<&'static str>,
}

/// The data dir's format, refusing one newer than [`CURRENT`]. Reads only; safe without the
/// lock. A dir with nothing in it yet (no keys, no store) counts as [`CURRENT`].
pub fn check(data_dir: &Path) -> Result<u32, FormatError> {
    let marker = read(data_dir)?;
    let found = match &marker {
        Some(marker) => marker.format,
        None if holds_data(data_dir) => UNMARKED,
        None => CURRENT,
    };
    if found > CURRENT {
        return Err(FormatError::Newer {
            dir: data_dir.display().to_string(),
            found,
            written_by: marker.map_or_else(|| "unknown".into(), |m| m.written_by),
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    Ok(found)
}

/// Records the current format in a data dir that `holds_data` says is new (call before
/// creating its keys, so the marker is there first).
pub fn mark_new(data_dir: &Path) -> Result<(), FormatError> {
    if holds_data(data_dir) || read(data_dir)?.is_some() {
        return Ok(());
    }
    write(data_dir, CURRENT)
}

/// Checks the data dir's format and migrates it to [`CURRENT`]. Call with the data dir lock
/// held, before the keys and the store are opened.
pub fn open(data_dir: &Path) -> Result<Opened, FormatError> {
    let found = check(data_dir)?;
    let dir = data_dir.display().to_string();
    let mut format = found;
    let mut migrated = Vec::new();
    while format < CURRENT {
        let step =
            STEPS
                .iter()
                .find(|s| s.from == format)
                .ok_or_else(|| FormatError::Migration {
                    dir: dir.clone(),
                    from: format,
                    to: format + 1,
                    reason: "this build has no migration for it".into(),
                })?;
        (step.run)(data_dir).map_err(|reason| FormatError::Migration {
            dir: dir.clone(),
            from: format,
            to: format + 1,
            reason,
        })?;
        format += 1;
        write(data_dir, format)?;
        tracing::info!(
            from = format - 1,
            to = format,
            what = step.what,
            "data dir migrated"
        );
        migrated.push(step.what);
    }
    if read(data_dir)?.is_none() {
        write(data_dir, CURRENT)?;
    }
    Ok(Opened { found, migrated })
}

/// The marker, if the data dir has one.
pub fn read(data_dir: &Path) -> Result<Option<Marker>, FormatError> {
    let path = data_dir.join(FILE);
    let unreadable = |reason: String| FormatError::Unreadable {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| unreadable(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unreadable(e.to_string())),
    }
}

/// Whether the dir already holds a node's data (keys or a store).
fn holds_data(data_dir: &Path) -> bool {
    data_dir.join("keys").exists() || data_dir.join("db").exists()
}

/// Records `format` durably: a temporary file, fsynced, renamed over `FORMAT`, and the dir
/// fsynced, so a crash leaves either the old marker or the new one.
fn write(data_dir: &Path, format: u32) -> Result<(), FormatError> {
    let path = data_dir.join(FILE);
    let failed = |source| FormatError::Write {
        path: path.display().to_string(),
        source,
    };
    let marker = Marker {
        format,
        written_by: env!("CARGO_PKG_VERSION").to_string(),
    };
    let mut bytes = serde_json::to_vec_pretty(&marker).map_err(|e| failed(e.into()))?;
    bytes.push(b'\n');
    let tmp: PathBuf = data_dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(failed)?;
    file.write_all(&bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&tmp, &path).map_err(failed)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temp dir")
    }

    #[test]
    fn a_new_dir_gets_the_current_format() {
        let d = dir();
        let opened = open(d.path()).expect("opens");
        assert_eq!(opened.found, CURRENT);
        assert!(opened.migrated.is_empty());
        let marker = read(d.path()).expect("readable").expect("written");
        assert_eq!(marker.format, CURRENT);
        assert_eq!(marker.written_by, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn mark_new_marks_only_an_empty_dir() {
        let d = dir();
        mark_new(d.path()).expect("marks");
        assert_eq!(read(d.path()).expect("ok").map(|m| m.format), Some(CURRENT));
        let old = dir();
        std::fs::create_dir(old.path().join("db")).expect("mkdir");
        mark_new(old.path()).expect("no-op");
        assert_eq!(read(old.path()).expect("ok"), None);
        assert_eq!(check(old.path()).expect("ok"), 1);
    }

    #[test]
    fn an_unmarked_dir_with_data_is_format_1_and_is_migrated() {
        let d = dir();
        std::fs::create_dir(d.path().join("keys")).expect("mkdir");
        let opened = open(d.path()).expect("opens");
        assert_eq!(opened.found, 1);
        assert_eq!(opened.migrated.len(), (CURRENT - 1) as usize);
        assert_eq!(read(d.path()).expect("ok").map(|m| m.format), Some(CURRENT));
        // Opening again migrates nothing.
        let again = open(d.path()).expect("opens");
        assert_eq!(again.found, CURRENT);
        assert!(again.migrated.is_empty());
    }

    #[test]
    fn a_newer_format_is_refused_and_left_alone() {
        let d = dir();
        let newer = br#"{"format": 9, "written_by": "7.0.0"}"#;
        std::fs::write(d.path().join(FILE), newer).expect("write");
        let err = open(d.path()).expect_err("refused");
        let text = err.to_string();
        assert!(
            matches!(err, FormatError::Newer { found: 9, .. }),
            "{err:?}"
        );
        assert!(text.contains("iom 7.0.0"), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
        assert_eq!(
            std::fs::read(d.path().join(FILE)).expect("read"),
            newer.to_vec()
        );
    }

    #[test]
    fn a_damaged_marker_is_a_clear_error() {
        let d = dir();
        std::fs::write(d.path().join(FILE), b"\xff not json").expect("write");
        let err = open(d.path()).expect_err("refused");
        assert!(matches!(err, FormatError::Unreadable { .. }), "{err:?}");
        assert!(err.to_string().contains("FORMAT"), "{err}");
    }

    #[test]
    fn every_format_below_current_has_a_step() {
        for from in UNMARKED..CURRENT {
            assert!(STEPS.iter().any(|s| s.from == from), "no step from {from}");
        }
    }
}
