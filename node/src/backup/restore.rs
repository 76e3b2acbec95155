//! Verifying an archive, and restoring it onto an empty data dir.
//!
//! A restore writes into a staging directory beside the target and renames it into place only
//! after every record was read and checked, so a bad archive (wrong passphrase, truncated,
//! tampered, a newer format, a missing earlier archive) leaves the target as it was.
//!
//! With `--new-device` the restored device gets a fresh device key, and the old key is revoked
//! in the same step: with the person key (when the archive holds it) a new admin certificate,
//! the revocation and, if the old device held the agent role, a new agent-role certificate are
//! signed offline; without it, the old device key signs its own revocation (valid when it was
//! an admin) and the new device joins the mesh with an invite from an admin device.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use iom_protocol::cert::CertBody;
use iom_protocol::keys::DeviceKey;

use super::BackupError;
use super::crypt::Unlock;
use super::format::{self, Entry, EntryKind, FormatError, Manifest, Records, pack};
use crate::identity::Identity;
use crate::store::{DocMeta, Store};
use crate::trust::TrustBook;

/// What a verification found.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The archive's manifest (every entry checked against it).
    pub manifest: Manifest,
    /// Earlier archives it refers to that are not beside it.
    pub missing_bases: Vec<String>,
}

/// How to restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Come back as a new device (fresh key) and revoke the old one.
    pub new_device: bool,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The archive's manifest.
    pub manifest: Manifest,
    /// The restored device's id (new with `--new-device`).
    pub device: String,
    /// With `--new-device`: the old device id, revoked.
    pub replaced: Option<String>,
    /// With `--new-device` without the person key: the new device must join with an invite.
    pub needs_invite: bool,
    /// With `--new-device`: whether the revocation of the old device was signed here (else an
    /// admin device must revoke it).
    pub revoked_here: bool,
    /// Blobs restored (from this archive and earlier ones).
    pub blobs: usize,
}

fn open_plain(archive: &Path, unlock: &Unlock) -> Result<impl Read + use<>, BackupError> {
    let file = std::fs::File::open(archive).map_err(BackupError::io(archive))?;
    let plain = unlock.open(BufReader::with_capacity(1 << 20, file))?;
    Ok(BufReader::with_capacity(1 << 20, plain))
}

fn is_hex(text: &str, bytes: usize) -> bool {
    text.len() == bytes * 2
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A file entry's path, if it is one a backup may hold: relative, no `..`, under `keys/` or
/// `workspaces/`, or `config.toml`.
fn safe_path(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let first = path.components().next()?;
    let ok = match first.as_os_str().to_str()? {
        "keys" | "workspaces" => path.components().count() >= 2,
        "config.toml" => path.components().count() == 1,
        _ => false,
    };
    ok.then(|| path.to_path_buf())
}

/// Checks what the manifest says before any data is read.
fn check_manifest(m: &Manifest) -> Result<(), BackupError> {
    let bad = |what: String| Err(BackupError::Content(what));
    if m.device.parse::<iom_protocol::keys::DeviceId>().is_err() {
        return bad(format!("device id {:?}", m.device));
    }
    let mut seen = BTreeSet::new();
    for e in &m.entries {
        let ok = match e.kind {
            EntryKind::File => safe_path(&e.name).is_some(),
            EntryKind::Objects | EntryKind::State => e.name.is_empty(),
            EntryKind::Doc => is_hex(&e.name, 16),
            EntryKind::Blob => is_hex(&e.name, 32) && e.sha256 == e.name,
        };
        if !ok || !seen.insert((e.kind as u8, e.name.clone())) {
            return bad(format!("entry {:?} {:?}", e.kind, e.name));
        }
    }
    for b in &m.external_blobs {
        if !is_hex(&b.id, 32) || safe_archive_name(&b.archive).is_none() {
            return bad(format!("external blob {:?} in {:?}", b.id, b.archive));
        }
    }
    Ok(())
}

/// An earlier archive's name: a plain file name, nothing else.
fn safe_archive_name(name: &str) -> Option<&str> {
    let p = Path::new(name);
    (p.components().count() == 1 && matches!(p.components().next(), Some(Component::Normal(_))))
        .then_some(name)
}

/// The rest of the plaintext must be empty.
fn expect_end(r: &mut impl Read) -> Result<(), BackupError> {
    let mut one = [0u8; 1];
    match r.read(&mut one) {
        Ok(0) => Ok(()),
        Ok(_) => Err(FormatError::Damaged("bytes after the end record".into()).into()),
        Err(e) => Err(FormatError::Io(e).into()),
    }
}

/// Decrypts `archive` and checks every entry against its manifest hash.
pub fn verify(archive: &Path, unlock: &Unlock) -> Result<Verified, BackupError> {
    let mut r = open_plain(archive, unlock)?;
    let manifest = format::read_start(&mut r)?;
    check_manifest(&manifest)?;
    let mut records = Records::new(&manifest);
    while let Some((_, e)) = records.next_entry(&mut r)? {
        match e.kind {
            EntryKind::Blob => format::body(&mut r, e, |_| Ok(()))?,
            _ => {
                let bytes = format::small_body(&mut r, e)?;
                decode_content(e, &bytes)?;
            }
        }
    }
    expect_end(&mut r)?;
    let dir = archive.parent().unwrap_or(Path::new("."));
    let mut missing: Vec<String> = manifest
        .external_blobs
        .iter()
        .map(|b| b.archive.clone())
        .filter(|a| !dir.join(a).is_file())
        .collect();
    missing.sort();
    missing.dedup();
    Ok(Verified {
        manifest,
        missing_bases: missing,
    })
}

/// A decoded non-blob entry.
enum Content {
    File(PathBuf, Vec<u8>, u32),
    Objects(Vec<Vec<u8>>),
    State(Vec<(Vec<u8>, Vec<u8>)>),
    Doc([u8; 16], DocMeta, Vec<Vec<u8>>),
}

fn decode_content(e: &Entry, bytes: &[u8]) -> Result<Content, BackupError> {
    let bad = || BackupError::Content(format!("{:?} {:?} does not decode", e.kind, e.name));
    let mut r = pack::Reader(bytes);
    let content = match e.kind {
        EntryKind::File => {
            Content::File(safe_path(&e.name).ok_or_else(bad)?, bytes.to_vec(), e.mode)
        }
        EntryKind::Objects => {
            let mut out = Vec::new();
            while !r.is_empty() {
                out.push(r.bytes().ok_or_else(bad)?.to_vec());
            }
            Content::Objects(out)
        }
        EntryKind::State => {
            let mut out = Vec::new();
            while !r.is_empty() {
                let k = r.bytes().ok_or_else(bad)?.to_vec();
                let v = r.bytes().ok_or_else(bad)?.to_vec();
                out.push((k, v));
            }
            Content::State(out)
        }
        EntryKind::Doc => {
            let id: [u8; 16] = hex::decode(&e.name)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(bad)?;
            let kind = String::from_utf8(r.bytes().ok_or_else(bad)?.to_vec()).map_err(|_| bad())?;
            let created_at = r.u64().ok_or_else(bad)?;
            let updated_at = r.u64().ok_or_else(bad)?;
            let n = r.u64().ok_or_else(bad)?;
            let mut heads = Vec::new();
            for _ in 0..n {
                let (h, rest) = r.0.split_at_checked(32).ok_or_else(bad)?;
                heads.push(<[u8; 32]>::try_from(h).map_err(|_| bad())?);
                r.0 = rest;
            }
            let n = r.u64().ok_or_else(bad)?;
            let mut chunks = Vec::new();
            for _ in 0..n {
                chunks.push(r.bytes().ok_or_else(bad)?.to_vec());
            }
            if chunks.is_empty() || !r.is_empty() {
                return Err(bad());
            }
            let meta = DocMeta {
                kind,
                snapshot_seq: 0,
                next_seq: chunks.len() as u64,
                heads,
                created_at,
                updated_at,
            };
            Content::Doc(id, meta, chunks)
        }
        EntryKind::Blob => return Err(bad()),
    };
    Ok(content)
}

fn write_file(root: &Path, rel: &Path, bytes: &[u8], mode: u32) -> Result<(), BackupError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(BackupError::io(parent))?;
    }
    crate::secret_file::write_secret(&path, bytes).map_err(BackupError::io(&path))?;
    // Keys stay 0600 whatever the archive says; other files get their mode back.
    if !rel.starts_with("keys") && mode != 0 {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(BackupError::io(&path))?;
    }
    Ok(())
}

/// Whether `dir` is missing or an empty directory.
fn is_empty_dir(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackupError::Io(format!("{}: {e}", dir.display()))),
    }
}

/// Restores `archive` onto `target`, which must be missing or empty.
pub async fn restore(
    archive: &Path,
    unlock: &Unlock,
    target: &Path,
    opts: RestoreOptions,
) -> Result<Restored, BackupError> {
    if !is_empty_dir(target)? {
        return Err(BackupError::NotEmpty(target.display().to_string()));
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("data");
    let staging = parent.join(format!(".{file_name}.restoring-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(BackupError::io(&staging))?;
    }
    std::fs::create_dir_all(parent).map_err(BackupError::io(parent))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(BackupError::io(&staging))?;
    }
    let result = restore_into(archive, unlock, &staging, opts).await;
    match result {
        Ok(restored) => {
            if target.exists() {
                std::fs::remove_dir(target).map_err(BackupError::io(target))?;
            }
            std::fs::rename(&staging, target).map_err(BackupError::io(target))?;
            Ok(restored)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

async fn restore_into(
    archive: &Path,
    unlock: &Unlock,
    staging: &Path,
    opts: RestoreOptions,
) -> Result<Restored, BackupError> {
    let store = Store::open(&staging.join("db"), 16 << 20)?;
    let mut r = open_plain(archive, unlock)?;
    let manifest = format::read_start(&mut r)?;
    check_manifest(&manifest)?;
    let mut records = Records::new(&manifest);
    let mut blobs = 0;
    while let Some((_, e)) = records.next_entry(&mut r)? {
        if e.kind == EntryKind::Blob {
            restore_blob(&store, &mut r, e).await?;
            blobs += 1;
            continue;
        }
        let bytes = format::small_body(&mut r, e)?;
        match decode_content(e, &bytes)? {
            Content::File(rel, bytes, mode) => write_file(staging, &rel, &bytes, mode)?,
            Content::Objects(objects) => {
                for o in objects {
                    store.put_object(&o)?;
                }
            }
            Content::State(records) => {
                for (k, v) in records {
                    store.state_put(&k, &v)?;
                }
            }
            Content::Doc(id, meta, chunks) => store.import_doc(&id, &meta, &chunks)?,
        }
    }
    expect_end(&mut r)?;
    drop(r);
    blobs += restore_external(archive, unlock, &store, &manifest).await?;
    let identity = Identity::load(staging)?;
    if identity.device.id().to_string() != manifest.device {
        return Err(BackupError::Content(
            "its device key does not match the device named in its manifest".into(),
        ));
    }
    let mut restored = Restored {
        device: manifest.device.clone(),
        manifest,
        replaced: None,
        needs_invite: false,
        revoked_here: false,
        blobs,
    };
    if opts.new_device {
        become_new_device(staging, &store, identity, &mut restored)?;
    }
    store.flush().await?;
    drop(store);
    Ok(restored)
}

async fn restore_blob(store: &Store, r: &mut impl Read, e: &Entry) -> Result<(), BackupError> {
    let id: [u8; 32] = hex::decode(&e.name)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| BackupError::Content(format!("blob name {:?}", e.name)))?;
    let mut w = store.blob_writer(Some(id))?;
    format::body(r, e, |b| {
        w.write(b).map_err(|e| FormatError::Damaged(e.to_string()))
    })?;
    w.finish().await?;
    Ok(())
}

/// Restores the blobs an incremental archive leaves to earlier archives of its directory.
async fn restore_external(
    archive: &Path,
    unlock: &Unlock,
    store: &Store,
    manifest: &Manifest,
) -> Result<usize, BackupError> {
    let dir = archive.parent().unwrap_or(Path::new("."));
    let mut by_archive: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for b in &manifest.external_blobs {
        by_archive.entry(&b.archive).or_default().insert(&b.id);
    }
    let mut restored = 0;
    for (name, mut wanted) in by_archive {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(BackupError::MissingBase {
                archive: name.to_string(),
                dir: dir.display().to_string(),
                count: wanted.len(),
            });
        }
        let mut r = open_plain(&path, unlock)?;
        let base = format::read_start(&mut r)?;
        check_manifest(&base)?;
        if base.device != manifest.device {
            return Err(BackupError::Content(format!(
                "{name} is another device's backup"
            )));
        }
        let mut records = Records::new(&base);
        while let Some((_, e)) = records.next_entry(&mut r)? {
            if e.kind == EntryKind::Blob && wanted.remove(e.name.as_str()) {
                restore_blob(store, &mut r, e).await?;
                restored += 1;
            } else {
                format::body(&mut r, e, |_| Ok(()))?;
            }
        }
        if let Some(first) = wanted.first() {
            return Err(BackupError::Content(format!(
                "{name} does not hold blob {first}, which this archive says it does"
            )));
        }
    }
    Ok(restored)
}

/// Gives the restored data dir a new device key and revokes the old one (see the module doc).
fn become_new_device(
    staging: &Path,
    store: &Store,
    identity: Identity,
    restored: &mut Restored,
) -> Result<(), BackupError> {
    let old = identity.device.id();
    let trust = TrustBook::load(store.clone(), identity.person)?;
    let state = trust.state();
    let fresh = DeviceKey::from_seed(crate::time::random_bytes::<32>());
    let now = crate::time::now_secs();
    let revocation = CertBody::Revocation {
        person: identity.person,
        device: old,
        reason: format!(
            "replaced by {} after a restore (the old key may be compromised)",
            fresh.id()
        ),
        issued_at: now,
    };
    let sign_err =
        |e: iom_protocol::cert::CertError| BackupError::NewDevice(format!("cannot sign: {e}"));
    let mut certs = Vec::new();
    if let Some(person_key) = &identity.person_key {
        let old_entry = state.devices.get(&old);
        let name = old_entry
            .map(|d| d.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| restored.manifest.name.clone());
        certs.push(
            crate::identity::issue(
                CertBody::Device {
                    kind: None,
                    person: identity.person,
                    device: fresh.id(),
                    name,
                    admin: old_entry.is_none_or(|d| d.admin),
                    issued_at: now,
                },
                Some(person_key),
                &fresh,
            )
            .map_err(sign_err)?,
        );
        certs.push(crate::identity::issue(revocation, Some(person_key), &fresh).map_err(sign_err)?);
        if state.agent.is_some_and(|a| a.device == old) {
            certs.push(
                crate::identity::issue(
                    CertBody::AgentRole {
                        person: identity.person,
                        device: fresh.id(),
                        epoch: state.next_agent_epoch(),
                        issued_at: now,
                    },
                    Some(person_key),
                    &fresh,
                )
                .map_err(sign_err)?,
            );
        }
        restored.revoked_here = true;
    } else {
        // Without the person key the new device needs an invite; the old key revokes itself,
        // which counts when it was an admin (a revocation by an admin stays valid).
        if state.is_admin(&old) {
            certs.push(
                crate::identity::issue(revocation, None, &identity.device).map_err(sign_err)?,
            );
            restored.revoked_here = true;
        }
        restored.needs_invite = true;
    }
    for c in certs {
        store.put_object(&c.to_bytes())?;
    }
    let key_path = staging.join("keys").join("device.key");
    crate::secret_file::write_secret(&key_path, &fresh.seed())
        .map_err(BackupError::io(&key_path))?;
    restored.replaced = Some(old.to_string());
    restored.device = fresh.id().to_string();
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backup::crypt::Seal;
    use crate::backup::snapshot::{Snapshot, SnapshotOptions};

    /// A stopped device: keys, a config, a workspace file, two documents, a blob, state.
    async fn device() -> (tempfile::TempDir, PathBuf, [u8; 32]) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        crate::node::init_data_dir(&data).unwrap();
        std::fs::write(data.join("config.toml"), "name = \"home\"\n").unwrap();
        std::fs::create_dir_all(data.join("workspaces/c1")).unwrap();
        std::fs::write(data.join("workspaces/c1/notes.txt"), "hello").unwrap();
        let store = reopen(&data.join("db"));
        store
            .append_doc_chunk(&[1; 16], "generic", b"snapshot", vec![[7; 32]])
            .unwrap();
        store
            .append_doc_chunk(&[1; 16], "generic", b"change", vec![[8; 32]])
            .unwrap();
        store
            .append_doc_chunk(&[2; 16], "memory", b"other", vec![[9; 32]])
            .unwrap();
        store.state_put(b"http/token/x", b"token").unwrap();
        store.state_put(b"ps/peer/doc", b"sync state").unwrap();
        let mut w = store.blob_writer(None).unwrap();
        w.write(&vec![3u8; 300_000]).unwrap();
        let (blob, _) = w.finish().await.unwrap();
        // The device's own certificate, as a node would have made at start.
        let id = Identity::load(&data).unwrap();
        let cert = crate::identity::issue(
            CertBody::Device {
                kind: None,
                person: id.person,
                device: id.device.id(),
                name: "home".into(),
                admin: true,
                issued_at: 1,
            },
            id.person_key.as_ref(),
            &id.device,
        )
        .unwrap();
        store.put_object(&cert.to_bytes()).unwrap();
        store.flush().await.unwrap();
        (tmp, data, blob)
    }

    /// Opens the store a test just dropped: sled's flusher thread can hold the file lock for a
    /// moment after the last handle is gone.
    fn reopen(db: &Path) -> Store {
        for _ in 0..100 {
            match Store::open(db, 1 << 20) {
                Ok(store) => return store,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        Store::open(db, 1 << 20).unwrap()
    }

    fn archive_of(data: &Path, out: &Path, seal: &Seal) {
        let store = reopen(&data.join("db"));
        let opts = SnapshotOptions {
            blobs: true,
            ..SnapshotOptions::default()
        };
        let snap = Snapshot::collect(&store, data, &opts).unwrap();
        crate::backup::write_archive(out, seal, |w| snap.write(&store, w)).unwrap();
    }

    #[tokio::test]
    async fn a_restore_brings_back_everything_but_per_peer_sync_state() {
        let (tmp, data, blob) = device().await;
        let key = age::x25519::Identity::generate();
        let seal = Seal::recipient(&key.to_public().to_string()).unwrap();
        let archive = tmp.path().join("a.age");
        archive_of(&data, &archive, &seal);
        let unlock = Unlock::Identity(Box::new(key));
        let v = verify(&archive, &unlock).unwrap();
        assert_eq!(v.manifest.count(EntryKind::Doc), 2);
        assert_eq!(v.manifest.count(EntryKind::Blob), 1);
        assert!(v.manifest.holds_person_key);

        let target = tmp.path().join("restored");
        let r = restore(&archive, &unlock, &target, RestoreOptions::default())
            .await
            .unwrap();
        assert_eq!(r.blobs, 1);
        let old = Identity::load(&data).unwrap();
        let back = Identity::load(&target).unwrap();
        assert_eq!(back.device.id(), old.device.id());
        assert_eq!(r.device, old.device.id().to_string());
        assert!(back.person_key.is_some());
        assert_eq!(
            std::fs::read_to_string(target.join("workspaces/c1/notes.txt")).unwrap(),
            "hello"
        );
        assert!(
            std::fs::read_to_string(target.join("config.toml"))
                .unwrap()
                .contains("home")
        );
        let store = reopen(&target.join("db"));
        let doc = store.load_doc(&[1; 16]).unwrap();
        assert_eq!(doc.chunks, vec![b"snapshot".to_vec(), b"change".to_vec()]);
        assert_eq!(doc.meta.heads, vec![[8; 32]]);
        assert_eq!(store.load_doc(&[2; 16]).unwrap().meta.kind, "memory");
        assert_eq!(
            store.state_get(b"http/token/x").unwrap(),
            Some(b"token".to_vec())
        );
        assert_eq!(
            store.state_get(b"ps/peer/doc").unwrap(),
            None,
            "per-peer sync state is not carried"
        );
        let meta = store.blob_meta(&blob).unwrap().unwrap();
        assert_eq!(
            store.blob_chunk(&blob, &meta, 1).unwrap().len(),
            300_000 - 262_144
        );
        // Nothing is left beside the target.
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");

        // A second restore onto the now non-empty target is refused.
        let err = restore(&archive, &unlock, &target, RestoreOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::NotEmpty(_)), "{err}");
    }

    #[tokio::test]
    async fn a_new_device_restore_revokes_the_old_key_and_takes_the_agent_role() {
        let (tmp, data, _) = device().await;
        let old = Identity::load(&data).unwrap();
        {
            let store = reopen(&data.join("db"));
            let role = crate::identity::issue(
                CertBody::AgentRole {
                    person: old.person,
                    device: old.device.id(),
                    epoch: 1,
                    issued_at: 1,
                },
                old.person_key.as_ref(),
                &old.device,
            )
            .unwrap();
            store.put_object(&role.to_bytes()).unwrap();
            store.flush().await.unwrap();
        }
        let key = age::x25519::Identity::generate();
        let seal = Seal::recipient(&key.to_public().to_string()).unwrap();
        let archive = tmp.path().join("a.age");
        archive_of(&data, &archive, &seal);
        let target = tmp.path().join("new");
        let unlock = Unlock::Identity(Box::new(key));
        let r = restore(
            &archive,
            &unlock,
            &target,
            RestoreOptions { new_device: true },
        )
        .await
        .unwrap();
        assert_eq!(r.replaced, Some(old.device.id().to_string()));
        assert!(r.revoked_here && !r.needs_invite);
        let fresh = Identity::load(&target).unwrap();
        assert_ne!(fresh.device.id(), old.device.id());
        let store = reopen(&target.join("db"));
        let state = TrustBook::load(store, fresh.person).unwrap().state();
        assert!(state.is_revoked(&old.device.id()));
        assert!(state.is_admin(&fresh.device.id()));
        assert_eq!(
            state.agent.map(|a| (a.device, a.epoch)),
            Some((fresh.device.id(), 2))
        );
    }

    #[tokio::test]
    async fn a_new_device_restore_without_the_person_key_revokes_with_the_old_key_and_needs_an_invite()
     {
        let (tmp, data, _) = device().await;
        let old = Identity::load(&data).unwrap();
        std::fs::remove_file(data.join("keys/person.key")).unwrap();
        let key = age::x25519::Identity::generate();
        let seal = Seal::recipient(&key.to_public().to_string()).unwrap();
        let archive = tmp.path().join("a.age");
        archive_of(&data, &archive, &seal);
        let target = tmp.path().join("new");
        let unlock = Unlock::Identity(Box::new(key));
        let r = restore(
            &archive,
            &unlock,
            &target,
            RestoreOptions { new_device: true },
        )
        .await
        .unwrap();
        assert!(r.revoked_here && r.needs_invite);
        let fresh = Identity::load(&target).unwrap();
        assert!(fresh.person_key.is_none());
        let store = reopen(&target.join("db"));
        let state = TrustBook::load(store, fresh.person).unwrap().state();
        assert!(
            state.is_revoked(&old.device.id()),
            "the old admin key revoked itself"
        );
        assert!(
            !state.is_trusted(&fresh.device.id()),
            "the new device waits for an invite"
        );
    }

    #[tokio::test]
    async fn a_damaged_archive_leaves_no_target_and_no_staging() {
        let (tmp, data, _) = device().await;
        let key = age::x25519::Identity::generate();
        let seal = Seal::recipient(&key.to_public().to_string()).unwrap();
        let archive = tmp.path().join("a.age");
        archive_of(&data, &archive, &seal);
        let mut bytes = std::fs::read(&archive).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 1;
        std::fs::write(&archive, bytes).unwrap();
        let unlock = Unlock::Identity(Box::new(key));
        assert!(verify(&archive, &unlock).is_err());
        let target = tmp.path().join("restored");
        let err = restore(&archive, &unlock, &target, RestoreOptions::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("damaged or truncated"), "{err}");
        assert!(!target.exists());
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "only the data dir and the archive: {left:?}");
    }

    #[test]
    fn only_data_dir_paths_are_restored() {
        assert!(safe_path("keys/device.key").is_some());
        assert!(safe_path("workspaces/c1/notes.txt").is_some());
        assert!(safe_path("config.toml").is_some());
        for bad in [
            "../x",
            "/etc/passwd",
            "keys/../../x",
            "db/conf",
            "keys",
            "config.toml/x",
            "",
        ] {
            assert!(safe_path(bad).is_none(), "{bad}");
        }
        assert!(safe_archive_name("iom-backup-1.age").is_some());
        assert!(safe_archive_name("../x.age").is_none());
        assert!(safe_archive_name("a/b.age").is_none());
    }
}
