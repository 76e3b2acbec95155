//! Sandbox configuration (`[sandbox]` in the node's TOML) and the mount policy.
//!
//! Extra mounts come only from config. [`validate_mounts`] canonicalises every host path (so a
//! symlink cannot point a mount somewhere else), requires it to lie inside an allowed root,
//! refuses secrets (blocked name patterns, anywhere in the path or inside a mounted directory),
//! refuses the node's data directory, and refuses container targets that would shadow the
//! sandbox's own layout.

use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::quota::QuotaMode;

/// Image used when the config names none: built locally by `iom sandbox build`.
pub const DEFAULT_IMAGE: &str = "iom-sandbox:1";

/// Name patterns refused in mounts by default.
pub const DEFAULT_BLOCKED_PATTERNS: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".aws",
    ".env",
    "id_rsa",
    "id_ed25519",
    ".netrc",
    ".docker",
    ".kube",
];

/// How many entries of a mounted directory are scanned for blocked names before giving up.
pub const MAX_SCANNED_ENTRIES: usize = 100_000;

/// The `[sandbox]` section of the node config. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Docker image for tool containers (default [`DEFAULT_IMAGE`]).
    pub image: String,
    /// Memory limit in MiB; swap is disabled (default 256).
    pub memory_mb: u64,
    /// CPU quota in cores (default 1.0).
    pub cpus: f64,
    /// Maximum number of processes in one container (default 64).
    pub pids_limit: i64,
    /// Wall-clock limit for one tool call, in seconds (default 30).
    pub tool_timeout_secs: u64,
    /// Bytes of tool output kept; the rest is dropped and marked truncated (default 64 KiB).
    pub output_cap_bytes: usize,
    /// A conversation's container is removed after this many idle seconds (default 600).
    pub idle_timeout_secs: u64,
    /// Host directories under which extra mounts may live (default: none, so no extra mounts).
    /// A leading `~` is the home directory of the user running the node.
    pub allowed_roots: Vec<PathBuf>,
    /// File or directory names refused in mounts. A pattern matches a path component that equals
    /// it or starts with it followed by a dot (`.env` matches `.env.local`, `id_rsa` matches
    /// `id_rsa.pub`). Defaults: [`DEFAULT_BLOCKED_PATTERNS`].
    pub blocked_patterns: Vec<String>,
    /// Extra bind mounts, checked by [`validate_mounts`].
    pub mounts: Vec<MountSpec>,
    /// Size of one conversation's workspace (`/workspace`), in MiB: a loop-mounted ext4 image,
    /// so a tool that writes more gets "No space left on device" (default 1024).
    pub workspace_quota_mb: u64,
    /// What all workspaces together may take on the host disk, in MiB (default 5120); see
    /// [`super::quota`] for how it is counted.
    pub workspaces_total_mb: u64,
    /// What to do when the quota cannot be enforced (not root, no loop devices, no
    /// `mkfs.ext4`): `"required"` fails the tool call, `"best-effort"` (the default) runs it
    /// without a quota and warns, `"off"` never mounts (both reported as not enforced by
    /// `iom sandbox check` and `iom doctor`).
    pub quota: QuotaMode,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            memory_mb: 256,
            cpus: 1.0,
            pids_limit: 64,
            tool_timeout_secs: 30,
            output_cap_bytes: 64 * 1024,
            idle_timeout_secs: 600,
            allowed_roots: Vec::new(),
            blocked_patterns: DEFAULT_BLOCKED_PATTERNS
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            mounts: Vec::new(),
            workspace_quota_mb: 1024,
            workspaces_total_mb: 5120,
            quota: QuotaMode::BestEffort,
        }
    }
}

/// One extra mount as written in config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// Host path (file or directory); a leading `~` is the node user's home directory.
    pub host: PathBuf,
    /// Absolute path inside the container.
    pub container: PathBuf,
    /// Mount read-write; read-only when false (the default).
    #[serde(default)]
    pub writable: bool,
}

/// A mount that passed [`validate_mounts`]: the host path is canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    /// Canonical host path.
    pub host: PathBuf,
    /// Absolute, normalised container path.
    pub container: PathBuf,
    /// Read-write when true.
    pub writable: bool,
}

/// Why a configured mount was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// The host path does not exist (or cannot be resolved).
    #[error("mount {path}: host path does not exist or cannot be resolved: {source}")]
    Missing {
        /// The configured host path.
        path: PathBuf,
        /// The resolution error.
        source: io::Error,
    },
    /// The host path is not inside any `allowed_roots` entry.
    #[error(
        "mount {path}: not inside an allowed root (allowed_roots = {roots:?}); add a parent \
         directory to [sandbox] allowed_roots"
    )]
    NotAllowed {
        /// The canonical host path.
        path: PathBuf,
        /// The configured roots.
        roots: Vec<PathBuf>,
    },
    /// The path is written under an allowed root but a symlink resolves it outside every root.
    #[error("mount {path}: a symlink resolves it to {resolved}, outside every allowed root")]
    SymlinkEscape {
        /// The configured host path.
        path: PathBuf,
        /// Where it really points.
        resolved: PathBuf,
    },
    /// A path component (or an entry inside a mounted directory) matches a blocked pattern.
    #[error("mount {path}: matches blocked pattern {pattern:?} (secrets are never mounted)")]
    Blocked {
        /// The offending path.
        path: PathBuf,
        /// The pattern it matched.
        pattern: String,
    },
    /// The host path is the node's data directory, inside it, or contains it.
    #[error("mount {path}: overlaps the node's data directory {data_dir}")]
    DataDir {
        /// The canonical host path.
        path: PathBuf,
        /// The canonical data directory.
        data_dir: PathBuf,
    },
    /// The container target is not an absolute, normalised path, or it shadows a reserved path.
    #[error("mount target {target}: {reason}")]
    BadTarget {
        /// The configured container path.
        target: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The host path is not valid UTF-8, which the Docker API cannot carry.
    #[error("mount {path}: host path is not valid UTF-8")]
    NotUtf8 {
        /// The offending path.
        path: PathBuf,
    },
    /// A mounted directory has too many entries to check for blocked names.
    #[error(
        "mount {path}: more than {limit} entries to check for blocked names; mount a smaller \
         directory"
    )]
    TooLarge {
        /// The configured host path.
        path: PathBuf,
        /// The scan limit.
        limit: usize,
    },
    /// Reading a mounted directory failed while scanning it.
    #[error("mount {path}: cannot scan directory: {source}")]
    Scan {
        /// The directory that failed.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Container paths a mount may not be placed on (exactly).
const RESERVED_EXACT: &[&str] = &["/", "/workspace", "/tmp"];
/// Container trees a mount may not be placed on or inside.
const RESERVED_TREES: &[&str] = &["/proc", "/sys", "/dev", "/bin", "/sbin", "/etc"];

/// Checks every configured mount and returns them resolved, or the first refusal.
pub fn validate_mounts(
    cfg: &SandboxConfig,
    data_dir: &Path,
) -> Result<Vec<ResolvedMount>, MountError> {
    // `~` in config means the node user's home directory, as in a shell.
    let cfg = &SandboxConfig {
        allowed_roots: cfg.allowed_roots.iter().map(|r| expand_home(r)).collect(),
        mounts: cfg
            .mounts
            .iter()
            .map(|m| MountSpec {
                host: expand_home(&m.host),
                ..m.clone()
            })
            .collect(),
        ..cfg.clone()
    };
    let roots: Vec<PathBuf> = cfg
        .allowed_roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .collect();
    let data_dir = data_dir
        .canonicalize()
        .unwrap_or_else(|_| absolute(data_dir));
    let mut targets = HashSet::new();
    let mut out = Vec::with_capacity(cfg.mounts.len());
    for spec in &cfg.mounts {
        let m = validate_one(cfg, spec, &roots, &data_dir)?;
        if !targets.insert(m.container.clone()) {
            return Err(MountError::BadTarget {
                target: spec.container.clone(),
                reason: "two mounts use the same container path".into(),
            });
        }
        out.push(m);
    }
    Ok(out)
}

fn validate_one(
    cfg: &SandboxConfig,
    spec: &MountSpec,
    roots: &[PathBuf],
    data_dir: &Path,
) -> Result<ResolvedMount, MountError> {
    let container = check_target(&spec.container)?;
    let written = absolute(&spec.host);
    if let Some(pattern) = blocked_component(&written, &cfg.blocked_patterns) {
        return Err(MountError::Blocked {
            path: written,
            pattern,
        });
    }
    let host = spec
        .host
        .canonicalize()
        .map_err(|source| MountError::Missing {
            path: spec.host.clone(),
            source,
        })?;
    if let Some(pattern) = blocked_component(&host, &cfg.blocked_patterns) {
        return Err(MountError::Blocked {
            path: host,
            pattern,
        });
    }
    if host.starts_with(data_dir) || data_dir.starts_with(&host) {
        return Err(MountError::DataDir {
            path: host,
            data_dir: data_dir.to_path_buf(),
        });
    }
    if !roots.iter().any(|r| host.starts_with(r)) {
        let lexical = normalise(&written);
        let written_inside = cfg
            .allowed_roots
            .iter()
            .map(|r| normalise(&absolute(r)))
            .chain(roots.iter().cloned())
            .any(|r| lexical.starts_with(r));
        return Err(if written_inside {
            MountError::SymlinkEscape {
                path: spec.host.clone(),
                resolved: host,
            }
        } else {
            MountError::NotAllowed {
                path: host,
                roots: cfg.allowed_roots.clone(),
            }
        });
    }
    if host.to_str().is_none() {
        return Err(MountError::NotUtf8 { path: host });
    }
    if host.is_dir() {
        scan_for_blocked(&host, &cfg.blocked_patterns)?;
    }
    Ok(ResolvedMount {
        host,
        container,
        writable: spec.writable,
    })
}

/// Validates a container target and returns it normalised.
fn check_target(target: &Path) -> Result<PathBuf, MountError> {
    let bad = |reason: &str| MountError::BadTarget {
        target: target.to_path_buf(),
        reason: reason.to_string(),
    };
    if !target.is_absolute() {
        return Err(bad("must be an absolute path"));
    }
    if target
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("must not contain `.` or `..`"));
    }
    if target.to_str().is_none_or(|s| s.contains(':')) {
        return Err(bad("must be UTF-8 without `:`"));
    }
    let target_n = normalise(target);
    for r in RESERVED_EXACT {
        if target_n == Path::new(r) {
            return Err(bad(&format!("would shadow the sandbox's {r}")));
        }
    }
    for r in RESERVED_TREES {
        if target_n.starts_with(r) {
            return Err(bad(&format!("must not be on or inside {r}")));
        }
    }
    Ok(target_n)
}

/// Returns the pattern matched by a component of `path`, if any.
fn blocked_component(path: &Path, patterns: &[String]) -> Option<String> {
    path.components().find_map(|c| match c {
        Component::Normal(name) => matching_pattern(&name.to_string_lossy(), patterns),
        _ => None,
    })
}

fn matching_pattern(name: &str, patterns: &[String]) -> Option<String> {
    patterns
        .iter()
        .find(|p| {
            !p.is_empty()
                && (name == p.as_str()
                    || name
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('.')))
        })
        .cloned()
}

/// Walks a directory (without following symlinks) and refuses it if any entry is blocked.
fn scan_for_blocked(dir: &Path, patterns: &[String]) -> Result<(), MountError> {
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| MountError::Scan {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| MountError::Scan {
                path: d.clone(),
                source,
            })?;
            seen += 1;
            if seen > MAX_SCANNED_ENTRIES {
                return Err(MountError::TooLarge {
                    path: dir.to_path_buf(),
                    limit: MAX_SCANNED_ENTRIES,
                });
            }
            let path = entry.path();
            if let Some(pattern) = matching_pattern(&entry.file_name().to_string_lossy(), patterns)
            {
                return Err(MountError::Blocked { path, pattern });
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Replaces a leading `~` component with `$HOME` (unchanged when `HOME` is unset or empty).
fn expand_home(p: &Path) -> PathBuf {
    let Ok(rest) = p.strip_prefix("~") else {
        return p.to_path_buf();
    };
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(rest),
        None => p.to_path_buf(),
    }
}

/// Makes a path absolute against the current directory, without touching the filesystem.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Removes `.` and resolves `..` lexically.
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        data: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("projects");
        let outside = tmp.path().join("outside");
        let data = tmp.path().join("data");
        for d in [&root, &outside, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(root.join("app/src")).unwrap();
        std::fs::write(root.join("app/src/main.rs"), "fn main() {}").unwrap();
        Fixture {
            _tmp: tmp,
            root,
            outside,
            data,
        }
    }

    fn cfg(f: &Fixture, host: PathBuf, container: &str) -> SandboxConfig {
        SandboxConfig {
            allowed_roots: vec![f.root.clone()],
            mounts: vec![MountSpec {
                host,
                container: container.into(),
                writable: false,
            }],
            ..SandboxConfig::default()
        }
    }

    #[test]
    fn defaults_come_from_an_empty_toml_section() {
        let c: SandboxConfig = toml::from_str("").unwrap();
        assert_eq!(c, SandboxConfig::default());
        assert_eq!(c.image, DEFAULT_IMAGE);
        assert_eq!(c.memory_mb, 256);
        assert_eq!(c.pids_limit, 64);
        assert_eq!(c.tool_timeout_secs, 30);
        assert_eq!(c.output_cap_bytes, 65536);
        assert_eq!(c.idle_timeout_secs, 600);
        assert!(c.blocked_patterns.iter().any(|p| p == ".ssh"));
        assert_eq!(c.workspace_quota_mb, 1024);
        assert_eq!(c.workspaces_total_mb, 5120);
        assert_eq!(c.quota, QuotaMode::BestEffort);
        let q: SandboxConfig = toml::from_str("quota = \"required\"").unwrap();
        assert_eq!(q.quota, QuotaMode::Required);
        assert!(toml::from_str::<SandboxConfig>("quota = \"maybe\"").is_err());
        let c: SandboxConfig = toml::from_str(
            "memory_mb = 512\nallowed_roots = [\"/srv\"]\n\
             [[mounts]]\nhost = \"/srv/a\"\ncontainer = \"/data\"\n",
        )
        .unwrap();
        assert_eq!(c.memory_mb, 512);
        assert!(!c.mounts[0].writable);
        assert!(toml::from_str::<SandboxConfig>("memroy_mb = 1").is_err());
    }

    #[test]
    fn a_plain_mount_inside_a_root_is_accepted_and_canonical() {
        let f = fixture();
        let mut c = cfg(&f, f.root.join("app/./src/../src"), "/data/app");
        c.mounts[0].writable = true;
        let m = validate_mounts(&c, &f.data).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].host, f.root.join("app/src").canonicalize().unwrap());
        assert_eq!(m[0].container, Path::new("/data/app"));
        assert!(m[0].writable);
    }

    #[test]
    fn a_path_outside_every_root_is_not_allowed() {
        let f = fixture();
        let c = cfg(&f, f.outside.clone(), "/data");
        assert!(matches!(
            validate_mounts(&c, &f.data),
            Err(MountError::NotAllowed { .. })
        ));
        let c = cfg(&f, f.root.join("../outside"), "/data");
        assert!(matches!(
            validate_mounts(&c, &f.data),
            Err(MountError::NotAllowed { .. })
        ));
    }

    #[test]
    fn a_leading_tilde_is_the_home_directory() {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let expanded = expand_home(Path::new("~/.ssh"));
        match home.filter(|h| !h.as_os_str().is_empty()) {
            Some(h) => assert_eq!(expanded, h.join(".ssh")),
            None => assert_eq!(expanded, Path::new("~/.ssh")),
        }
        assert_eq!(expand_home(Path::new("/a/~/b")), Path::new("/a/~/b"));
        assert_eq!(expand_home(Path::new("~other/x")), Path::new("~other/x"));
    }

    #[test]
    fn a_symlink_leaving_the_root_is_an_escape() {
        let f = fixture();
        symlink(&f.outside, f.root.join("sneaky")).unwrap();
        let c = cfg(&f, f.root.join("sneaky"), "/data");
        match validate_mounts(&c, &f.data) {
            Err(MountError::SymlinkEscape { resolved, .. }) => {
                assert_eq!(resolved, f.outside.canonicalize().unwrap())
            }
            other => panic!("expected SymlinkEscape, got {other:?}"),
        }
        // A symlink that stays inside the root is fine.
        symlink(f.root.join("app"), f.root.join("alias")).unwrap();
        let c = cfg(&f, f.root.join("alias"), "/data");
        assert!(validate_mounts(&c, &f.data).is_ok());
    }

    #[test]
    fn blocked_names_are_refused_in_the_path_behind_symlinks_and_inside_dirs() {
        let f = fixture();
        let ssh = f.root.join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        let c = cfg(&f, ssh.clone(), "/data");
        assert!(matches!(
            validate_mounts(&c, &f.data),
            Err(MountError::Blocked { pattern, .. }) if pattern == ".ssh"
        ));
        // Written innocently, but resolving to a blocked name.
        symlink(&ssh, f.root.join("keys")).unwrap();
        let c = cfg(&f, f.root.join("keys"), "/data");
        assert!(matches!(
            validate_mounts(&c, &f.data),
            Err(MountError::Blocked { pattern, .. }) if pattern == ".ssh"
        ));
        // A secret file inside the mounted directory.
        std::fs::write(f.root.join("app/src/.env.local"), "KEY=1").unwrap();
        let c = cfg(&f, f.root.join("app"), "/data");
        match validate_mounts(&c, &f.data) {
            Err(MountError::Blocked { path, pattern }) => {
                assert_eq!(pattern, ".env");
                assert!(path.ends_with("app/src/.env.local"));
            }
            other => panic!("expected Blocked, got {other:?}"),
        }
        // `.environment` is not `.env`.
        assert_eq!(
            matching_pattern(".environment", &[".env".to_string()]),
            None
        );
        assert!(matching_pattern("id_rsa.pub", &["id_rsa".to_string()]).is_some());
    }

    #[test]
    fn the_data_dir_is_refused_inside_and_around() {
        let f = fixture();
        let data_in_root = f.root.join("iomdata");
        std::fs::create_dir_all(data_in_root.join("workspaces")).unwrap();
        for host in [
            data_in_root.clone(),
            data_in_root.join("workspaces"),
            f.root.clone(),
        ] {
            let c = cfg(&f, host.clone(), "/data");
            assert!(
                matches!(
                    validate_mounts(&c, &data_in_root),
                    Err(MountError::DataDir { .. })
                ),
                "{host:?}"
            );
        }
    }

    #[test]
    fn missing_host_paths_are_reported() {
        let f = fixture();
        let c = cfg(&f, f.root.join("nope"), "/data");
        assert!(matches!(
            validate_mounts(&c, &f.data),
            Err(MountError::Missing { .. })
        ));
    }

    #[test]
    fn bad_targets_are_refused() {
        let f = fixture();
        for t in [
            "data",
            "/",
            "/workspace",
            "/tmp",
            "/proc",
            "/proc/sys",
            "/bin",
            "/etc/passwd",
            "/a/../etc",
            "/x:ro",
        ] {
            let c = cfg(&f, f.root.join("app"), t);
            assert!(
                matches!(
                    validate_mounts(&c, &f.data),
                    Err(MountError::BadTarget { .. })
                ),
                "{t}"
            );
        }
        let mut c = cfg(&f, f.root.join("app"), "/data");
        c.mounts.push(c.mounts[0].clone());
        assert!(matches!(
            validate_mounts(&c, &f.data),
            Err(MountError::BadTarget { .. })
        ));
    }
}
