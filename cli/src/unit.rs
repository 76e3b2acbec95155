//! The systemd unit that `iom service install` writes: pure text generation from a
//! [`UnitSpec`], so every line is unit-tested and checked with `systemd-analyze verify`.

use std::path::{Path, PathBuf};

/// What runs as the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `iom node run`.
    Node,
    /// `iom relay run`.
    Relay,
}

/// Everything the unit depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    /// Node or relay.
    pub role: Role,
    /// A user unit (`systemctl --user`) or a system unit.
    pub user_unit: bool,
    /// Absolute path of the `iom` binary.
    pub binary: PathBuf,
    /// Absolute data dir: the only writable path.
    pub data_dir: PathBuf,
    /// Extra arguments after `node run` / `relay run`.
    pub run_args: Vec<String>,
    /// System units: the user the service runs as (`None`: root).
    pub run_as: Option<String>,
    /// Add `SupplementaryGroups=docker` (system units of a node that may hold the agent role,
    /// on a machine that has the group).
    pub docker_group: bool,
}

impl UnitSpec {
    /// The unit's file name.
    pub fn file_name(&self) -> &'static str {
        match self.role {
            Role::Node => "iom.service",
            Role::Relay => "iom-relay.service",
        }
    }
}

/// Paths under which a home directory lives: `ProtectHome=yes` would hide them.
fn under_home(p: &Path) -> bool {
    ["/home", "/root", "/run/user"]
        .iter()
        .any(|h| p.starts_with(h))
}

/// Quotes one word for `ExecStart=` (and other command lines): specifiers (`%`) and `$` are
/// escaped, and a word with spaces, quotes or backslashes is put in double quotes.
pub fn quote(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty()
        && !escaped
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        return escaped;
    }
    let inner = escaped.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{inner}\"")
}

/// A path for a path-list setting (`ReadWritePaths=`): `%` escaped, spaces quoted.
fn quote_path(p: &Path) -> String {
    let s = p.display().to_string().replace('%', "%%");
    if s.chars().any(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s
    }
}

/// The unit file's text.
pub fn render(spec: &UnitSpec) -> String {
    let (what, sub) = match spec.role {
        Role::Node => ("iom node", "node"),
        Role::Relay => ("iom relay", "relay"),
    };
    let mut exec = vec![
        quote(&spec.binary.display().to_string()),
        "--data-dir".to_string(),
        quote(&spec.data_dir.display().to_string()),
        sub.to_string(),
        "run".to_string(),
    ];
    exec.extend(spec.run_args.iter().map(|a| quote(a)));
    let docker = spec.role == Role::Node && spec.docker_group && !spec.user_unit;
    let mut after = vec!["network-online.target"];
    if docker {
        after.push("docker.service");
    }
    let home_needed = under_home(&spec.data_dir) || under_home(&spec.binary);
    let mut u = String::new();
    u.push_str("# Written by `iom service install`; `iom service uninstall` removes it.\n");
    u.push_str("[Unit]\n");
    u.push_str(&format!(
        "Description={what} ({})\n",
        spec.data_dir.display().to_string().replace('%', "%%")
    ));
    u.push_str("Documentation=man:iom(1)\n");
    u.push_str(&format!("After={}\n", after.join(" ")));
    u.push_str("Wants=network-online.target\n\n");
    u.push_str("[Service]\nType=simple\n");
    u.push_str(&format!("ExecStart={}\n", exec.join(" ")));
    if !spec.user_unit
        && let Some(user) = &spec.run_as
    {
        u.push_str(&format!("User={user}\n"));
    }
    u.push_str("Restart=on-failure\nRestartSec=5s\n");
    // The node flushes and removes its containers on SIGTERM within its own 5 + 10 s.
    u.push_str("KillSignal=SIGTERM\nTimeoutStopSec=30s\n");
    u.push_str("UMask=0077\n");
    if spec.role == Role::Relay {
        // One file descriptor per connection.
        u.push_str("LimitNOFILE=65536\n");
    }
    u.push_str("Environment=IOM_LOG=warn,iom_node=info\n");
    u.push_str("\n# Hardening: the data dir is the only writable path.\n");
    u.push_str("NoNewPrivileges=yes\n");
    u.push_str("ProtectSystem=strict\n");
    u.push_str(if home_needed {
        "ProtectHome=read-only\n"
    } else {
        "ProtectHome=yes\n"
    });
    if spec.data_dir.starts_with("/tmp") || spec.data_dir.starts_with("/var/tmp") {
        // A private /tmp would hide a data dir that lives in the shared one.
        u.push_str("# No PrivateTmp: the data dir is under /tmp or /var/tmp.\n");
    } else {
        u.push_str("PrivateTmp=yes\n");
    }
    u.push_str(&format!("ReadWritePaths={}\n", quote_path(&spec.data_dir)));
    if !spec.user_unit {
        // These need privileges a user manager does not have.
        u.push_str("PrivateDevices=yes\n");
        u.push_str("ProtectKernelTunables=yes\nProtectKernelModules=yes\n");
        u.push_str("ProtectControlGroups=yes\nProtectClock=yes\n");
        u.push_str("CapabilityBoundingSet=\n");
    }
    u.push_str("RestrictSUIDSGID=yes\nLockPersonality=yes\nRestrictRealtime=yes\n");
    u.push_str("RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n");
    u.push_str("SystemCallArchitectures=native\n");
    if docker {
        u.push_str("# The agent runs tool calls in Docker containers.\n");
        u.push_str("SupplementaryGroups=docker\n");
    }
    u.push_str("\n[Install]\n");
    u.push_str(if spec.user_unit {
        "WantedBy=default.target\n"
    } else {
        "WantedBy=multi-user.target\n"
    });
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(role: Role, user_unit: bool) -> UnitSpec {
        UnitSpec {
            role,
            user_unit,
            binary: "/usr/local/bin/iom".into(),
            data_dir: "/var/lib/iom".into(),
            run_args: vec!["--http".into(), "127.0.0.1:8080".into()],
            run_as: Some("iom".into()),
            docker_group: true,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn a_system_node_unit_is_hardened_and_may_use_docker() {
        let text = render(&spec(Role::Node, false));
        let l = lines(&text);
        for want in [
            "ExecStart=/usr/local/bin/iom --data-dir /var/lib/iom node run --http 127.0.0.1:8080",
            "User=iom",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "ReadWritePaths=/var/lib/iom",
            "SupplementaryGroups=docker",
            "After=network-online.target docker.service",
            "WantedBy=multi-user.target",
        ] {
            assert!(l.contains(&want), "{want:?} missing in\n{text}");
        }
        assert_eq!(
            l.iter()
                .filter(|x| x.starts_with("ReadWritePaths="))
                .count(),
            1,
            "the data dir is the only writable path"
        );
    }

    #[test]
    fn the_relay_never_gets_the_docker_group() {
        let text = render(&spec(Role::Relay, false));
        assert!(text.contains("--data-dir /var/lib/iom relay run"));
        assert!(!text.contains("SupplementaryGroups"), "{text}");
        assert!(!text.contains("docker.service"));
        assert!(text.contains("LimitNOFILE=65536\n"));
        assert_eq!(spec(Role::Relay, false).file_name(), "iom-relay.service");
    }

    #[test]
    fn a_user_unit_has_no_user_line_nor_privileged_settings() {
        let mut s = spec(Role::Node, true);
        s.data_dir = "/home/ann/.local/share/iom".into();
        let text = render(&s);
        assert!(!text.contains("User="), "{text}");
        assert!(
            !text.contains("SupplementaryGroups"),
            "a user manager cannot add groups"
        );
        assert!(!text.contains("CapabilityBoundingSet"));
        assert!(
            text.contains("ProtectHome=read-only\n"),
            "the data dir is in the home"
        );
        assert!(text.contains("ReadWritePaths=/home/ann/.local/share/iom\n"));
        assert!(text.contains("WantedBy=default.target\n"));
    }

    #[test]
    fn odd_paths_and_arguments_are_quoted() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("100%"), "100%%");
        assert_eq!(quote("$HOME"), "$$HOME");
        assert_eq!(quote("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(quote(""), "\"\"");
        let mut s = spec(Role::Node, false);
        s.data_dir = "/srv/my iom".into();
        let text = render(&s);
        assert!(
            text.contains("--data-dir \"/srv/my iom\" node run"),
            "{text}"
        );
        assert!(text.contains("ReadWritePaths=\"/srv/my iom\"\n"));
    }

    #[test]
    fn a_data_dir_in_tmp_is_not_hidden_by_a_private_tmp() {
        let mut s = spec(Role::Node, false);
        s.data_dir = "/tmp/iom-test".into();
        let text = render(&s);
        assert!(!text.contains("PrivateTmp=yes"), "{text}");
        assert!(text.contains("ReadWritePaths=/tmp/iom-test\n"));
    }

    #[test]
    fn a_binary_in_a_home_keeps_the_home_readable() {
        let mut s = spec(Role::Node, false);
        s.binary = "/root/.cargo/bin/iom".into();
        assert!(render(&s).contains("ProtectHome=read-only\n"));
    }
}
