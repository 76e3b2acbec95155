//! The plaintext inside a backup's age encryption: a header, the manifest, then one record per
//! manifest entry, in manifest order, then an end record.
//!
//! ```text
//! header   "IOMBACKUP" (9 bytes) ‖ format version (u16, big endian)
//! record   tag (u8) ‖ index (u32 BE) ‖ length (u64 BE) ‖ bytes
//!          tag 1: the manifest (CBOR, index 0), first
//!          tag 2: the data of manifest entry `index`, entries in order
//!          tag 3: the end (index = number of entries, length 0)
//! ```
//!
//! The manifest names every entry with its kind, name, length and SHA-256, so a reader checks
//! each record as it reads it and refuses anything missing, extra, out of order or altered.
//! (age already authenticates every 64 KiB of the stream and refuses a truncated file; the
//! hashes make the manifest the one statement of what the archive holds, and let `verify`
//! say which entry is wrong.) A newer format version is refused before anything else is read.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The magic bytes at the start of the plaintext.
pub const MAGIC: &[u8; 9] = b"IOMBACKUP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Largest manifest accepted (a manifest of 100,000 documents is about 10 MiB).
pub const MAX_MANIFEST: u64 = 256 << 20;
/// Largest non-blob entry accepted (documents, the objects, the state records, files).
pub const MAX_ENTRY: u64 = 1 << 30;

const TAG_MANIFEST: u8 = 1;
const TAG_ENTRY: u8 = 2;
const TAG_END: u8 = 3;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A file of the data dir (keys, config, workspaces); `name` is its relative path.
    File,
    /// Every stored object (certificates); `name` is empty.
    Objects,
    /// The node's small state records (tokens, schedule and budget state, callbacks).
    State,
    /// One document; `name` is its id.
    Doc,
    /// One blob; `name` is its hash, which is also the entry's SHA-256.
    Blob,
}

/// One entry of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Its name (see [`EntryKind`]).
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// The SHA-256 of its bytes (hex).
    pub sha256: String,
    /// Unix mode bits, for files.
    #[serde(default)]
    pub mode: u32,
}

/// A blob this archive does not hold because an earlier archive of the same directory does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalBlob {
    /// The blob's hash (hex).
    pub id: String,
    /// Its length.
    pub len: u64,
    /// The file name of the archive that holds it (in the same directory).
    pub archive: String,
}

/// What an archive holds and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format version (the same as the header's).
    pub format: u16,
    /// Unix seconds when the snapshot was taken.
    pub created_at: u64,
    /// The device id of the backed-up device.
    pub device: String,
    /// Its person id.
    pub person: String,
    /// Its name.
    pub name: String,
    /// Whether the archive holds the person key.
    pub holds_person_key: bool,
    /// Whether blobs were included (all of them, here or in `external_blobs`).
    pub with_blobs: bool,
    /// The entries, in the order their records follow.
    pub entries: Vec<Entry>,
    /// Blobs held by earlier archives of the same directory (incremental backups).
    #[serde(default)]
    pub external_blobs: Vec<ExternalBlob>,
}

impl Manifest {
    /// Entries of one kind.
    pub fn count(&self, kind: EntryKind) -> usize {
        self.entries.iter().filter(|e| e.kind == kind).count()
    }

    /// Bytes of all entries.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.len).sum()
    }
}

/// Why the plaintext of an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing failed (for a read: the archive is truncated or damaged).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not an iom backup.
    #[error("this is not an iom backup (the decrypted data does not start with IOMBACKUP)")]
    NotABackup,
    /// Written by a newer iom.
    #[error(
        "the archive's format version {found} is newer than this iom reads ({FORMAT_VERSION}); \
         restore it with a newer iom"
    )]
    NewerVersion {
        /// The archive's version.
        found: u16,
    },
    /// The structure is wrong (a record out of place, a bad length, an unreadable manifest).
    #[error("the archive is damaged: {0}")]
    Damaged(String),
    /// An entry's bytes do not match the manifest's hash.
    #[error("the archive is damaged: {kind:?} {name:?} does not match its hash in the manifest")]
    HashMismatch {
        /// The entry kind.
        kind: EntryKind,
        /// The entry name.
        name: String,
    },
}

fn damaged(text: impl Into<String>) -> FormatError {
    FormatError::Damaged(text.into())
}

/// Writes the header and the manifest.
pub fn write_start(w: &mut impl Write, manifest: &Manifest) -> Result<(), FormatError> {
    write_header(w, manifest.format)?;
    let bytes = serde_cbor::to_vec(manifest)
        .map_err(|e| damaged(format!("cannot encode the manifest: {e}")))?;
    write_record_head(w, TAG_MANIFEST, 0, bytes.len() as u64)?;
    w.write_all(&bytes)?;
    Ok(())
}

/// Writes the header alone (tests write other versions with it).
pub fn write_header(w: &mut impl Write, version: u16) -> Result<(), FormatError> {
    w.write_all(MAGIC)?;
    w.write_all(&version.to_be_bytes())?;
    Ok(())
}

/// Writes the head of entry `index`'s record; its `len` bytes follow.
pub fn write_entry_head(w: &mut impl Write, index: u32, len: u64) -> Result<(), FormatError> {
    write_record_head(w, TAG_ENTRY, index, len)
}

/// Writes the end record after `count` entries.
pub fn write_end(w: &mut impl Write, count: u32) -> Result<(), FormatError> {
    write_record_head(w, TAG_END, count, 0)
}

fn write_record_head(w: &mut impl Write, tag: u8, index: u32, len: u64) -> Result<(), FormatError> {
    w.write_all(&[tag])?;
    w.write_all(&index.to_be_bytes())?;
    w.write_all(&len.to_be_bytes())?;
    Ok(())
}

fn read_record_head(r: &mut impl Read) -> Result<(u8, u32, u64), FormatError> {
    let mut head = [0u8; 13];
    r.read_exact(&mut head).map_err(truncated)?;
    let index = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[5..]);
    Ok((head[0], index, u64::from_be_bytes(len)))
}

/// An early end of the plaintext is a truncated archive.
fn truncated(e: std::io::Error) -> FormatError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        damaged("it ends early (truncated)")
    } else {
        FormatError::Io(e)
    }
}

/// Reads the header and the manifest; refuses another format version first.
pub fn read_start(r: &mut impl Read) -> Result<Manifest, FormatError> {
    let mut header = [0u8; 11];
    r.read_exact(&mut header).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FormatError::NotABackup
        } else {
            FormatError::Io(e)
        }
    })?;
    if &header[..9] != MAGIC {
        return Err(FormatError::NotABackup);
    }
    let version = u16::from_be_bytes([header[9], header[10]]);
    if version > FORMAT_VERSION {
        return Err(FormatError::NewerVersion { found: version });
    }
    if version == 0 {
        return Err(damaged("format version 0"));
    }
    let (tag, _, len) = read_record_head(r)?;
    if tag != TAG_MANIFEST {
        return Err(damaged("the manifest is not the first record"));
    }
    if len > MAX_MANIFEST {
        return Err(damaged(format!("a manifest of {len} bytes")));
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes).map_err(truncated)?;
    let manifest: Manifest = serde_cbor::from_slice(&bytes)
        .map_err(|e| damaged(format!("the manifest does not decode: {e}")))?;
    if manifest.format != version {
        return Err(damaged(format!(
            "the manifest says format {} but the header {version}",
            manifest.format
        )));
    }
    Ok(manifest)
}

/// Reads the records after the manifest, entry by entry, checking each against it.
#[derive(Debug)]
pub struct Records<'m> {
    manifest: &'m Manifest,
    next: usize,
}

impl<'m> Records<'m> {
    /// Records of `manifest`, whose start was just read.
    pub fn new(manifest: &'m Manifest) -> Records<'m> {
        Records { manifest, next: 0 }
    }

    /// The next entry's head: which entry it is. `None` after the end record (every entry
    /// was seen). The caller must then read exactly `entry.len` bytes through
    /// [`body`] (or [`small_body`]) before calling this again.
    pub fn next_entry(
        &mut self,
        r: &mut impl Read,
    ) -> Result<Option<(usize, &'m Entry)>, FormatError> {
        let (tag, index, len) = read_record_head(r)?;
        let count = self.manifest.entries.len();
        match tag {
            TAG_END if index as usize == count && self.next == count && len == 0 => Ok(None),
            TAG_END => Err(damaged(format!(
                "it ends after {} of {count} entries",
                self.next
            ))),
            TAG_ENTRY => {
                let i = index as usize;
                let entry = self
                    .manifest
                    .entries
                    .get(i)
                    .filter(|_| i == self.next)
                    .ok_or_else(|| {
                        damaged(format!("record {index} where {} was due", self.next))
                    })?;
                if entry.len != len {
                    return Err(damaged(format!(
                        "{:?} {:?} is {len} bytes, the manifest says {}",
                        entry.kind, entry.name, entry.len
                    )));
                }
                self.next += 1;
                Ok(Some((i, entry)))
            }
            other => Err(damaged(format!("an unknown record tag {other}"))),
        }
    }
}

/// Streams an entry's `len` bytes from `r` into `sink` in pieces of at most 256 KiB, and
/// checks them against the entry's hash at the end.
pub fn body(
    r: &mut impl Read,
    entry: &Entry,
    mut sink: impl FnMut(&[u8]) -> Result<(), FormatError>,
) -> Result<(), FormatError> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut left = entry.len;
    let mut buf = vec![0u8; (256 << 10).min(left.max(1)) as usize];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        r.read_exact(&mut buf[..n]).map_err(truncated)?;
        hash.update(&buf[..n]);
        sink(&buf[..n])?;
        left -= n as u64;
    }
    if hex::encode(hash.finalize()) != entry.sha256 {
        return Err(FormatError::HashMismatch {
            kind: entry.kind,
            name: entry.name.clone(),
        });
    }
    Ok(())
}

/// Reads a whole (non-blob) entry into memory and checks its hash.
pub fn small_body(r: &mut impl Read, entry: &Entry) -> Result<Vec<u8>, FormatError> {
    if entry.len > MAX_ENTRY {
        return Err(damaged(format!(
            "{:?} {:?} is {} bytes",
            entry.kind, entry.name, entry.len
        )));
    }
    let mut out = Vec::with_capacity(entry.len as usize);
    body(r, entry, |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

/// The SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Length-prefixed byte strings, the encoding of documents, objects and state records.
pub mod pack {
    /// Appends `bytes` with a u64 length.
    pub fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    /// Appends a u64.
    pub fn put_u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_be_bytes());
    }

    /// Reads back what [`put`] and [`put_u64`] wrote.
    #[derive(Debug)]
    pub struct Reader<'a>(pub &'a [u8]);

    impl<'a> Reader<'a> {
        /// The next u64, or `None` at a short end.
        pub fn u64(&mut self) -> Option<u64> {
            let (head, rest) = self.0.split_at_checked(8)?;
            self.0 = rest;
            Some(u64::from_be_bytes(head.try_into().ok()?))
        }

        /// The next byte string, or `None` at a short end.
        pub fn bytes(&mut self) -> Option<&'a [u8]> {
            let len = usize::try_from(self.u64()?).ok()?;
            let (head, rest) = self.0.split_at_checked(len)?;
            self.0 = rest;
            Some(head)
        }

        /// Whether everything was read.
        pub fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            created_at: 1,
            device: "d".into(),
            person: "p".into(),
            name: "n".into(),
            holds_person_key: false,
            with_blobs: false,
            entries,
            external_blobs: Vec::new(),
        }
    }

    fn entry(name: &str, data: &[u8]) -> Entry {
        Entry {
            kind: EntryKind::File,
            name: name.into(),
            len: data.len() as u64,
            sha256: sha256_hex(data),
            mode: 0o600,
        }
    }

    fn archive(m: &Manifest, datas: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        write_start(&mut out, m).unwrap();
        for (i, d) in datas.iter().enumerate() {
            write_entry_head(&mut out, i as u32, d.len() as u64).unwrap();
            out.extend_from_slice(d);
        }
        write_end(&mut out, datas.len() as u32).unwrap();
        out
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Vec<u8>>, FormatError> {
        let mut r = bytes;
        let m = read_start(&mut r)?;
        let mut recs = Records::new(&m);
        let mut out = Vec::new();
        while let Some((_, e)) = recs.next_entry(&mut r)? {
            out.push(small_body(&mut r, e)?);
        }
        if !r.is_empty() {
            return Err(damaged("trailing bytes"));
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let m = manifest(vec![entry("a", b"hello"), entry("b", b"")]);
        let bytes = archive(&m, &[b"hello", b""]);
        assert_eq!(read_all(&bytes).unwrap(), vec![b"hello".to_vec(), vec![]]);
        let mut r = bytes.as_slice();
        assert_eq!(read_start(&mut r).unwrap(), m);
    }

    #[test]
    fn a_newer_version_is_refused_before_the_manifest() {
        let mut bytes = Vec::new();
        write_header(&mut bytes, FORMAT_VERSION + 1).unwrap();
        bytes.extend_from_slice(b"whatever follows");
        let err = read_all(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::NewerVersion { found } if found == FORMAT_VERSION + 1));
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn not_a_backup() {
        assert!(matches!(
            read_all(b"hello world"),
            Err(FormatError::NotABackup)
        ));
        assert!(matches!(read_all(b""), Err(FormatError::NotABackup)));
    }

    #[test]
    fn every_truncation_is_refused() {
        let m = manifest(vec![entry("a", b"hello"), entry("b", b"world")]);
        let bytes = archive(&m, &[b"hello", b"world"]);
        for cut in 0..bytes.len() {
            assert!(read_all(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn altered_bytes_missing_and_reordered_entries_are_refused() {
        let m = manifest(vec![entry("a", b"hello"), entry("b", b"world")]);
        let tampered = archive(&m, &[b"hellp", b"world"]);
        assert!(matches!(
            read_all(&tampered),
            Err(FormatError::HashMismatch { ref name, .. }) if name == "a"
        ));
        // One entry short: the end record comes early.
        let mut short = Vec::new();
        write_start(&mut short, &m).unwrap();
        write_entry_head(&mut short, 0, 5).unwrap();
        short.extend_from_slice(b"hello");
        write_end(&mut short, 2).unwrap();
        let err = read_all(&short).unwrap_err();
        assert!(err.to_string().contains("ends after 1 of 2"), "{err}");
        // Out of order.
        let mut swapped = Vec::new();
        write_start(&mut swapped, &m).unwrap();
        write_entry_head(&mut swapped, 1, 5).unwrap();
        swapped.extend_from_slice(b"world");
        assert!(read_all(&swapped).is_err());
        // A length that differs from the manifest's.
        let mut long = Vec::new();
        write_start(&mut long, &m).unwrap();
        write_entry_head(&mut long, 0, 6).unwrap();
        long.extend_from_slice(b"hello!");
        assert!(read_all(&long).unwrap_err().to_string().contains("6 bytes"));
    }

    #[test]
    fn pack_round_trip_and_short_input() {
        let mut out = Vec::new();
        pack::put(&mut out, b"abc");
        pack::put_u64(&mut out, 7);
        let mut r = pack::Reader(&out);
        assert_eq!(r.bytes(), Some(b"abc".as_slice()));
        assert_eq!(r.u64(), Some(7));
        assert!(r.is_empty());
        let mut short = pack::Reader(&out[..5]);
        assert_eq!(short.bytes(), None);
    }
}
