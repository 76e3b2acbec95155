//! `iom service install|uninstall|status|show`: the node (or the relay) as a systemd service.
//! The unit text comes from [`crate::unit`]; this module finds the paths, writes the file and
//! calls `systemctl`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, anyhow};
use serde_json::json;

use super::Global;
use crate::Failure;
use crate::args::{ServiceArgs, ServiceCommand};
use crate::unit::{Role, UnitSpec, render};

/// Runs `iom service ...`; `relay_dir` is the relay's data dir.
pub fn run(g: &Global, relay_dir: &Path, cmd: ServiceCommand) -> Result<(), Failure> {
    match cmd {
        ServiceCommand::Install(a) => install(g, relay_dir, &a),
        ServiceCommand::Uninstall(a) => uninstall(g, relay_dir, &a),
        ServiceCommand::Status(a) => status(g, relay_dir, &a),
        ServiceCommand::Show(a) => {
            print!("{}", render(&spec(g, relay_dir, &a)?));
            Ok(())
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf, Failure> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    Ok(cwd.join(p))
}

/// Whether the system has a `docker` group (a unit naming a missing group fails to start).
fn docker_group_exists() -> bool {
    std::fs::read_to_string("/etc/group")
        .map(|t| t.lines().any(|l| l.split(':').next() == Some("docker")))
        .unwrap_or(false)
}

fn spec(g: &Global, relay_dir: &Path, a: &ServiceArgs) -> Result<UnitSpec, Failure> {
    let role = if a.relay { Role::Relay } else { Role::Node };
    let data_dir = absolute(if a.relay { relay_dir } else { &g.data_dir })?;
    let binary = std::env::current_exe().context("cannot find the path of this iom binary")?;
    let run_as = a
        .run_as
        .clone()
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .filter(|u| !u.is_empty() && u != "root");
    if let Some(user) = &run_as
        && !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Failure::Usage(anyhow!("{user:?} is not a user name")));
    }
    Ok(UnitSpec {
        role,
        user_unit: a.user,
        binary,
        data_dir,
        run_args: a.run_args.clone(),
        run_as,
        docker_group: role == Role::Node && docker_group_exists(),
    })
}

/// Where the unit goes, and whether to call systemctl.
fn unit_dir(a: &ServiceArgs) -> Result<(PathBuf, bool), Failure> {
    if let Some(d) = &a.unit_dir {
        return Ok((d.clone(), false));
    }
    if a.user {
        let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            Some(x) => PathBuf::from(x),
            None => PathBuf::from(
                std::env::var_os("HOME")
                    .ok_or_else(|| Failure::Usage(anyhow!("HOME is not set")))?,
            )
            .join(".config"),
        };
        Ok((base.join("systemd/user"), true))
    } else {
        Ok((PathBuf::from("/etc/systemd/system"), true))
    }
}

/// Why systemctl cannot be used here, if it cannot.
fn systemd_missing() -> Option<String> {
    if !Path::new("/run/systemd/system").exists() {
        return Some(
            "systemd is not running on this machine (no /run/systemd/system): in a container \
             or under another init system, start `iom node run` by other means"
                .into(),
        );
    }
    if Command::new("systemctl").arg("--version").output().is_err() {
        return Some("systemctl is not installed".into());
    }
    None
}

fn systemctl(user: bool, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("systemctl");
    if user {
        cmd.arg("--user");
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(if err.is_empty() { text } else { err })
    }
}

fn install(g: &Global, relay_dir: &Path, a: &ServiceArgs) -> Result<(), Failure> {
    let spec = spec(g, relay_dir, a)?;
    prepare_data_dir(&spec)?;
    let (dir, call_systemctl) = unit_dir(a)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(spec.file_name());
    std::fs::write(&path, render(&spec))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let unit = spec.file_name();
    let mut enabled = false;
    if call_systemctl {
        if let Some(why) = systemd_missing() {
            return Err(Failure::Failed(anyhow!(
                "wrote {} but cannot enable it: {why}",
                path.display()
            )));
        }
        systemctl(a.user, &["daemon-reload"]).map_err(|e| anyhow!("daemon-reload: {e}"))?;
        systemctl(a.user, &["enable", "--now", unit])
            .map_err(|e| anyhow!("systemctl enable --now {unit}: {e}"))?;
        enabled = true;
    }
    if g.json {
        println!(
            "{}",
            json!({ "unit": path.display().to_string(), "enabled": enabled,
                    "docker_group": spec.docker_group && !a.user })
        );
    } else {
        println!("wrote {}", path.display());
        if enabled {
            let scope = if a.user { "--user " } else { "" };
            println!("enabled and started {unit}; see `systemctl {scope}status {unit}`");
            if a.user {
                println!(
                    "to keep it running while you are logged out: loginctl enable-linger $USER"
                );
            }
        }
    }
    Ok(())
}

/// The data dir must exist before the service starts (`ReadWritePaths=` of a missing path
/// fails the unit). A new one is made 0700; root installing a system unit for another user
/// hands it to that user, who then creates the keys on the first start.
fn prepare_data_dir(spec: &UnitSpec) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &spec.data_dir;
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    // A new directory belongs to the effective user: 0 means root.
    let made_by_root = std::fs::metadata(dir).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if !spec.user_unit
        && made_by_root
        && let Some(user) = &spec.run_as
    {
        let out = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(dir)
            .output()
            .context("cannot run chown")?;
        if !out.status.success() {
            return Err(anyhow!(
                "cannot give {} to {user}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
    }
    Ok(())
}

fn uninstall(g: &Global, relay_dir: &Path, a: &ServiceArgs) -> Result<(), Failure> {
    let spec = spec(g, relay_dir, a)?;
    let (dir, call_systemctl) = unit_dir(a)?;
    let path = dir.join(spec.file_name());
    let unit = spec.file_name();
    if call_systemctl && systemd_missing().is_none() {
        // Not installed or already stopped is fine.
        let _ = systemctl(a.user, &["disable", "--now", unit]);
    }
    let existed = match std::fs::remove_file(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(anyhow!("cannot remove {}: {e}", path.display()).into()),
    };
    if call_systemctl && systemd_missing().is_none() {
        let _ = systemctl(a.user, &["daemon-reload"]);
    }
    if g.json {
        println!(
            "{}",
            json!({ "unit": path.display().to_string(), "removed": existed })
        );
    } else if existed {
        println!("removed {} (the data dir is kept)", path.display());
    } else {
        println!("{} was not installed; nothing changed", path.display());
    }
    Ok(())
}

fn status(g: &Global, relay_dir: &Path, a: &ServiceArgs) -> Result<(), Failure> {
    let spec = spec(g, relay_dir, a)?;
    let (dir, call_systemctl) = unit_dir(a)?;
    let path = dir.join(spec.file_name());
    let unit = spec.file_name();
    let installed = path.exists();
    let (enabled, active, note) = if !call_systemctl {
        (
            None,
            None,
            Some("systemctl not asked (--unit-dir)".to_string()),
        )
    } else if let Some(why) = systemd_missing() {
        (None, None, Some(why))
    } else {
        let state = |verb: &str| match systemctl(a.user, &[verb, unit]) {
            Ok(s) | Err(s) => s,
        };
        (Some(state("is-enabled")), Some(state("is-active")), None)
    };
    if g.json {
        println!(
            "{}",
            json!({
                "unit": path.display().to_string(),
                "installed": installed,
                "enabled": enabled,
                "active": active,
                "note": note,
            })
        );
    } else {
        println!(
            "{unit}: {} ({})",
            if installed {
                "installed"
            } else {
                "not installed"
            },
            path.display()
        );
        match (enabled, active, note) {
            (Some(e), Some(act), _) => {
                println!("enabled: {e}");
                println!("active: {act}");
            }
            (_, _, Some(n)) => println!("enabled/active: unknown: {n}"),
            _ => {}
        }
    }
    Ok(())
}
