//! Disk quotas for conversation workspaces: one sparse ext4 image per conversation,
//! loop-mounted at `DATA/workspaces/CONV` while the conversation's container (or an attachment
//! write) needs it.
//!
//! The per-workspace quota is the image's size, so the kernel enforces it while a tool runs:
//! `dd` in the container gets `No space left on device` at the quota, and nothing outside the
//! image grows. The images live in `DATA/workspace-images/CONV.img` (created sparse, mounted
//! with `discard` so deleted files give their blocks back to the host disk).
//!
//! The total quota is kept by [`plan`]: a mounted workspace counts at its full quota (it may
//! grow to it), an unmounted one at the bytes its image really occupies on the host disk. A
//! workspace is mounted only if that sum stays within the total; to make room, idle mounted
//! workspaces (no tool call in flight) are unmounted first, least recently used first (their
//! containers are removed, their files stay in the image). If it still does not fit, the tool
//! call fails with [`QuotaError::Full`]: the workspaces' disk use never exceeds the total.
//!
//! The I/O is behind [`WorkspaceDisk`]: [`LoopDisk`] runs `mkfs.ext4`, `mount -o loop` and
//! `umount` (root only); the unit tests use a fake.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::image::SANDBOX_UID;

/// What the node does when it cannot mount a workspace image (`[sandbox] quota`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuotaMode {
    /// No tool runs without its quota: a workspace that cannot be mounted fails the call.
    Required,
    /// Mount when possible; otherwise warn (log, `iom sandbox check`, `iom doctor`) and run the
    /// tool in a plain directory without a quota.
    #[default]
    BestEffort,
    /// Plain directories, no quota (reported as not enforced).
    Off,
}

/// The two limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of one workspace image.
    pub per_workspace: u64,
    /// What all workspaces together may take on the host disk.
    pub total: u64,
}

/// One workspace image as the bookkeeping sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUse {
    /// The conversation id.
    pub id: String,
    /// Bytes the image occupies on the host disk (its allocated blocks, not its length).
    pub allocated: u64,
    /// Whether it is mounted now.
    pub mounted: bool,
}

/// Why a workspace could not get its quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// The total would be exceeded even after unmounting every idle workspace.
    #[error(
        "no space for this conversation's workspace: the workspaces already take {} MiB of the \
         {} MiB total ([sandbox] workspaces_total_mb) and this one needs {} MiB while in use; \
         wait for other conversations' tool calls to end, delete old images in {dir}, or raise \
         [sandbox] workspaces_total_mb",
        used >> 20, total >> 20, needed >> 20
    )]
    Full {
        /// Bytes charged to the other workspaces (after every possible eviction).
        used: u64,
        /// The total quota.
        total: u64,
        /// What this workspace needs while mounted.
        needed: u64,
        /// Where the images are.
        dir: String,
    },
    /// The image could not be created or mounted (not root, no loop device, no mkfs.ext4, ...).
    #[error(
        "the workspace quota cannot be enforced: {0}. Run the node as root with e2fsprogs \
         (mkfs.ext4) and loop devices available, or set [sandbox] quota = \"best-effort\" (run \
         without a quota, with a warning) or \"off\""
    )]
    Unavailable(String),
}

impl From<io::Error> for QuotaError {
    fn from(e: io::Error) -> Self {
        QuotaError::Unavailable(e.to_string())
    }
}

/// What [`plan`] decided for a workspace that is not mounted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Idle workspaces to unmount first, in this order.
    pub evict: Vec<String>,
}

/// Bytes a workspace is charged: its full quota while mounted, its real size otherwise.
fn charge(img: &ImageUse, limits: Limits) -> u64 {
    if img.mounted {
        img.allocated.max(limits.per_workspace)
    } else {
        img.allocated
    }
}

/// Decides whether workspace `want` may be mounted, and which idle mounted workspaces must be
/// unmounted first. `idle_lru` lists the workspaces that may be unmounted (no call in flight),
/// least recently used first. Nothing is evicted unless that makes `want` fit.
pub fn plan(
    images: &[ImageUse],
    want: &str,
    idle_lru: &[String],
    limits: Limits,
    dir: &Path,
) -> Result<Admission, QuotaError> {
    let others = || images.iter().filter(|i| i.id != want);
    let mut used: u64 = others().map(|i| charge(i, limits)).sum();
    let needed = limits.per_workspace;
    let fits = |used: u64| used.saturating_add(needed) <= limits.total;
    let mut evict = Vec::new();
    for id in idle_lru {
        if fits(used) {
            break;
        }
        let Some(img) = others().find(|i| &i.id == id && i.mounted) else {
            continue;
        };
        used -= charge(img, limits) - img.allocated;
        evict.push(id.clone());
    }
    if fits(used) {
        Ok(Admission { evict })
    } else {
        Err(QuotaError::Full {
            used,
            total: limits.total,
            needed,
            dir: dir.display().to_string(),
        })
    }
}

/// The workspace images and their mounts.
pub trait WorkspaceDisk: Send + Sync + std::fmt::Debug {
    /// Every image, with its real size and whether it is mounted.
    fn images(&self) -> io::Result<Vec<ImageUse>>;
    /// Is the workspace of `id` mounted?
    fn is_mounted(&self, id: &str) -> io::Result<bool>;
    /// Mounts the workspace of `id`, creating its image of `size` bytes if there is none.
    fn mount(&self, id: &str, size: u64) -> Result<(), QuotaError>;
    /// Unmounts the workspace of `id` (nothing if it is not mounted).
    fn unmount(&self, id: &str) -> Result<(), QuotaError>;
    /// Unmounts every workspace (at start-up after a crash, and at shutdown). Returns how many.
    fn unmount_all(&self) -> usize;
}

/// The quota bookkeeping over a [`WorkspaceDisk`].
#[derive(Debug)]
pub struct Quota {
    disk: Box<dyn WorkspaceDisk>,
    limits: Limits,
    images_dir: PathBuf,
}

impl Quota {
    /// Bookkeeping with these limits over `disk`, whose images live in `images_dir`.
    pub fn new(disk: Box<dyn WorkspaceDisk>, limits: Limits, images_dir: PathBuf) -> Quota {
        Quota {
            disk,
            limits,
            images_dir,
        }
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The disk underneath.
    pub fn disk(&self) -> &dyn WorkspaceDisk {
        &*self.disk
    }

    /// `None` if `id` is mounted already, else what to unmount before mounting it.
    pub fn admit(&self, id: &str, idle_lru: &[String]) -> Result<Option<Admission>, QuotaError> {
        let unavailable = |e: io::Error| QuotaError::Unavailable(e.to_string());
        if self.disk.is_mounted(id).map_err(unavailable)? {
            return Ok(None);
        }
        let images = self.disk.images().map_err(unavailable)?;
        plan(&images, id, idle_lru, self.limits, &self.images_dir).map(Some)
    }

    /// Mounts `id` at its quota (after [`Quota::admit`]).
    pub fn mount(&self, id: &str) -> Result<(), QuotaError> {
        self.disk.mount(id, self.limits.per_workspace)
    }
}

/// Can this process mount workspace images? `Err` says why not (cheap: no mount is tried).
pub fn capability() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "the node runs as uid {euid}, and loop-mounting a workspace image needs root \
             (CAP_SYS_ADMIN)"
        ));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control is missing (no loop device support)".into());
    }
    find_tool("mkfs.ext4")
        .map(drop)
        .ok_or_else(|| "mkfs.ext4 is not installed (install e2fsprogs)".to_string())
}

/// Tries the real thing in `dir` (the data dir): creates a small image, mounts it, writes past
/// its end expecting "no space", unmounts and deletes it. `Err` says what failed.
pub fn probe_mount(dir: &Path) -> Result<(), String> {
    capability()?;
    let tmp = dir.join(format!(
        ".iom-quota-check-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let res = probe_in(&tmp);
    if let Err(e) = std::fs::remove_dir_all(&tmp) {
        tracing::warn!(dir = %tmp.display(), cause = %e, "cannot remove the quota probe");
    }
    res
}

fn probe_in(tmp: &Path) -> Result<(), String> {
    let img = tmp.join("probe.img");
    let mnt = tmp.join("mnt");
    std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
    let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
    f.set_len(16 << 20).map_err(|e| e.to_string())?;
    drop(f);
    run(
        "mkfs.ext4",
        &["-F", "-q", "-m", "0"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([img.as_os_str()])
            .collect::<Vec<_>>(),
    )?;
    run(
        "mount",
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            "loop,nosuid,nodev".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
        ],
    )?;
    let filled = {
        let mut f = std::fs::File::create(mnt.join("fill")).map_err(|e| e.to_string());
        let chunk = vec![0u8; 1 << 20];
        let mut res = Err("wrote 32 MiB into a 16 MiB image".to_string());
        if let Ok(f) = f.as_mut() {
            for _ in 0..32 {
                if let Err(e) = std::io::Write::write_all(f, &chunk).and_then(|()| f.sync_data()) {
                    res = if e.raw_os_error() == Some(libc::ENOSPC) {
                        Ok(())
                    } else {
                        Err(e.to_string())
                    };
                    break;
                }
            }
        }
        res
    };
    let unmounted = run("umount", &[mnt.as_os_str()]);
    filled.and(unmounted)
}

/// Finds a system tool on `PATH` or in the sbin directories (often not on a user's `PATH`).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a tool; `Err` carries its stderr.
fn run(name: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let tool = find_tool(name).ok_or_else(|| format!("{name} is not installed"))?;
    let out = Command::new(&tool)
        .args(args)
        .output()
        .map_err(|e| format!("running {}: {e}", tool.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The mount points of this mount namespace (`/proc/self/mountinfo`, field 5, unescaped).
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect())
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mountinfo path.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Workspace images on the host disk, loop-mounted with `mount -o loop` (the loop device is
/// released when the filesystem is unmounted).
#[derive(Debug)]
pub struct LoopDisk {
    workspaces: PathBuf,
    images: PathBuf,
}

impl LoopDisk {
    /// Images in `DATA/workspace-images`, mounted at `DATA/workspaces/CONV`.
    pub fn new(data_dir: &Path) -> LoopDisk {
        let canon = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        LoopDisk {
            workspaces: canon.join("workspaces"),
            images: canon.join("workspace-images"),
        }
    }

    /// Where the images are.
    pub fn images_dir(&self) -> &Path {
        &self.images
    }

    fn image(&self, id: &str) -> PathBuf {
        self.images.join(format!("{id}.img"))
    }

    fn mounted_set(&self) -> io::Result<HashSet<String>> {
        Ok(mount_points()?
            .into_iter()
            .filter(|p| p.parent() == Some(self.workspaces.as_path()))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }

    /// Creates a sparse image of `size` bytes holding the files of `from` (if any).
    fn create(&self, img: &Path, size: u64, from: Option<&Path>) -> Result<(), String> {
        std::fs::create_dir_all(&self.images)
            .map_err(|e| format!("{}: {e}", self.images.display()))?;
        let tmp = img.with_extension("img.partial");
        let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(f);
        let owner = format!(
            "root_owner={SANDBOX_UID}:{SANDBOX_UID},lazy_itable_init=1,lazy_journal_init=1"
        );
        let mut args: Vec<&std::ffi::OsStr> = ["-F", "-q", "-m", "0", "-L", "iom-ws", "-E", &owner]
            .into_iter()
            .map(std::ffi::OsStr::new)
            .collect();
        if let Some(d) = from {
            args.push("-d".as_ref());
            args.push(d.as_os_str());
        }
        args.push(tmp.as_os_str());
        if let Err(e) = run("mkfs.ext4", &args) {
            let _ = std::fs::remove_file(&tmp);
            return Err(match from {
                Some(d) => format!(
                    "the files already in {} do not fit in a {} MiB image ({e}); raise [sandbox] \
                     workspace_quota_mb",
                    d.display(),
                    size >> 20
                ),
                None => e,
            });
        }
        std::fs::rename(&tmp, img).map_err(|e| format!("{}: {e}", img.display()))
    }
}

/// Removes everything inside `dir` (not `dir` itself).
fn empty_dir(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

impl WorkspaceDisk for LoopDisk {
    fn images(&self) -> io::Result<Vec<ImageUse>> {
        let mounted = self.mounted_set()?;
        let entries = match std::fs::read_dir(&self.images) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e?;
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
                continue;
            };
            let meta = e.metadata()?;
            out.push(ImageUse {
                id: id.to_string(),
                allocated: meta.blocks().saturating_mul(512),
                mounted: mounted.contains(id),
            });
        }
        Ok(out)
    }

    fn is_mounted(&self, id: &str) -> io::Result<bool> {
        Ok(self.mounted_set()?.contains(id))
    }

    fn mount(&self, id: &str, size: u64) -> Result<(), QuotaError> {
        let fail = |e: String| QuotaError::Unavailable(e);
        capability().map_err(fail)?;
        let dir = self.workspaces.join(id);
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |e: io::Error| QuotaError::Unavailable(format!("{p}: {e}"))
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let img = self.image(id);
        let has_files = std::fs::read_dir(&dir).map_err(io(&dir))?.next().is_some();
        if !img.exists() {
            // Files from before the quota (or from a restored backup) go into the new image.
            self.create(&img, size, has_files.then_some(dir.as_path()))
                .map_err(fail)?;
            if has_files {
                empty_dir(&dir).map_err(io(&dir))?;
            }
        } else if has_files {
            return Err(fail(format!(
                "{} holds files outside its image {} (written while the quota was not \
                 enforced); move them into the workspace by hand",
                dir.display(),
                img.display()
            )));
        }
        // Fail closed: if Docker's mount namespace does not see our mount, the container gets
        // this root-owned directory, which the sandbox user cannot write.
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(io(&dir))?;
        run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                "-o".as_ref(),
                "loop,nosuid,nodev,noatime,discard".as_ref(),
                img.as_os_str(),
                dir.as_os_str(),
            ],
        )
        .map_err(fail)?;
        let _ = std::fs::remove_dir(dir.join("lost+found"));
        std::os::unix::fs::chown(&dir, Some(SANDBOX_UID), Some(SANDBOX_UID)).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).map_err(io(&dir))?;
        tracing::debug!(workspace = %dir.display(), size_mib = size >> 20, "workspace image mounted");
        Ok(())
    }

    fn unmount(&self, id: &str) -> Result<(), QuotaError> {
        if !self
            .is_mounted(id)
            .map_err(|e| QuotaError::Unavailable(e.to_string()))?
        {
            return Ok(());
        }
        let dir = self.workspaces.join(id);
        // A lazy unmount if something still holds it: the loop device goes with the last user.
        run("umount", &[dir.as_os_str()])
            .or_else(|_| run("umount", &["-l".as_ref(), dir.as_os_str()]))
            .map_err(QuotaError::Unavailable)?;
        tracing::debug!(workspace = %dir.display(), "workspace image unmounted");
        Ok(())
    }

    fn unmount_all(&self) -> usize {
        let ids = match self.mounted_set() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read the mount table");
                return 0;
            }
        };
        let mut n = 0;
        for id in ids {
            match self.unmount(&id) {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(workspace = %id, cause = %e, "cannot unmount workspace"),
            }
        }
        n
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;
    const LIMITS: Limits = Limits {
        per_workspace: 100 * MIB,
        total: 300 * MIB,
    };

    fn img(id: &str, mib: u64, mounted: bool) -> ImageUse {
        ImageUse {
            id: id.into(),
            allocated: mib * MIB,
            mounted,
        }
    }

    fn lru(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_string()).collect()
    }

    fn dir() -> &'static Path {
        Path::new("/d")
    }

    #[test]
    fn a_workspace_fits_while_mounted_ones_count_at_their_quota() {
        // Two mounted (200 MiB charged) + the new one = 300: fits exactly.
        let images = [img("a", 1, true), img("b", 5, true)];
        assert_eq!(
            plan(&images, "c", &[], LIMITS, dir()).unwrap().evict,
            Vec::<String>::new()
        );
        // A third mounted one leaves no room, and nothing is idle.
        let images = [img("a", 1, true), img("b", 5, true), img("c", 1, true)];
        let err = plan(&images, "d", &[], LIMITS, dir()).unwrap_err();
        assert!(
            matches!(err, QuotaError::Full { used, .. } if used == 300 * MIB),
            "{err:?}"
        );
        assert!(err.to_string().contains("workspaces_total_mb"), "{err}");
    }

    #[test]
    fn unmounted_images_count_at_their_real_size() {
        let images = [img("a", 90, false), img("b", 90, false), img("c", 10, true)];
        // 90 + 90 + 100 (c mounted) + 100 > 300.
        assert!(plan(&images, "d", &[], LIMITS, dir()).is_err());
        // Its own image never counts against itself.
        assert!(plan(&images, "a", &[], LIMITS, dir()).is_ok());
    }

    #[test]
    fn idle_workspaces_are_evicted_least_recently_used_first_and_only_as_needed() {
        let images = [img("a", 10, true), img("b", 10, true), img("c", 10, true)];
        let a = plan(&images, "d", &lru(&["b", "a", "c"]), LIMITS, dir()).unwrap();
        // 300 charged; evicting b leaves 100 + 100 + 10 + 100 (d) = 310 > 300; then a.
        assert_eq!(a.evict, lru(&["b", "a"]));
        // Busy workspaces are not in the list: nothing to evict, so refused, nothing evicted.
        assert!(plan(&images, "d", &lru(&[]), LIMITS, dir()).is_err());
        // Unmounted or unknown candidates are skipped.
        let images = [img("a", 10, false), img("b", 10, true), img("c", 10, true)];
        let a = plan(&images, "d", &lru(&["a", "x", "c"]), LIMITS, dir()).unwrap();
        assert_eq!(a.evict, lru(&["c"]));
    }

    #[test]
    fn a_quota_larger_than_the_total_never_fits() {
        let l = Limits {
            per_workspace: 10 * MIB,
            total: 5 * MIB,
        };
        assert!(plan(&[], "a", &[], l, dir()).is_err());
    }

    /// Images in memory: a mounted image holds 10 MiB of files.
    #[derive(Debug, Default)]
    struct FakeDisk {
        images: Mutex<HashMap<String, (u64, bool)>>,
        broken: bool,
    }

    impl WorkspaceDisk for FakeDisk {
        fn images(&self) -> io::Result<Vec<ImageUse>> {
            let m = self.images.lock().unwrap();
            Ok(m.iter()
                .map(|(id, (a, mounted))| ImageUse {
                    id: id.clone(),
                    allocated: *a,
                    mounted: *mounted,
                })
                .collect())
        }
        fn is_mounted(&self, id: &str) -> io::Result<bool> {
            Ok(self.images.lock().unwrap().get(id).is_some_and(|v| v.1))
        }
        fn mount(&self, id: &str, size: u64) -> Result<(), QuotaError> {
            if self.broken {
                return Err(QuotaError::Unavailable("no loop devices".into()));
            }
            assert_eq!(size, 100 * MIB);
            self.images
                .lock()
                .unwrap()
                .insert(id.into(), (10 * MIB, true));
            Ok(())
        }
        fn unmount(&self, id: &str) -> Result<(), QuotaError> {
            if let Some(v) = self.images.lock().unwrap().get_mut(id) {
                v.1 = false;
            }
            Ok(())
        }
        fn unmount_all(&self) -> usize {
            let mut m = self.images.lock().unwrap();
            m.values_mut().filter(|v| v.1).map(|v| v.1 = false).count()
        }
    }

    fn quota(disk: FakeDisk, total_mib: u64) -> Quota {
        let limits = Limits {
            per_workspace: 100 * MIB,
            total: total_mib * MIB,
        };
        Quota::new(Box::new(disk), limits, "/d".into())
    }

    /// Admit, evict and mount, as the sandbox does; then the total must hold.
    fn open(q: &Quota, id: &str, idle: &[&str]) -> Result<Vec<String>, QuotaError> {
        let Some(a) = q.admit(id, &lru(idle))? else {
            return Ok(Vec::new());
        };
        for e in &a.evict {
            q.disk().unmount(e)?;
        }
        q.mount(id)?;
        let images = q.disk().images().unwrap();
        let charged: u64 = images.iter().map(|i| charge(i, q.limits())).sum();
        assert!(charged <= q.limits().total, "{images:?}");
        Ok(a.evict)
    }

    #[test]
    fn the_bookkeeping_keeps_the_total_over_a_sequence_of_conversations() {
        let q = quota(FakeDisk::default(), 350);
        assert!(open(&q, "a", &[]).unwrap().is_empty());
        assert!(open(&q, "b", &[]).unwrap().is_empty());
        assert!(open(&q, "c", &[]).unwrap().is_empty());
        // Already mounted: nothing to do.
        assert_eq!(q.admit("a", &[]).unwrap(), None);
        // a, b, c all busy: d is refused and nothing is unmounted.
        assert!(matches!(open(&q, "d", &[]), Err(QuotaError::Full { .. })));
        assert!(q.disk().is_mounted("a").unwrap());
        // a idle: unmounted (it keeps its 10 MiB of files) to make room for d.
        assert_eq!(open(&q, "d", &["a"]).unwrap(), lru(&["a"]));
        assert!(!q.disk().is_mounted("a").unwrap());
        // a again, with b and c idle: one eviction is enough.
        assert_eq!(open(&q, "a", &["b", "c"]).unwrap(), lru(&["b"]));
        assert_eq!(q.disk().unmount_all(), 3);
    }

    #[test]
    fn a_disk_that_cannot_mount_says_so() {
        let q = quota(
            FakeDisk {
                broken: true,
                ..FakeDisk::default()
            },
            350,
        );
        let e = open(&q, "a", &[]).unwrap_err();
        assert!(matches!(e, QuotaError::Unavailable(_)));
        assert!(e.to_string().contains("cannot be enforced"), "{e}");
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
