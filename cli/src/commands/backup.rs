//! `iom backup create|list|verify|restore` and `iom person export|import`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use futures::StreamExt;
use iom_node::api::client::ClientError;
use iom_node::backup::catalog::{self, Dest};
use iom_node::backup::create::{self, Created};
use iom_node::backup::crypt::{self, Seal, Unlock};
use iom_node::backup::restore::{self, RestoreOptions};
use iom_node::backup::{format::EntryKind, kit};
use iom_node::identity::Identity;
use serde_json::json;

use super::Global;
use crate::Failure;
use crate::args::{BackupCommand, PersonCommand, SealArgs, UnlockArgs};
use crate::output;

/// The fallback for `--passphrase-file`.
const PASSPHRASE_ENV: &str = "IOM_PASSPHRASE";

fn passphrase(file: Option<&Path>) -> Result<age::secrecy::SecretString, Failure> {
    if let Some(f) = file {
        return Ok(crypt::passphrase_file(f)?);
    }
    match std::env::var(PASSPHRASE_ENV) {
        Ok(p) if !p.is_empty() => Ok(age::secrecy::SecretString::from(p)),
        _ => Err(Failure::Usage(anyhow!(
            "give --passphrase-file FILE (or set {PASSPHRASE_ENV})"
        ))),
    }
}

fn seal(args: &SealArgs, config: &iom_node::config::BackupConfig) -> Result<Seal, Failure> {
    if let Some(r) = &args.recipient {
        return Ok(Seal::recipient(r)?);
    }
    if args.passphrase_file.is_none()
        && std::env::var(PASSPHRASE_ENV).is_err()
        && let Some(r) = &config.recipient
    {
        return Ok(Seal::recipient(r)?);
    }
    let file = args
        .passphrase_file
        .as_deref()
        .or(config.passphrase_file.as_deref());
    Ok(Seal::Passphrase(passphrase(file)?))
}

fn unlock(args: &UnlockArgs) -> Result<Unlock, Failure> {
    if let Some(f) = &args.identity {
        return Ok(Unlock::identity_file(f)?);
    }
    Ok(Unlock::Passphrase(passphrase(
        args.passphrase_file.as_deref(),
    )?))
}

/// `[backup]` of the config (absent file: defaults).
fn backup_config(g: &Global) -> Result<iom_node::config::BackupConfig, Failure> {
    iom_node::config::RawConfig::load(&g.data_dir)
        .map(|c| c.backup)
        .map_err(|e| Failure::Usage(e.into()))
}

fn backup_dir(g: &Global, given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    given.or(backup_config(g)?.dir).ok_or_else(|| {
        Failure::Usage(anyhow!(
            "no backup directory: pass one, or set `[backup] dir` in {}",
            g.data_dir.join("config.toml").display()
        ))
    })
}

/// Runs a `backup` subcommand.
pub async fn run(g: &Global, cmd: BackupCommand) -> Result<(), Failure> {
    match cmd {
        BackupCommand::Create { to, blobs, seal: s } => {
            let config = backup_config(g)?;
            let seal = seal(&s, &config)?;
            let to = backup_dir(g, to)?;
            let created = create(g, &Dest::parse(&to), blobs || config.blobs, seal).await?;
            print_created(g, &created);
        }
        BackupCommand::List { dir } => list(g, &backup_dir(g, dir)?)?,
        BackupCommand::Verify { archive, unlock: u } => {
            let u = unlock(&u)?;
            let a = archive.clone();
            let v = tokio::task::spawn_blocking(move || restore::verify(&a, &u))
                .await
                .context("verify")??;
            let m = &v.manifest;
            if g.json {
                output::json(&json!({
                    "archive": archive,
                    "ok": v.missing_bases.is_empty(),
                    "format": m.format,
                    "device": m.device,
                    "person": m.person,
                    "created_at": m.created_at,
                    "entries": m.entries.len(),
                    "documents": m.count(EntryKind::Doc),
                    "blobs": m.count(EntryKind::Blob),
                    "blobs_elsewhere": m.external_blobs.len(),
                    "missing_bases": v.missing_bases,
                }));
            } else {
                println!(
                    "{}: ok: format {}, device {} ({}), {} entries ({} documents, {} blobs, {} bytes) all match their hashes",
                    archive.display(),
                    m.format,
                    m.name,
                    m.device,
                    m.entries.len(),
                    m.count(EntryKind::Doc),
                    m.count(EntryKind::Blob),
                    m.bytes()
                );
                if !m.external_blobs.is_empty() {
                    println!(
                        "{} more blobs are in earlier archives of its directory",
                        m.external_blobs.len()
                    );
                }
            }
            if !v.missing_bases.is_empty() {
                return Err(anyhow!(
                    "incomplete: the earlier archives {} are not beside it; a restore would fail",
                    v.missing_bases.join(", ")
                )
                .into());
            }
        }
        BackupCommand::Restore {
            archive,
            new_device,
            unlock: u,
        } => {
            let u = unlock(&u)?;
            let r =
                restore::restore(&archive, &u, &g.data_dir, RestoreOptions { new_device }).await?;
            if g.json {
                output::json(&json!({
                    "data_dir": g.data_dir,
                    "device": r.device,
                    "replaced": r.replaced,
                    "revoked_here": r.revoked_here,
                    "needs_invite": r.needs_invite,
                    "documents": r.manifest.count(EntryKind::Doc),
                    "blobs": r.blobs,
                }));
            } else {
                println!(
                    "restored {} documents and {} blobs into {} as device {}",
                    r.manifest.count(EntryKind::Doc),
                    r.blobs,
                    g.data_dir.display(),
                    r.device
                );
                if let Some(old) = &r.replaced {
                    if r.revoked_here {
                        println!(
                            "the old device {old} is revoked; the revocation reaches every device on first sync"
                        );
                    } else {
                        println!(
                            "revoke the old device {old} from an admin device: `iom devices revoke {old}`"
                        );
                    }
                }
                if r.needs_invite {
                    println!(
                        "this archive holds no person key: start the node, then join with an invite from an admin device (`iom invite --admin` there, `iom join CODE` here)"
                    );
                } else {
                    println!("start it with `iom node run`");
                }
            }
        }
    }
    Ok(())
}

/// A sync reader over the body of a streamed response (read on a blocking thread).
struct BodyReader {
    rx: std::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    buf: bytes::Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.recv() {
                Ok(Ok(b)) => self.buf = b,
                Ok(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "the node's snapshot broke off: {e}"
                    )));
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

async fn create(g: &Global, dest: &Dest, blobs: bool, seal: Seal) -> Result<Created, Failure> {
    let plan = create::plan(dest, &g.data_dir, blobs)?;
    let body = json!({ "blobs": blobs, "known": plan.options.known });
    match g.client()?.post_raw("/v1/backup/snapshot", &body).await {
        Ok(resp) => {
            // The running node takes the snapshot; this process encrypts it.
            let (tx, rx) = std::sync::mpsc::sync_channel(16);
            let mut stream = resp.bytes_stream();
            let pump = tokio::spawn(async move {
                while let Some(chunk) = stream.next().await {
                    if tx.send(chunk.map_err(|e| e.to_string())).is_err() {
                        break;
                    }
                }
            });
            let path = plan.path.clone();
            let (manifest, size) = tokio::task::spawn_blocking(move || {
                let mut manifest = None;
                let size = iom_node::backup::write_archive(&path, &seal, |w| {
                    manifest = Some(iom_node::backup::copy_plaintext(
                        BodyReader {
                            rx,
                            buf: bytes::Bytes::new(),
                        },
                        w,
                    )?);
                    Ok(())
                })?;
                let manifest = manifest.ok_or_else(|| anyhow!("no manifest"))?;
                Ok::<_, anyhow::Error>((manifest, size))
            })
            .await
            .context("backup")??;
            let _ = pump.await;
            Ok(plan.finish(manifest, size)?)
        }
        Err(ClientError::NotRunning { .. }) => {
            // No node runs: hold the data dir's lock (so none starts) and read the store.
            let data_dir = g.data_dir.clone();
            let dest = dest.clone();
            Ok(tokio::task::spawn_blocking(move || {
                let _lock = iom_node::lock::DataDirLock::acquire(&data_dir)?;
                let store = iom_node::store::Store::open(&data_dir.join("db"), 16 << 20)?;
                let created = create::from_store(&store, &data_dir, &dest, blobs, &seal)?;
                Ok::<_, anyhow::Error>(created)
            })
            .await
            .context("backup")??)
        }
        Err(e) => Err(e.into()),
    }
}

fn print_created(g: &Global, c: &Created) {
    let m = &c.manifest;
    if g.json {
        output::json(&json!({
            "archive": c.path,
            "size": c.size,
            "device": m.device,
            "created_at": m.created_at,
            "entries": m.entries.len(),
            "documents": m.count(EntryKind::Doc),
            "blobs": m.count(EntryKind::Blob),
            "blobs_elsewhere": m.external_blobs.len(),
            "holds_person_key": m.holds_person_key,
        }));
    } else {
        println!(
            "wrote {} ({} bytes): {} documents, {} blobs{}{}",
            c.path.display(),
            c.size,
            m.count(EntryKind::Doc),
            m.count(EntryKind::Blob),
            if m.external_blobs.is_empty() {
                String::new()
            } else {
                format!(" (+{} in earlier archives)", m.external_blobs.len())
            },
            if m.holds_person_key {
                ", with the person key"
            } else {
                ""
            }
        );
    }
}

fn list(g: &Global, dir: &Path) -> Result<(), Failure> {
    let catalogs = catalog::catalogs(dir)?;
    let mut loose = Vec::new();
    for e in std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".age") && !catalogs.iter().any(|c| c.archive == name) {
            loose.push(name);
        }
    }
    loose.sort();
    if g.json {
        output::json(&json!({
            "dir": dir,
            "archives": catalogs.iter().map(|c| json!({
                "archive": c.archive,
                "present": dir.join(&c.archive).is_file(),
                "created_at": c.created_at,
                "device": c.device,
                "name": c.name,
                "documents": c.documents,
                "blobs": c.blobs_here,
                "blobs_elsewhere": c.blobs_elsewhere,
                "needs": c.needs,
                "size": c.size,
            })).collect::<Vec<_>>(),
            "without_catalog": loose,
        }));
        return Ok(());
    }
    for c in &catalogs {
        let when = chrono::DateTime::from_timestamp(c.created_at as i64, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        println!(
            "{}  {when}  {} ({})  {} docs  {} blobs{}  {} bytes{}",
            c.archive,
            c.name,
            c.device,
            c.documents,
            c.blobs_here,
            if c.blobs_elsewhere > 0 {
                format!(" (+{} in {})", c.blobs_elsewhere, c.needs.join(", "))
            } else {
                String::new()
            },
            c.size,
            if dir.join(&c.archive).is_file() {
                ""
            } else {
                "  MISSING"
            }
        );
    }
    for name in loose {
        println!("{name}  (no catalog)");
    }
    Ok(())
}

/// Runs a `person` subcommand.
pub async fn person(g: &Global, cmd: PersonCommand) -> Result<(), Failure> {
    match cmd {
        PersonCommand::Export {
            out,
            words,
            qr,
            passphrase_file,
        } => {
            let id = Identity::load(&g.data_dir)?;
            let key = id.person_key.ok_or_else(|| {
                anyhow!(
                    "this device does not hold the person key; export it on the device that does \
                     (`iom status` shows holds_person_key), or import a kit here first"
                )
            })?;
            let want_kit = out.is_some() || qr || !words;
            let kit_text = if want_kit {
                Some(kit::export(&key, passphrase(passphrase_file.as_deref())?)?)
            } else {
                None
            };
            if let (Some(path), Some(text)) = (&out, &kit_text) {
                iom_node::secret_file::write_secret(path, text.as_bytes())
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let words_text = words.then(|| iom_protocol::recovery_words::encode(&key.seed()));
            if g.json {
                output::json(&json!({
                    "person": key.id().to_string(),
                    "kit": if out.is_none() { kit_text.clone() } else { None },
                    "out": out,
                    "words": words_text,
                }));
                return Ok(());
            }
            match (&out, &kit_text) {
                (Some(p), _) => println!(
                    "wrote the recovery kit of person {} to {}",
                    key.id(),
                    p.display()
                ),
                (None, Some(t)) => print!("{t}"),
                _ => {}
            }
            if let Some(w) = &words_text {
                println!(
                    "recovery words (the key itself, unencrypted: keep this paper safe):\n{w}"
                );
            }
            if qr && let Some(t) = &kit_text {
                output::qr(t);
            }
        }
        PersonCommand::Import {
            file,
            words,
            passphrase_file,
        } => {
            let key = match (&file, &words) {
                (_, Some(w)) => kit::from_words(w)?,
                (Some(f), None) => {
                    let bytes =
                        std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                    kit::import(&bytes, passphrase(passphrase_file.as_deref())?)?
                }
                (None, None) => return Err(Failure::Usage(anyhow!("give a kit FILE or --words"))),
            };
            let id = Identity::load(&g.data_dir)?;
            kit::check_person(&key, &id.person)?;
            let body = json!({ "seed": hex::encode(key.seed()) });
            match g.client()?.post("/v1/person/key", &body).await {
                Ok(_) => {}
                Err(ClientError::NotRunning { .. }) => {
                    iom_node::identity::install_person_key(&g.data_dir, &key)?;
                }
                Err(e) => return Err(e.into()),
            }
            if g.json {
                output::json(&json!({ "person": key.id().to_string(), "holds_person_key": true }));
            } else {
                println!(
                    "this device now holds the person key of {}: it can invite and revoke",
                    key.id()
                );
            }
        }
    }
    Ok(())
}
