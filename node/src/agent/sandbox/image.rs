//! Building the sandbox image without a registry (`iom sandbox build`).
//!
//! The default image is a root filesystem generated in memory from the host's static busybox
//! (Debian package `busybox-static`): `/bin/busybox` plus a symlink per applet, `/etc/passwd`
//! with the unprivileged user `iom` (uid [`SANDBOX_UID`]), an empty `/workspace` and `/tmp`.
//! It is imported with `POST /images/create?fromSrc=-` ("docker import"), so nothing is pulled.
//! A user-supplied rootfs (a directory or a tarball) can be imported instead; both are streamed
//! from disk.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bollard::Docker;
use bollard::query_parameters::{CreateImageOptionsBuilder, RemoveImageOptions};
use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use tokio::sync::mpsc;
use tokio_util::io::ReaderStream;

use super::SandboxError;
pub use super::policy::DEFAULT_IMAGE;
use super::ustar::{Meta, TarWriter};

/// Where the static busybox is expected on the host.
pub const BUSYBOX_PATH: &str = "/bin/busybox";
/// The uid (and gid) tool processes run as.
pub const SANDBOX_UID: u32 = 1000;

/// Applets linked when `busybox --list` cannot be run.
const FALLBACK_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "cat",
    "cp",
    "mv",
    "rm",
    "ls",
    "mkdir",
    "rmdir",
    "echo",
    "printf",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "wc",
    "sort",
    "uniq",
    "cut",
    "tr",
    "find",
    "xargs",
    "id",
    "env",
    "test",
    "[",
    "true",
    "false",
    "sleep",
    "dirname",
    "basename",
    "touch",
    "chmod",
    "diff",
    "tee",
    "ps",
    "kill",
    "ip",
    "wget",
    "nc",
    "vi",
    "tar",
    "gzip",
    "gunzip",
    "date",
    "uname",
    "whoami",
    "stat",
    "readlink",
    "realpath",
    "expr",
    "seq",
    "od",
    "hexdump",
    "md5sum",
    "sha256sum",
    "du",
    "df",
    "which",
    "less",
    "more",
    "yes",
    "timeout",
];

/// Builds (or rebuilds) the sandbox image and tags it [`DEFAULT_IMAGE`].
///
/// `rootfs = None` builds the busybox image from [`BUSYBOX_PATH`]. `Some(dir)` imports a
/// directory tree, `Some(file)` a tar or tar.gz of a root filesystem. Returns the image
/// reference.
pub async fn build_default_image(
    docker: &Docker,
    rootfs: Option<&Path>,
) -> Result<String, SandboxError> {
    build_image(docker, rootfs, DEFAULT_IMAGE).await
}

/// Like [`build_default_image`], but tags the result `image` (`repo:tag`).
pub async fn build_image(
    docker: &Docker,
    rootfs: Option<&Path>,
    image: &str,
) -> Result<String, SandboxError> {
    let body: TarStream = match rootfs {
        None => {
            let tar = Bytes::from(busybox_rootfs(Path::new(BUSYBOX_PATH)).await?);
            Box::pin(futures::stream::once(async move { Ok(tar) }))
        }
        Some(path) => {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(SandboxError::io(path))?;
            if meta.is_dir() {
                Box::pin(stream_dir_as_tar(path.to_path_buf()))
            } else if meta.is_file() {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(SandboxError::io(path))?;
                Box::pin(ReaderStream::with_capacity(file, CHUNK))
            } else {
                return Err(SandboxError::Rootfs(format!(
                    "{} is neither a directory nor a tar file",
                    path.display()
                )));
            }
        }
    };
    import(docker, body, image).await
}

/// A rootfs tar (or tar.gz) as a byte stream.
type TarStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

async fn import(docker: &Docker, body: TarStream, image: &str) -> Result<String, SandboxError> {
    let (repo, tag) = match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (image, "latest"),
    };
    let opts = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .message("iom sandbox rootfs")
        .changes(vec![
            format!("USER {SANDBOX_UID}:{SANDBOX_UID}"),
            "WORKDIR /workspace".into(),
            r#"CMD ["/bin/sh"]"#.into(),
        ])
        .build();
    let reference = format!("{repo}:{tag}");
    let previous = docker
        .inspect_image(&reference)
        .await
        .ok()
        .and_then(|i| i.id);
    let _: Vec<_> = docker
        .create_image(Some(opts), Some(bollard::body_try_stream(body)), None)
        .try_collect()
        .await
        .map_err(SandboxError::docker("image import"))?;
    let new = docker
        .inspect_image(&reference)
        .await
        .map_err(SandboxError::docker("inspect of the imported image"))?
        .id;
    if let Some(old) = previous
        && new.as_ref() != Some(&old)
    {
        // The old image is now untagged; drop it unless a container still uses it.
        let _ = docker
            .remove_image(&old, None::<RemoveImageOptions>, None)
            .await;
    }
    Ok(reference)
}

/// Generates the busybox root filesystem as an in-memory tar (about 2 MB).
async fn busybox_rootfs(busybox: &Path) -> Result<Vec<u8>, SandboxError> {
    let bin = tokio::fs::read(busybox).await.map_err(|e| {
        SandboxError::Rootfs(format!(
            "cannot read {}: {e}; install the static busybox: sudo apt-get install \
             busybox-static (or run scripts/install-deps.sh)",
            busybox.display()
        ))
    })?;
    if !is_static_elf(&bin) {
        return Err(SandboxError::Rootfs(format!(
            "{} is not a statically linked ELF binary; install busybox-static",
            busybox.display()
        )));
    }
    let applets = applet_list(busybox).await;
    write_busybox_tar(&bin, &applets).map_err(|e| SandboxError::Rootfs(e.to_string()))
}

fn write_busybox_tar(bin: &[u8], applets: &[String]) -> io::Result<Vec<u8>> {
    let uid = u64::from(SANDBOX_UID);
    let mut w = TarWriter::new(Vec::with_capacity(bin.len() + 64 * 1024));
    for d in ["bin", "etc", "usr", "dev", "proc", "sys", "root", "var"] {
        w.dir(d, Meta::root(if d == "root" { 0o700 } else { 0o755 }))?;
    }
    w.dir("tmp", Meta::root(0o1777))?;
    w.dir(
        "workspace",
        Meta {
            mode: 0o755,
            uid,
            gid: uid,
            mtime: 0,
        },
    )?;
    w.file(
        "bin/busybox",
        Meta::root(0o755),
        bin.len() as u64,
        &mut io::Cursor::new(bin),
    )?;
    for a in applets {
        if a != "busybox" && !a.contains('/') && !a.is_empty() {
            w.symlink(&format!("bin/{a}"), "busybox", Meta::root(0o777))?;
        }
    }
    w.symlink("sbin", "bin", Meta::root(0o777))?;
    w.symlink("usr/bin", "../bin", Meta::root(0o777))?;
    w.symlink("usr/sbin", "../bin", Meta::root(0o777))?;
    let passwd = format!(
        "root:x:0:0:root:/root:/bin/sh\n\
         iom:x:{SANDBOX_UID}:{SANDBOX_UID}:iom sandbox:/workspace:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    );
    let group = format!("root:x:0:\niom:x:{SANDBOX_UID}:\nnogroup:x:65534:\n");
    for (name, text) in [
        ("etc/passwd", passwd.as_str()),
        ("etc/group", group.as_str()),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/hostname", "sandbox\n"),
        ("etc/resolv.conf", ""),
    ] {
        w.file(
            name,
            Meta::root(0o644),
            text.len() as u64,
            &mut text.as_bytes(),
        )?;
    }
    w.finish()
}

/// Asks busybox for its applets; falls back to a fixed list of the common ones.
async fn applet_list(busybox: &Path) -> Vec<String> {
    let out = tokio::process::Command::new(busybox)
        .arg("--list")
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {
            let list: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            if list.iter().any(|a| a == "sh") {
                return list;
            }
            FALLBACK_APPLETS.iter().map(|s| (*s).to_string()).collect()
        }
        _ => FALLBACK_APPLETS.iter().map(|s| (*s).to_string()).collect(),
    }
}

/// True for an ELF executable without a `PT_INTERP` program header (no dynamic loader).
fn is_static_elf(bin: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if bin.len() < 64 || &bin[..4] != b"\x7fELF" || bin[5] != 1 {
        return false; // not ELF, or not little-endian
    }
    let u16_at = |o: usize| bin.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        bin.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bin.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let (phoff, phentsize, phnum) = match bin[4] {
        2 => (u64_at(0x20), u16_at(0x36), u16_at(0x38)),
        1 => (u32_at(0x1c).map(u64::from), u16_at(0x2a), u16_at(0x2c)),
        _ => return false,
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * usize::from(phentsize);
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// Streams a directory tree as a tar, produced on a blocking thread into a bounded channel.
fn stream_dir_as_tar(dir: PathBuf) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let mut tar = TarWriter::new(writer);
        let result = add_tree(&mut tar, &dir, "").and_then(|()| tar.finish()?.flush_final());
        if let Err(e) = result {
            // The receiver may already be gone; nothing more to do then.
            let _ = tx.blocking_send(Err(e));
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn add_tree<W: Write>(tar: &mut TarWriter<W>, dir: &Path, rel: &str) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: file name is not UTF-8", entry.path().display()),
            ));
        };
        let path = entry.path();
        let rel_path = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let md = std::fs::symlink_metadata(&path)?;
        let meta = Meta {
            mode: md.permissions().mode(),
            uid: u64::from(md.uid()),
            gid: u64::from(md.gid()),
            mtime: u64::try_from(md.mtime()).unwrap_or(0),
        };
        let ft = md.file_type();
        if ft.is_dir() {
            tar.dir(&rel_path, meta)?;
            add_tree(tar, &path, &rel_path)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            let Some(target) = target.to_str() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: link target is not UTF-8", path.display()),
                ));
            };
            tar.symlink(&rel_path, target, meta)?;
        } else if ft.is_file() {
            let mut f = std::fs::File::open(&path)?;
            tar.file(&rel_path, meta, md.len(), &mut f)?;
        } else {
            tracing::debug!(path = %path.display(), "skipping special file in rootfs");
        }
    }
    Ok(())
}

const CHUNK: usize = 256 * 1024;

/// A `Write` that sends chunks over a bounded channel (blocks when the reader is behind).
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "image import was cancelled"))
    }

    fn flush_final(mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn static_busybox_is_recognised_and_dynamic_binaries_are_not() {
        let Ok(bb) = std::fs::read(BUSYBOX_PATH) else {
            panic!("{BUSYBOX_PATH} missing: run scripts/install-deps.sh");
        };
        assert!(is_static_elf(&bb));
        let ls = std::fs::read("/bin/ls").unwrap();
        assert!(!is_static_elf(&ls), "/bin/ls is dynamically linked");
        assert!(!is_static_elf(b"#!/bin/sh\necho hi\n"));
    }

    #[tokio::test]
    async fn a_directory_streams_as_a_tar_that_gnu_tar_reads() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("bin")).unwrap();
        std::fs::write(src.path().join("bin/tool"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("tool", src.path().join("bin/alias")).unwrap();
        let chunks: Vec<Bytes> = stream_dir_as_tar(src.path().to_path_buf())
            .try_collect()
            .await
            .unwrap();
        assert!(chunks.len() >= 2, "streamed in several chunks");
        let out = tempfile::tempdir().unwrap();
        let tar_path = out.path().join("r.tar");
        std::fs::write(&tar_path, chunks.concat()).unwrap();
        let x = out.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let st = std::process::Command::new("tar")
            .args(["-xf"])
            .arg(&tar_path)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(x.join("bin/tool")).unwrap().len(), 300_000);
        assert_eq!(
            std::fs::read_link(x.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
    }

    #[test]
    fn the_busybox_tar_has_the_expected_layout() {
        let tar = write_busybox_tar(b"\x7fELFfake", &["sh".into(), "ls".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.tar");
        std::fs::write(&p, tar).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&p)
            .arg("--numeric-owner")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("bin/sh -> busybox"), "{text}");
        assert!(text.contains("drwxrwxrwt 0/0"), "{text}");
        assert!(
            text.contains("1000/1000") && text.contains("workspace/"),
            "{text}"
        );
        assert!(text.contains("etc/passwd"), "{text}");
    }
}
