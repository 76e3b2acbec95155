//! `iom sandbox check`: is the sandbox usable here, and if not, what to do about it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::CreateContainerOptionsBuilder;

use super::SandboxError;
use super::container::{
    LABEL_NODE, LABEL_SANDBOX, connect_docker, hardened_body, remove_container,
};
use super::exec;
use super::policy::{SandboxConfig, validate_mounts};
use super::quota::{self, QuotaMode};

/// One diagnostic line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, or what to do (an actionable sentence).
    pub detail: String,
}

impl CheckItem {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        }
    }

    fn fail(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        }
    }
}

/// Runs every check and returns one item per check, in order. Never fails as a whole.
pub async fn check(cfg: &SandboxConfig, data_dir: &Path) -> Vec<CheckItem> {
    let mut items = Vec::new();
    items.push(check_socket().await);

    let docker = match connect_docker().await {
        Ok(d) => {
            let v = d.client_version();
            let engine = super::container::engine_version(&d).await;
            items.push(CheckItem::pass(
                "Docker API version",
                format!(
                    "negotiated API {}.{} with Docker Engine {engine}",
                    v.major_version, v.minor_version
                ),
            ));
            Some(d)
        }
        Err(e) => {
            items.push(CheckItem::fail("Docker API version", e.to_string()));
            None
        }
    };

    if let Some(docker) = docker {
        let image_ok = match docker.inspect_image(&cfg.image).await {
            Ok(_) => {
                items.push(CheckItem::pass(
                    "sandbox image",
                    format!("{} is present", cfg.image),
                ));
                true
            }
            Err(e) => {
                items.push(CheckItem::fail(
                    "sandbox image",
                    format!("{} is missing ({e}); run `iom sandbox build`", cfg.image),
                ));
                false
            }
        };
        if image_ok {
            items.extend(check_container(&docker, cfg).await);
        }
    }

    items.push(check_quota(cfg, data_dir).await);
    items.push(match validate_mounts(cfg, data_dir) {
        Ok(m) => CheckItem::pass(
            "configured mounts",
            format!("{} extra mount(s) pass the policy", m.len()),
        ),
        Err(e) => CheckItem::fail(
            "configured mounts",
            format!("{e}; fix [sandbox] mounts in the config"),
        ),
    });
    items
}

/// Is the workspace disk quota enforced? Tries a real loop mount in the data dir.
async fn check_quota(cfg: &SandboxConfig, data_dir: &Path) -> CheckItem {
    const NAME: &str = "workspace quota";
    if cfg.quota == QuotaMode::Off {
        return CheckItem::fail(
            NAME,
            "NOT enforced: [sandbox] quota = \"off\", so a tool call can fill the disk; remove \
             that line (the node must run as root to mount the workspace images)",
        );
    }
    let dir = data_dir.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        quota::probe_mount(&dir)
    })
    .await
    .unwrap_or_else(|e| Err(format!("probe task failed: {e}")));
    match probe {
        Ok(()) => CheckItem::pass(
            NAME,
            format!(
                "enforced: {} MiB per conversation workspace, {} MiB in total (a loop-mounted \
                 ext4 image was created, filled to \"no space\" and removed)",
                cfg.workspace_quota_mb, cfg.workspaces_total_mb
            ),
        ),
        Err(why) => CheckItem::fail(
            NAME,
            format!(
                "NOT enforced: {why}; {}. Fix: run the node as root with e2fsprogs (mkfs.ext4) \
                 installed and loop devices available",
                match cfg.quota {
                    QuotaMode::Required => "with quota = \"required\" every tool call fails",
                    _ => "with quota = \"best-effort\" tools run without a quota",
                }
            ),
        ),
    }
}

/// Can the Docker socket be opened at all (distinguishes "not running" from "no permission")?
async fn check_socket() -> CheckItem {
    const NAME: &str = "Docker socket";
    let host = std::env::var("DOCKER_HOST").ok();
    let path = match host.as_deref() {
        None => "/var/run/docker.sock".to_string(),
        Some(h) => match h.strip_prefix("unix://") {
            Some(p) => p.to_string(),
            None => {
                return CheckItem::pass(
                    NAME,
                    format!("DOCKER_HOST={h} (not a unix socket; see the API check below)"),
                );
            }
        },
    };
    match tokio::net::UnixStream::connect(&path).await {
        Ok(_) => CheckItem::pass(NAME, format!("{path} is reachable")),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => CheckItem::fail(
            NAME,
            format!(
                "{path}: permission denied; add your user to the docker group \
                 (sudo usermod -aG docker $USER, then log in again)"
            ),
        ),
        Err(e) => CheckItem::fail(
            NAME,
            format!("{path}: {e}; start the Docker engine: sudo systemctl start docker"),
        ),
    }
}

/// Starts a throwaway hardened container and looks at it from the inside.
async fn check_container(docker: &Docker, cfg: &SandboxConfig) -> Vec<CheckItem> {
    const START: &str = "hardened container starts";
    let name = format!("iom-check-{}", uuid::Uuid::new_v4().simple());
    let labels = HashMap::from([
        (LABEL_SANDBOX.to_string(), "1".to_string()),
        (LABEL_NODE.to_string(), "check".to_string()),
    ]);
    let body = hardened_body(
        cfg,
        &cfg.image,
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "while :; do sleep 3600 & wait $!; done".into(),
        ],
        labels,
        None,
        &[],
    );
    let opts = CreateContainerOptionsBuilder::default().name(&name).build();
    let id = match docker.create_container(Some(opts), body).await {
        Ok(c) => c.id,
        Err(e) => {
            return vec![CheckItem::fail(
                START,
                format!("create failed: {e}; rebuild the image with `iom sandbox build`"),
            )];
        }
    };
    let mut items = Vec::new();
    if let Err(e) = docker.start_container(&id, None).await {
        items.push(CheckItem::fail(
            START,
            format!(
                "start failed: {e}; the engine may not support the limits used (memory, pids, \
                 no-new-privileges); check `docker info` for cgroup warnings"
            ),
        ));
        remove_container(docker, &id).await;
        return items;
    }
    items.push(CheckItem::pass(
        START,
        "read-only root, no capabilities, no-new-privileges, memory/pids/CPU limits accepted",
    ));

    items.push(match run(docker, &id, "id -u").await {
        Ok(uid) if uid.trim() != "0" && !uid.trim().is_empty() => {
            CheckItem::pass("non-root user", format!("tools run as uid {}", uid.trim()))
        }
        Ok(uid) => CheckItem::fail(
            "non-root user",
            format!(
                "tools run as uid {:?}; rebuild the image with `iom sandbox build`",
                uid.trim()
            ),
        ),
        Err(e) => CheckItem::fail("non-root user", format!("exec failed: {e}")),
    });

    items.push(match run(docker, &id, "ls /sys/class/net").await {
        Ok(ifaces) => {
            let names: Vec<&str> = ifaces.split_whitespace().collect();
            if names == ["lo"] {
                CheckItem::pass("no network", "only the loopback interface exists")
            } else {
                CheckItem::fail(
                    "no network",
                    format!(
                        "interfaces {names:?} are visible; the engine ignored network_mode=none, \
                         upgrade Docker"
                    ),
                )
            }
        }
        Err(e) => CheckItem::fail("no network", format!("exec failed: {e}")),
    });
    remove_container(docker, &id).await;
    items
}

async fn run(docker: &Docker, id: &str, script: &str) -> Result<String, SandboxError> {
    let limit = Duration::from_secs(10);
    let out = exec::run(
        docker,
        id,
        vec!["/bin/sh".into(), "-c".into(), script.into()],
        None,
        4096,
        tokio::time::Instant::now() + limit,
        limit,
    )
    .await?;
    Ok(String::from_utf8_lossy(&out.output).into_owned())
}
