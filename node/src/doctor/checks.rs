//! Pure checks: facts in, findings out.

use super::{Finding, Severity};
use crate::store::human_bytes;

/// Below this much free space on the data dir's filesystem a node is in trouble (sled needs
/// room to compact, blobs arrive in chunks).
pub const DISK_ERROR_BYTES: u64 = 256 << 20;
/// Below this much free space a warning.
pub const DISK_WARN_BYTES: u64 = 2 << 30;
/// Certificates issued further than this in our future mean a skewed clock somewhere.
pub const CLOCK_SKEW_WARN_SECS: u64 = 5 * 60;

/// What this device knows about the agent role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleView {
    /// This device holds the role.
    Here,
    /// Another device holds it.
    Elsewhere,
    /// No device holds it yet (this one may get it).
    Nobody,
    /// The node is not running, so the role is not known.
    Unknown,
}

impl RoleView {
    /// How bad a problem of the agent's set-up (Docker, image, API key) is on this device.
    fn agent_problem(self) -> Severity {
        match self {
            RoleView::Here => Severity::Error,
            RoleView::Nobody | RoleView::Unknown => Severity::Warning,
            RoleView::Elsewhere => Severity::Info,
        }
    }

    fn why(self) -> &'static str {
        match self {
            RoleView::Here => "this device holds the agent role",
            RoleView::Elsewhere => {
                "another device holds the agent role; needed only if the role moves here"
            }
            RoleView::Nobody => "no device holds the agent role yet; needed if this one gets it",
            RoleView::Unknown => {
                "the node is not running, so whether this device is the agent is unknown"
            }
        }
    }
}

/// Docker reachable?
pub fn docker(reached: Result<String, String>, role: RoleView) -> Finding {
    match reached {
        Ok(version) => Finding::ok("docker", format!("Docker Engine {version} reachable")),
        Err(e) => Finding::new(
            "docker",
            role.agent_problem(),
            format!("Docker is not reachable: {e} ({})", role.why()),
            "start Docker (sudo systemctl start docker), point DOCKER_HOST at it, or give the \
             node's user the docker group; `iom sandbox check` tells more",
        ),
    }
}

/// The sandbox image present? `None` when Docker could not be asked.
pub fn sandbox_image(
    image: &str,
    present: Option<Result<bool, String>>,
    role: RoleView,
) -> Finding {
    match present {
        None => Finding::new(
            "sandbox_image",
            Severity::Info,
            format!("{image}: not checked (Docker is not reachable)"),
            "",
        ),
        Some(Ok(true)) => Finding::ok("sandbox_image", format!("{image} is present")),
        Some(Ok(false)) => Finding::new(
            "sandbox_image",
            role.agent_problem(),
            format!("the sandbox image {image} is missing ({})", role.why()),
            "run `iom sandbox build` (or set [sandbox] image to an image that exists)",
        ),
        Some(Err(e)) => Finding::new(
            "sandbox_image",
            role.agent_problem(),
            format!("cannot inspect the sandbox image {image}: {e}"),
            "check Docker with `iom sandbox check`",
        ),
    }
}

/// Is the sandbox's workspace disk quota enforced? `capability` is
/// [`crate::agent::sandbox::quota::capability`] for the node's user.
pub fn workspace_quota(
    mode: crate::agent::sandbox::quota::QuotaMode,
    capability: Result<(), String>,
    per_workspace_mb: u64,
    total_mb: u64,
    role: RoleView,
) -> Finding {
    use crate::agent::sandbox::quota::QuotaMode;
    const NAME: &str = "workspace_quota";
    let quiet = if role == RoleView::Here {
        Severity::Warning
    } else {
        Severity::Info
    };
    match (mode, capability) {
        (QuotaMode::Off, _) => Finding::new(
            NAME,
            quiet,
            "the workspace disk quota is NOT enforced ([sandbox] quota = \"off\"): a tool call \
             can fill the data dir's disk",
            "remove `quota = \"off\"` from [sandbox] (the node must run as root to mount the \
             workspace images)",
        ),
        (_, Ok(())) => Finding::ok(
            NAME,
            format!(
                "enforced: {per_workspace_mb} MiB per conversation workspace, {total_mb} MiB in \
                 total (loop-mounted ext4 images)"
            ),
        ),
        (QuotaMode::Required, Err(why)) => Finding::new(
            NAME,
            role.agent_problem(),
            format!(
                "the workspace disk quota cannot be enforced ({why}) and [sandbox] quota = \
                 \"required\", so tool calls fail ({})",
                role.why()
            ),
            "run the node as root with e2fsprogs installed and loop devices available, or set \
             [sandbox] quota = \"best-effort\"",
        ),
        (_, Err(why)) => Finding::new(
            NAME,
            quiet,
            format!(
                "the workspace disk quota is NOT enforced ({why}): a tool call can fill the data \
                 dir's disk"
            ),
            "run the node as root with e2fsprogs (mkfs.ext4) installed and loop devices \
             available; `iom sandbox check` tries a real mount",
        ),
    }
}

/// An API key for the model?
pub fn api_key(found: Result<String, String>, role: RoleView) -> Finding {
    match found {
        Ok(source) => Finding::ok("api_key", format!("API key found ({source})")),
        Err(e) if role == RoleView::Elsewhere => Finding::new(
            "api_key",
            Severity::Ok,
            format!("no API key here ({e}); not needed: another device is the agent"),
            "",
        ),
        Err(e) => Finding::new(
            "api_key",
            role.agent_problem(),
            format!("no usable API key: {e} ({})", role.why()),
            "set ANTHROPIC_API_KEY in the node's environment (for a service: an \
             Environment= or EnvironmentFile= line in a drop-in) or write the key to a 0600 \
             file named by agent.key_file",
        ),
    }
}

/// Free space of the data dir's filesystem, against the node's write reserve (`reserve`
/// bytes: below it, the node refuses new documents, changes and blobs).
pub fn disk(path: &str, free: u64, total: u64, reserve: u64) -> Finding {
    let pct = if total == 0 {
        0.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    let detail = format!(
        "{} free of {} ({pct:.1}%) on the filesystem of {path}",
        human_bytes(free),
        human_bytes(total)
    );
    let fix = "free space on that filesystem (or move the data dir: stop the node, move it, \
               start with --data-dir); blobs can be large";
    if free < reserve {
        return Finding::new(
            "disk",
            Severity::Error,
            format!(
                "{detail}: below the write reserve of {} (`[storage] reserve_mb`), so new \
                 documents, changes and blobs are refused",
                human_bytes(reserve)
            ),
            fix,
        );
    }
    if free < DISK_ERROR_BYTES || pct < 2.0 {
        Finding::new("disk", Severity::Error, detail, fix)
    } else if free < DISK_WARN_BYTES || pct < 10.0 {
        Finding::new("disk", Severity::Warning, detail, fix)
    } else {
        Finding::ok("disk", detail)
    }
}

/// One configured relay: `connected`, `reserved`.
pub fn relay(addr: &str, connected: bool, reserved: bool) -> Finding {
    if reserved {
        Finding::ok("relay", format!("{addr}: connected, reservation held"))
    } else if connected {
        Finding::new(
            "relay",
            Severity::Warning,
            format!("{addr}: connected but no reservation (yet)"),
            "wait a few seconds; if it stays so, the relay refuses reservations (its limits, \
             or this device's person is not in its --allow-person list): see its log",
        )
    } else {
        Finding::new(
            "relay",
            Severity::Error,
            format!("{addr}: not connected; devices outside this network cannot reach this one"),
            "check that `iom relay run` runs on the relay VM, that its TCP/UDP port is open in \
             the firewall, and that the address (with /p2p/RELAY_ID) is right",
        )
    }
}

/// No relay configured.
pub fn no_relay() -> Finding {
    Finding::new(
        "relay",
        Severity::Info,
        "no relay configured: devices behind NAT reach this one only on the same network",
        "for a home server, run `iom relay run` on a small VM and start the node with \
         --relay ADDR (or [network] relays)",
    )
}

/// Hole punching: counts since the node started and peers that are relayed now.
pub fn hole_punching(ok: u64, failed: u64, relayed_peers: usize) -> Finding {
    if ok > 0 {
        Finding::ok(
            "hole_punching",
            format!("{ok} hole punch(es) succeeded, {failed} failed since start"),
        )
    } else if failed > 0 {
        Finding::new(
            "hole_punching",
            Severity::Warning,
            format!(
                "{failed} hole punch(es) failed and none succeeded; {relayed_peers} peer(s) stay \
                 relayed (slower, limited by the relay)"
            ),
            "allow outgoing UDP (QUIC) on this network; symmetric NATs (some mobile and \
             corporate networks) cannot be punched",
        )
    } else if relayed_peers > 0 {
        Finding::new(
            "hole_punching",
            Severity::Info,
            format!("{relayed_peers} peer(s) relayed; no hole punch has finished yet"),
            "",
        )
    } else {
        Finding::ok(
            "hole_punching",
            "no relayed peers: no hole punch needed so far",
        )
    }
}

/// Clock skew: peers do not report their time in iom's protocol, so the check compares this
/// clock with the issue times of the certificates the mesh's devices signed.
pub fn clock(now: u64, newest_cert_issued_at: Option<u64>) -> Finding {
    const WHAT: &str = "peers do not report their clocks; checked: certificate issue times";
    match newest_cert_issued_at {
        Some(t) if t > now + CLOCK_SKEW_WARN_SECS => Finding::new(
            "clock",
            Severity::Warning,
            format!(
                "a certificate was issued {} s in this device's future: this clock is behind, \
                 or the signing device's is ahead ({WHAT})",
                t - now
            ),
            "enable time sync on both devices (timedatectl set-ntp true); schedules fire by \
             the agent's clock",
        ),
        _ => Finding::ok(
            "clock",
            format!("no certificate from this device's future ({WHAT})"),
        ),
    }
}

/// Certificates: iom's certificates do not expire (a device leaves by revocation), so the
/// check is that this device's own is valid.
pub fn certificates(self_trusted: bool, self_revoked: bool, revoked: usize) -> Finding {
    if self_revoked {
        Finding::new(
            "certificates",
            Severity::Error,
            "this device has been revoked; no peer talks to it",
            "join the mesh again as a new device (a fresh data dir and `iom join CODE`)",
        )
    } else if !self_trusted {
        Finding::new(
            "certificates",
            Severity::Error,
            "this device has no valid certificate for its person",
            "join a mesh with `iom join CODE` (an invite from an admin device)",
        )
    } else {
        Finding::ok(
            "certificates",
            format!(
                "this device's certificate is valid; certificates do not expire \
                 ({revoked} device(s) revoked)"
            ),
        )
    }
}

/// The node is not running (the CLI's own checks only).
pub fn node_down(data_dir: &str) -> Finding {
    Finding::new(
        "node",
        Severity::Warning,
        format!(
            "no node runs for {data_dir}: relay, hole punching, clock and certificate checks \
             need it"
        ),
        "start it with `iom node run` or as a service with `iom service install`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_problems_are_errors_only_on_the_agent() {
        let down = || Err("connection refused".to_string());
        assert_eq!(docker(down(), RoleView::Here).severity, Severity::Error);
        assert_eq!(docker(down(), RoleView::Nobody).severity, Severity::Warning);
        assert_eq!(docker(down(), RoleView::Elsewhere).severity, Severity::Info);
        assert_eq!(
            docker(Ok("27".into()), RoleView::Here).severity,
            Severity::Ok
        );
        use crate::agent::sandbox::quota::QuotaMode;
        let q = workspace_quota(QuotaMode::BestEffort, Ok(()), 1024, 5120, RoleView::Here);
        assert_eq!(q.severity, Severity::Ok);
        assert!(q.detail.contains("1024 MiB"), "{}", q.detail);
        let q = workspace_quota(
            QuotaMode::BestEffort,
            Err("not root".into()),
            1024,
            5120,
            RoleView::Here,
        );
        assert_eq!(q.severity, Severity::Warning);
        assert!(q.detail.contains("NOT enforced") && q.detail.contains("not root"));
        let q = workspace_quota(QuotaMode::Required, Err("x".into()), 1, 2, RoleView::Here);
        assert_eq!(q.severity, Severity::Error);
        assert!(q.fix.contains("best-effort"));
        let q = workspace_quota(QuotaMode::Off, Ok(()), 1, 2, RoleView::Elsewhere);
        assert_eq!(q.severity, Severity::Info);
        assert!(q.detail.contains("NOT enforced"));
        let missing = sandbox_image("iom-sandbox:nope", Some(Ok(false)), RoleView::Here);
        assert_eq!(missing.severity, Severity::Error);
        assert!(missing.fix.contains("iom sandbox build"));
        assert_eq!(
            sandbox_image("x", None, RoleView::Here).severity,
            Severity::Info,
            "not checked when Docker is down (the Docker finding says why)"
        );
        assert_eq!(
            api_key(Err("missing".into()), RoleView::Here).severity,
            Severity::Error
        );
        assert_eq!(
            api_key(Err("missing".into()), RoleView::Elsewhere).severity,
            Severity::Ok
        );
    }

    #[test]
    fn disk_thresholds() {
        let gib = 1u64 << 30;
        assert_eq!(disk("/d", 100 * gib, 200 * gib, 0).severity, Severity::Ok);
        assert_eq!(disk("/d", gib, 20 * gib, 0).severity, Severity::Warning);
        assert_eq!(
            disk("/d", 5 * gib, 100 * gib, 0).severity,
            Severity::Warning
        );
        assert_eq!(
            disk("/d", 100 << 20, 200 * gib, 0).severity,
            Severity::Error
        );
        assert_eq!(disk("/d", 1 << 20, 64 << 20, 0).severity, Severity::Error);
        assert_eq!(disk("/d", 0, 0, 0).severity, Severity::Error);
        let below = disk("/d", 100 * gib, 200 * gib, 101 * gib);
        assert_eq!(below.severity, Severity::Error);
        assert!(below.detail.contains("write reserve"), "{}", below.detail);
        assert!(
            disk("/d", 1 << 20, 64 << 20, 0)
                .detail
                .contains("1.0 MiB free of 64.0 MiB")
        );
    }

    #[test]
    fn relays_holes_clock_and_certificates() {
        assert_eq!(relay("r", true, true).severity, Severity::Ok);
        assert_eq!(relay("r", true, false).severity, Severity::Warning);
        assert_eq!(relay("r", false, false).severity, Severity::Error);
        assert_eq!(hole_punching(1, 3, 0).severity, Severity::Ok);
        assert_eq!(hole_punching(0, 3, 1).severity, Severity::Warning);
        assert_eq!(hole_punching(0, 0, 1).severity, Severity::Info);
        assert_eq!(hole_punching(0, 0, 0).severity, Severity::Ok);
        assert_eq!(clock(1_000, Some(1_000 + 301)).severity, Severity::Warning);
        assert_eq!(clock(1_000, Some(1_200)).severity, Severity::Ok);
        assert_eq!(clock(1_000, None).severity, Severity::Ok);
        assert_eq!(certificates(true, false, 2).severity, Severity::Ok);
        assert_eq!(certificates(false, false, 0).severity, Severity::Error);
        assert_eq!(certificates(false, true, 1).severity, Severity::Error);
        assert_eq!(
            super::super::worst(&[relay("r", true, true), relay("s", false, false)]),
            Severity::Error
        );
        assert_eq!(super::super::worst(&[]), Severity::Ok);
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
