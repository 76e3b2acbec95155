//! The fuller sandbox image with python3 (`iom sandbox build --python`), for MCP servers.
//!
//! 1. `debootstrap --variant=minbase` makes a Debian root filesystem from the archive the host's
//!    apt is configured with (`python3`, `python3-pip`, `git`, `tzdata`, `ca-certificates` and
//!    any `--apt` extras). The result is kept as a tarball in the cache directory, keyed by the
//!    suite, the mirror and the package list, so a rebuild skips this step.
//! 2. The tarball is imported as the base image (no registry, like the busybox image).
//! 3. If wheels are given, a container of the base image with **no network** installs them
//!    offline (`pip install --no-index --find-links`), with the wheel directories mounted
//!    read-only, and is committed as the final image. Wheels come from `pip download` on the
//!    host (see `docs/mcp.md`).
//!
//! Needs root (debootstrap) and Docker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, LogsOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;

use super::SandboxError;
use super::container::remove_container;
use super::image::{SANDBOX_UID, build_image};

/// The tag of the python image when the config names none.
pub const PYTHON_IMAGE: &str = "iom-sandbox-python:1";
/// The Debian suite used by default.
pub const DEFAULT_SUITE: &str = "trixie";
/// Used when no mirror is found in the host's apt sources.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Debian packages always in the image.
pub const BASE_PACKAGES: &[&str] = &["python3", "python3-pip", "git", "tzdata", "ca-certificates"];
/// Where wheel directories are mounted in the install container.
const WHEELS_AT: &str = "/iom-wheels";

/// Where the debootstrap tarballs are cached: `$IOM_CACHE_DIR`, else `$XDG_CACHE_HOME/iom`,
/// else `~/.cache/iom`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IOM_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("iom");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/iom")
}

/// What to build.
#[derive(Debug, Clone)]
pub struct PythonImageSpec {
    /// The image reference to tag (`repo:tag`).
    pub image: String,
    /// Debian suite (default [`DEFAULT_SUITE`]).
    pub suite: String,
    /// Debian mirror; `None`: the first one in the host's apt sources.
    pub mirror: Option<String>,
    /// Debian packages beyond [`BASE_PACKAGES`] (e.g. `nodejs`).
    pub extra_packages: Vec<String>,
    /// Directories of wheels (from `pip download`), installed offline.
    pub wheels: Vec<PathBuf>,
    /// What to install from them (pip requirement strings); empty: every wheel in them.
    pub requirements: Vec<String>,
    /// Where the debootstrap tarball is cached.
    pub cache_dir: PathBuf,
}

impl PythonImageSpec {
    /// A spec with the defaults, caching under `cache_dir`.
    pub fn new(cache_dir: PathBuf) -> PythonImageSpec {
        PythonImageSpec {
            image: PYTHON_IMAGE.to_string(),
            suite: DEFAULT_SUITE.to_string(),
            mirror: None,
            extra_packages: Vec::new(),
            wheels: Vec::new(),
            requirements: Vec::new(),
            cache_dir,
        }
    }

    fn packages(&self) -> Vec<String> {
        let mut p: Vec<String> = BASE_PACKAGES.iter().map(|s| (*s).to_string()).collect();
        p.extend(self.extra_packages.iter().cloned());
        p.sort();
        p.dedup();
        p
    }
}

/// What a build did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PythonImageBuild {
    /// The image reference.
    pub image: String,
    /// The cached rootfs tarball.
    pub rootfs: PathBuf,
    /// Whether the tarball came from the cache (debootstrap skipped).
    pub cached: bool,
    /// How many requirements (or wheel files) were installed.
    pub installed: usize,
}

/// Builds the python image; `step` is told what is happening (for a progress line).
pub async fn build_python_image(
    docker: &Docker,
    spec: &PythonImageSpec,
    step: &(dyn Fn(&str) + Send + Sync),
) -> Result<PythonImageBuild, SandboxError> {
    check_package_names(&spec.extra_packages)?;
    let mirror = match &spec.mirror {
        Some(m) => m.clone(),
        None => host_mirror().unwrap_or_else(|| FALLBACK_MIRROR.to_string()),
    };
    let packages = spec.packages();
    let key = cache_key(&spec.suite, &mirror, &packages);
    let tar = spec
        .cache_dir
        .join(format!("debootstrap-{}-{key}.tar", spec.suite));
    let cached = tokio::fs::metadata(&tar).await.is_ok();
    if !cached {
        step(&format!(
            "debootstrap {} from {mirror} (a few minutes, once)",
            spec.suite
        ));
        debootstrap(&spec.suite, &mirror, &packages, &tar).await?;
    }
    let wheel_dirs = spec
        .wheels
        .iter()
        .map(|w| {
            std::fs::canonicalize(w)
                .map_err(SandboxError::io(w))
                .and_then(|p| {
                    if p.is_dir() {
                        Ok(p)
                    } else {
                        Err(SandboxError::Rootfs(format!(
                            "{}: not a directory of wheels",
                            w.display()
                        )))
                    }
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if wheel_dirs.is_empty() {
        step("importing the image");
        let image = build_image(docker, Some(&tar), &spec.image).await?;
        return Ok(PythonImageBuild {
            image,
            rootfs: tar,
            cached,
            installed: 0,
        });
    }
    let base = base_reference(&spec.image);
    step("importing the base image");
    build_image(docker, Some(&tar), &base).await?;
    let targets = install_targets(&wheel_dirs, &spec.requirements)?;
    step(&format!("installing {} package(s) offline", targets.len()));
    install_wheels(docker, &base, &wheel_dirs, &targets, &spec.image).await?;
    Ok(PythonImageBuild {
        image: spec.image.clone(),
        rootfs: tar,
        cached,
        installed: targets.len(),
    })
}

/// `repo:tag` → `repo-base:tag`.
fn base_reference(image: &str) -> String {
    match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => format!("{r}-base:{t}"),
        _ => format!("{image}-base:latest"),
    }
}

/// Debian package names: lowercase letters, digits, `+ - .` (checked: they reach a command).
fn check_package_names(names: &[String]) -> Result<(), SandboxError> {
    for n in names {
        let ok = n.len() >= 2
            && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && n.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.')
            });
        if !ok {
            return Err(SandboxError::Rootfs(format!(
                "{n:?} is not a Debian package name"
            )));
        }
    }
    Ok(())
}

/// A short hash of what goes into the rootfs.
fn cache_key(suite: &str, mirror: &str, packages: &[String]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(suite.as_bytes());
    h.update(b"\0");
    h.update(mirror.trim_end_matches('/').as_bytes());
    for p in packages {
        h.update(b"\0");
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..6])
}

/// The first Debian mirror in the host's apt sources (`deb URL suite …` lines or deb822
/// `URIs:` fields), skipping the security archive.
pub fn host_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| mirror_in(&text))
}

fn mirror_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| {
            if let Some(rest) = l.strip_prefix("URIs:") {
                rest.split_whitespace().map(str::to_string).collect()
            } else if let Some(rest) = l.strip_prefix("deb ") {
                rest.split_whitespace()
                    .find(|w| w.contains("://"))
                    .map(str::to_string)
                    .into_iter()
                    .collect()
            } else {
                Vec::new()
            }
        })
        .find(|u| u.starts_with("http") && !u.contains("security"))
}

/// Runs debootstrap into a temporary directory beside `tar`, adds the sandbox user and
/// `/workspace`, drops apt's caches, and packs it into `tar`.
async fn debootstrap(
    suite: &str,
    mirror: &str,
    packages: &[String],
    tar: &Path,
) -> Result<(), SandboxError> {
    let Some(cache) = tar.parent() else {
        return Err(SandboxError::Rootfs("no cache directory".into()));
    };
    tokio::fs::create_dir_all(cache)
        .await
        .map_err(SandboxError::io(cache))?;
    let dir = cache.join(format!("rootfs-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let out = tokio::process::Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg(suite)
        .arg(&dir)
        .arg(mirror)
        .output()
        .await
        .map_err(|e| {
            SandboxError::Rootfs(format!(
                "cannot run debootstrap: {e}; install it: sudo apt-get install debootstrap (or \
                 run scripts/install-deps.sh)"
            ))
        })?;
    if !out.status.success() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let mut log = String::from_utf8_lossy(&out.stderr).into_owned();
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        let tail: String = log.lines().rev().take(8).collect::<Vec<_>>().join(" | ");
        let root = if is_root() {
            ""
        } else {
            " (debootstrap needs root)"
        };
        return Err(SandboxError::Rootfs(format!(
            "debootstrap {suite} from {mirror} failed{root}: {tail}"
        )));
    }
    let result = finish_rootfs(&dir).await;
    let packed = match result {
        Ok(()) => pack(&dir, tar).await,
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    packed
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

async fn finish_rootfs(dir: &Path) -> Result<(), SandboxError> {
    let uid = SANDBOX_UID;
    for (file, line) in [
        (
            "etc/passwd",
            format!("iom:x:{uid}:{uid}:iom sandbox:/workspace:/bin/sh\n"),
        ),
        ("etc/group", format!("iom:x:{uid}:\n")),
    ] {
        let path = dir.join(file);
        let mut text = tokio::fs::read_to_string(&path)
            .await
            .map_err(SandboxError::io(&path))?;
        if !text.lines().any(|l| l.starts_with("iom:")) {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&line);
            tokio::fs::write(&path, text)
                .await
                .map_err(SandboxError::io(&path))?;
        }
    }
    let ws = dir.join("workspace");
    tokio::fs::create_dir_all(&ws)
        .await
        .map_err(SandboxError::io(&ws))?;
    std::os::unix::fs::chown(&ws, Some(uid), Some(uid)).map_err(SandboxError::io(&ws))?;
    for junk in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
    ] {
        let d = dir.join(junk);
        if let Ok(mut rd) = tokio::fs::read_dir(&d).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                if e.file_type().await.is_ok_and(|t| t.is_file()) {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
            }
        }
    }
    Ok(())
}

async fn pack(dir: &Path, tar: &Path) -> Result<(), SandboxError> {
    let partial = tar.with_extension("tar.partial");
    let st = tokio::process::Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(&partial)
        .arg(".")
        .status()
        .await
        .map_err(|e| SandboxError::Rootfs(format!("cannot run tar: {e}")))?;
    if !st.success() {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(SandboxError::Rootfs(format!(
            "tar of {} failed ({st})",
            dir.display()
        )));
    }
    tokio::fs::rename(&partial, tar)
        .await
        .map_err(SandboxError::io(tar))
}

/// What `pip install` is given: the requirements, or every wheel file of the directories (as
/// paths inside the install container).
fn install_targets(dirs: &[PathBuf], requirements: &[String]) -> Result<Vec<String>, SandboxError> {
    for r in requirements {
        if r.is_empty() || r.starts_with('-') || r.chars().any(char::is_whitespace) {
            return Err(SandboxError::Rootfs(format!(
                "{r:?} is not a pip requirement (like mcp-server-time or mcp-server-time==1.2)"
            )));
        }
    }
    if !requirements.is_empty() {
        return Ok(requirements.to_vec());
    }
    let mut all = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .map_err(SandboxError::io(d))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".whl"))
            .collect();
        names.sort();
        all.extend(names.into_iter().map(|n| format!("{WHEELS_AT}/{i}/{n}")));
    }
    if all.is_empty() {
        return Err(SandboxError::Rootfs(
            "no .whl files in the wheel directories (fill one with `pip download`)".into(),
        ));
    }
    Ok(all)
}

/// Installs `targets` offline in a no-network container of `base` and commits it as `image`.
async fn install_wheels(
    docker: &Docker,
    base: &str,
    dirs: &[PathBuf],
    targets: &[String],
    image: &str,
) -> Result<(), SandboxError> {
    let mut cmd = vec![
        "python3".to_string(),
        "-m".into(),
        "pip".into(),
        "install".into(),
        "--no-index".into(),
        "--no-cache-dir".into(),
        "--disable-pip-version-check".into(),
        "--break-system-packages".into(),
        "--root-user-action=ignore".into(),
    ];
    let mut mounts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        cmd.push(format!("--find-links={WHEELS_AT}/{i}"));
        mounts.push(Mount {
            typ: Some(MountType::BIND),
            source: Some(d.to_string_lossy().into_owned()),
            target: Some(format!("{WHEELS_AT}/{i}")),
            read_only: Some(true),
            ..Default::default()
        });
    }
    cmd.extend(targets.iter().cloned());
    let body = ContainerCreateBody {
        image: Some(base.to_string()),
        cmd: Some(cmd),
        user: Some("0:0".into()),
        env: Some(vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".into(),
            "HOME=/root".into(),
        ]),
        network_disabled: Some(true),
        labels: Some(HashMap::from([(
            "iom.image-build".to_string(),
            "1".to_string(),
        )])),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            mounts: Some(mounts),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .map_err(SandboxError::docker("create of the install container"))?;
    let id = created.id;
    let result = run_install(docker, &id, image).await;
    remove_container(docker, &id).await;
    result
}

async fn run_install(docker: &Docker, id: &str, image: &str) -> Result<(), SandboxError> {
    docker
        .start_container(id, None)
        .await
        .map_err(SandboxError::docker("start of the install container"))?;
    let wait = docker
        .wait_container(id, Some(WaitContainerOptionsBuilder::default().build()))
        .collect::<Vec<_>>()
        .await;
    let code = match wait.into_iter().next() {
        Some(Ok(r)) => r.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return Err(SandboxError::docker("wait for the install container")(e)),
        None => -1,
    };
    if code != 0 {
        let logs: Vec<String> = docker
            .logs(
                id,
                Some(
                    LogsOptionsBuilder::default()
                        .stdout(true)
                        .stderr(true)
                        .tail("12")
                        .build(),
                ),
            )
            .filter_map(|l| async move { l.ok().map(|l| l.to_string()) })
            .collect()
            .await;
        return Err(SandboxError::Rootfs(format!(
            "pip install (offline, no network) failed with exit code {code}: {}",
            logs.concat().trim()
        )));
    }
    let (repo, tag) = match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (image, "latest"),
    };
    let opts = CommitContainerOptionsBuilder::default()
        .container(id)
        .repo(repo)
        .tag(tag)
        .comment("iom sandbox python image")
        .changes(&format!(
            "USER {SANDBOX_UID}:{SANDBOX_UID}\nWORKDIR /workspace\nCMD [\"/bin/sh\"]"
        ))
        .build();
    let previous = docker.inspect_image(image).await.ok().and_then(|i| i.id);
    let new = docker
        .commit_container(opts, bollard::models::ContainerConfig::default())
        .await
        .map_err(SandboxError::docker("commit of the python image"))?
        .id;
    if let Some(old) = previous
        && old != new
    {
        // The old image is untagged now; drop it unless a container still uses it.
        let _ = docker
            .remove_image(
                &old,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_comes_from_either_sources_format_and_skips_security() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian-security\n\nTypes: deb\n\
                      URIs: http://mirror.example/debian\nSuites: trixie\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let classic = "# deb http://old/ x\ndeb [arch=amd64] http://m.example/debian trixie main\n";
        assert_eq!(
            mirror_in(classic).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(mirror_in("# nothing\n"), None);
    }

    #[test]
    fn the_cache_key_follows_the_package_list_and_suite() {
        let a = cache_key("trixie", "http://m/", &["git".into(), "python3".into()]);
        assert_eq!(
            a,
            cache_key("trixie", "http://m", &["git".into(), "python3".into()])
        );
        assert_ne!(a, cache_key("trixie", "http://m", &["python3".into()]));
        assert_ne!(
            a,
            cache_key("bookworm", "http://m", &["git".into(), "python3".into()])
        );
    }

    #[test]
    fn package_names_and_requirements_are_checked_before_they_reach_a_command() {
        assert!(check_package_names(&["nodejs".into(), "libc++1".into()]).is_ok());
        for bad in ["--force", "a b", "X", "n;rm"] {
            assert!(check_package_names(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(install_targets(&[], &["--index-url=http://x".into()]).is_err());
        assert_eq!(
            install_targets(&[], &["mcp-server-time==1".into()]).unwrap(),
            vec!["mcp-server-time==1".to_string()]
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b-1-py3-none-any.whl"), b"").unwrap();
        std::fs::write(dir.path().join("a-1-py3-none-any.whl"), b"").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        assert_eq!(
            install_targets(&[dir.path().to_path_buf()], &[]).unwrap(),
            vec![
                "/iom-wheels/0/a-1-py3-none-any.whl".to_string(),
                "/iom-wheels/0/b-1-py3-none-any.whl".to_string()
            ]
        );
        assert_eq!(
            base_reference("iom-sandbox-python:1"),
            "iom-sandbox-python-base:1"
        );
    }
}
