//! A small tmpfs for full-disk tests (needs root, as the NAT lab does): mount one, fill it with
//! another program's file to below a node's reserve, and free it again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};

/// A tmpfs mounted on a fresh directory, unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    /// Where it is mounted.
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mb` MiB on a new directory under the system's temp dir.
    pub fn mount(size_mb: u64) -> Result<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let uid = unsafe { libc::geteuid() };
        ensure!(
            uid == 0,
            "this test mounts a small tmpfs and needs root (`IOM_SKIP_NETNS=1 scripts/test.sh` \
             leaves the root-only tests out)"
        );
        let dir = tempfile::Builder::new()
            .prefix("iom-diskfull-")
            .tempdir()?
            .keep();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!("mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Writes zeros to `path` until its filesystem has at most `leave_mb` MiB free.
pub fn fill(path: &Path, leave_mb: u64) -> Result<()> {
    let free = free_mb(path.parent().ok_or_else(|| anyhow!("no parent"))?)?;
    let take = free.saturating_sub(leave_mb);
    let data = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(path)?;
    for _ in 0..take {
        std::io::Write::write_all(&mut f, &data)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Free space of the filesystem holding `dir`, in MiB (`df`).
pub fn free_mb(dir: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["-m", "--output=avail"])
        .arg(dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow!("df: {text}"))
}
