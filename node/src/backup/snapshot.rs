//! Taking a snapshot of what this device holds and writing it as an archive's plaintext.
//!
//! Everything but the blobs is read into memory first (documents one consistent state each,
//! see [`Store::load_doc_consistent`]; objects; the state records; the data dir's files), so the
//! manifest with every hash is written before any data. Blobs are immutable and addressed by
//! their hash, which is their manifest hash; their bytes are streamed from the store chunk by
//! chunk (each chunk verified as it is read) when the records are written.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use iom_protocol::keys::DeviceKey;

use super::BackupError;
use super::format::{self, Entry, EntryKind, ExternalBlob, FORMAT_VERSION, Manifest, pack};
use crate::identity::Identity;
use crate::store::{BlobMeta, Store};
use crate::trust::TrustBook;

/// State records that describe this store's internals or one peer's sync progress, and are
/// not carried over: per-peer document sync states (`ps/`, the restored device agrees with
/// each peer afresh, one inventory exchange) and partial blob transfers (`bp/`).
pub const SKIPPED_STATE: &[&[u8]] = &[b"ps/", b"bp/"];

/// What to put in a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Include blobs.
    pub blobs: bool,
    /// Blobs held by earlier archives of the same directory, by their catalog hash (see
    /// [`catalog_hash`]), with the archive that holds each: listed as external, not copied.
    pub known: HashMap<String, String>,
}

/// A snapshot taken, ready to be written.
#[derive(Debug)]
pub struct Snapshot {
    manifest: Manifest,
    /// The bytes of every non-blob entry, in manifest order.
    small: Vec<Vec<u8>>,
    /// The blobs, in manifest order after the small entries.
    blobs: Vec<([u8; 32], BlobMeta)>,
}

/// The key of this device's backup catalog: blob hashes in the plaintext catalog beside each
/// archive are keyed with it, so the catalog does not say which files the archives hold.
pub fn catalog_key(device: &DeviceKey) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"iom backup catalog v1");
    h.update(device.seed());
    h.finalize().into()
}

/// The catalog hash of blob `id` under `key` (hex).
pub fn catalog_hash(key: &[u8; 32], id: &[u8; 32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key);
    h.update(id);
    hex::encode(h.finalize())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(format!("{}: {e}", path.display()))
}

/// The data dir's files that a backup carries: `keys/`, `config.toml` and `workspaces/`.
fn data_files(data_dir: &Path) -> Result<Vec<(String, Vec<u8>, u32)>, BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo: Vec<(std::path::PathBuf, String)> = Vec::new();
    for top in ["keys", "config.toml", "workspaces"] {
        let p = data_dir.join(top);
        if p.symlink_metadata().is_ok() {
            todo.push((p, top.to_string()));
        }
    }
    while let Some((path, rel)) = todo.pop() {
        let meta = path.symlink_metadata().map_err(io_err(&path))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&path).map_err(io_err(&path))? {
                let e = e.map_err(io_err(&path))?;
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    tracing::warn!(path = %e.path().display(), "skipping a file whose name is not UTF-8");
                    continue;
                };
                if rel == "keys" && name.ends_with(".tmp") {
                    continue;
                }
                todo.push((e.path(), format!("{rel}/{name}")));
            }
        } else if meta.is_file() {
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            out.push((rel, bytes, meta.permissions().mode() & 0o777));
        }
        // Symlinks and special files are not carried.
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Encodes one document: kind, times, heads, chunks.
fn pack_doc(doc: &crate::store::StoredDoc) -> Vec<u8> {
    let mut out = Vec::new();
    pack::put(&mut out, doc.meta.kind.as_bytes());
    pack::put_u64(&mut out, doc.meta.created_at);
    pack::put_u64(&mut out, doc.meta.updated_at);
    pack::put_u64(&mut out, doc.meta.heads.len() as u64);
    for h in &doc.meta.heads {
        out.extend_from_slice(h);
    }
    pack::put_u64(&mut out, doc.chunks.len() as u64);
    for c in &doc.chunks {
        pack::put(&mut out, c);
    }
    out
}

impl Snapshot {
    /// Takes a snapshot of the store and the data dir's files. On a running node, flush the
    /// store first so every acknowledged write is in it.
    pub fn collect(
        store: &Store,
        data_dir: &Path,
        opts: &SnapshotOptions,
    ) -> Result<Snapshot, BackupError> {
        let identity = Identity::load(data_dir)?;
        let device = identity.device.id();
        let trust = TrustBook::load(store.clone(), identity.person)?;
        let name = trust
            .state()
            .devices
            .get(&device)
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let mut entries = Vec::new();
        let mut small = Vec::new();
        let mut push = |kind, name: String, bytes: Vec<u8>, mode| {
            entries.push(Entry {
                kind,
                name,
                len: bytes.len() as u64,
                sha256: format::sha256_hex(&bytes),
                mode,
            });
            small.push(bytes);
        };
        for (rel, bytes, mode) in data_files(data_dir)? {
            push(EntryKind::File, rel, bytes, mode);
        }
        let mut objects = Vec::new();
        for (_, bytes) in store.objects()? {
            pack::put(&mut objects, &bytes);
        }
        push(EntryKind::Objects, String::new(), objects, 0);
        let mut state = Vec::new();
        for (k, v) in store.state_scan(b"")? {
            if SKIPPED_STATE.iter().any(|p| k.starts_with(p)) {
                continue;
            }
            pack::put(&mut state, &k);
            pack::put(&mut state, &v);
        }
        push(EntryKind::State, String::new(), state, 0);
        for (id, _) in store.doc_metas()? {
            let doc = match store.load_doc_consistent(&id) {
                Ok(d) => d,
                // Removed meanwhile: not part of the snapshot.
                Err(crate::store::StoreError::NoSuchDoc(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            push(EntryKind::Doc, hex::encode(id), pack_doc(&doc), 0);
        }
        let mut blobs = Vec::new();
        let mut external_blobs = Vec::new();
        if opts.blobs {
            let key = catalog_key(&identity.device);
            for (id, meta) in store.blobs()? {
                if let Some(archive) = opts.known.get(&catalog_hash(&key, &id)) {
                    external_blobs.push(ExternalBlob {
                        id: hex::encode(id),
                        len: meta.len,
                        archive: archive.clone(),
                    });
                    continue;
                }
                entries.push(Entry {
                    kind: EntryKind::Blob,
                    name: hex::encode(id),
                    len: meta.len,
                    sha256: hex::encode(id),
                    mode: 0,
                });
                blobs.push((id, meta));
            }
        }
        let manifest = Manifest {
            format: FORMAT_VERSION,
            created_at: crate::time::now_secs(),
            device: device.to_string(),
            person: identity.person.to_string(),
            name,
            holds_person_key: identity.person_key.is_some(),
            with_blobs: opts.blobs,
            entries,
            external_blobs,
        };
        Ok(Snapshot {
            manifest,
            small,
            blobs,
        })
    }

    /// What the archive will hold.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Writes the plaintext: header, manifest, records, end.
    pub fn write(self, store: &Store, w: &mut dyn Write) -> Result<(), BackupError> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, w);
        format::write_start(&mut w, &self.manifest)?;
        let mut index = 0u32;
        for bytes in &self.small {
            format::write_entry_head(&mut w, index, bytes.len() as u64)?;
            w.write_all(bytes).map_err(format::FormatError::Io)?;
            index += 1;
        }
        for (id, meta) in &self.blobs {
            format::write_entry_head(&mut w, index, meta.len)?;
            for i in 0..meta.chunk_hashes.len() as u32 {
                let chunk = store.blob_chunk(id, meta, i)?;
                w.write_all(&chunk).map_err(format::FormatError::Io)?;
            }
            index += 1;
        }
        format::write_end(&mut w, index)?;
        w.flush().map_err(format::FormatError::Io)?;
        Ok(())
    }
}
