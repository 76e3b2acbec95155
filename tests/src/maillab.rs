//! A real mail system for the email channel's tests: Dovecot (IMAP with STARTTLS and IMAPS,
//! LMTP delivery, SASL for Postfix) and Postfix (submission with STARTTLS, SMTPS, and a plain
//! port the test injects mail on), from Debian's packages (`scripts/install-deps.sh`), each
//! with its own config, queue and mail dirs in a temporary directory, on free loopback ports,
//! with a fresh self-signed certificate (openssl). Nothing systemd-managed is used.
//!
//! Both servers need root (they drop privileges to their own users). Mail for `example.org`
//! is delivered to `DIR/mail/USER/Maildir`, which [`MailLab::mailbox`] reads.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::harness::free_port;

/// The mail domain.
pub const DOMAIN: &str = "example.org";

/// Why the lab cannot run here, if it cannot: not root, or a server is not installed.
pub fn unavailable() -> Option<String> {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return Some("Dovecot and Postfix need root to start".into());
    }
    for bin in ["dovecot", "postfix", "openssl"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).exists()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(bin).exists();
        if !found {
            return Some(format!("{bin} is not installed (scripts/install-deps.sh)"));
        }
    }
    None
}

/// Panics with the reason unless the lab can start (Dovecot, Postfix, openssl and root). There
/// is no skipping inside a test: `IOM_SKIP_MAIL=1 scripts/test.sh` leaves the email tests out,
/// and nextest reports them as skipped (refused under `CI=true`).
pub fn require() {
    if let Some(why) = unavailable() {
        panic!(
            "{why}. The email tests need Dovecot and Postfix (scripts/install-deps.sh) and root; \
             `IOM_SKIP_MAIL=1 scripts/test.sh` leaves them out."
        );
    }
}

const LAB_PREFIX: &str = "iom-maillab-";

/// Stops the servers of labs whose test process died without cleaning up (a test killed by
/// a timeout), and removes their directories.
fn reap_stale_labs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with(LAB_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(dir.join("owner.pid")).unwrap_or_default();
        if owner.is_empty() || Path::new(&format!("/proc/{}", owner.trim())).exists() {
            continue;
        }
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(dir.join("postfix"))
            .arg("stop")
            .output();
        if let Ok(pid) = std::fs::read_to_string(dir.join("run/master.pid"))
            && let Ok(pid) = pid.trim().parse::<libc::pid_t>()
        {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on the Dovecot master of a dead test's lab; no memory touched.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Ports of a running lab.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// IMAP with STARTTLS.
    pub imap: u16,
    /// IMAP over TLS.
    pub imaps: u16,
    /// SMTP submission with STARTTLS (AUTH required).
    pub submission: u16,
    /// SMTP over TLS (AUTH required).
    pub smtps: u16,
    /// Plain SMTP for injecting test mail (loopback, no AUTH).
    pub inject: u16,
    lmtp: u16,
    sasl: u16,
}

/// A running Dovecot and Postfix.
pub struct MailLab {
    /// The lab's directory.
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    /// Ports.
    pub ports: Ports,
    dovecot: Option<Child>,
    postfix: Option<Child>,
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A fresh CA (`ca.pem`) and a server certificate for `localhost` and 127.0.0.1 signed by it
/// (`cert.pem`, `key.pem`): rustls refuses a self-signed CA certificate as a server's.
fn make_certificates(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(
        Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-days", "2", "-subj", "/CN=iom test mail CA"])
            .arg("-keyout")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("ca.pem")),
        "openssl req (CA)",
    )?;
    run(
        Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("server.csr")),
        "openssl req (server)",
    )?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    run(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(dir.join("server.csr"))
            .arg("-CA")
            .arg(dir.join("ca.pem"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(dir.join("server.ext"))
            .arg("-out")
            .arg(dir.join("cert.pem")),
        "openssl x509 (sign)",
    )
}

impl MailLab {
    /// Starts Dovecot and Postfix with the users `(name, password)` of [`DOMAIN`] (names
    /// without the domain).
    pub fn start(users: &[(&str, &str)]) -> Result<MailLab> {
        reap_stale_labs();
        let tmp = tempfile::Builder::new().prefix(LAB_PREFIX).tempdir()?;
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let ports = Ports {
            imap: free_port()?,
            imaps: free_port()?,
            submission: free_port()?,
            smtps: free_port()?,
            inject: free_port()?,
            lmtp: free_port()?,
            sasl: free_port()?,
        };
        let d = dir.display().to_string();
        make_certificates(&dir)?;
        let users_file: String = users
            .iter()
            .map(|(u, p)| format!("{u}@{DOMAIN}:{{PLAIN}}{p}\n"))
            .collect();
        std::fs::write(dir.join("users"), users_file)?;
        for sub in ["run", "state", "mail", "pq", "pdata", "postfix"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        run(
            Command::new("chown")
                .arg("dovecot:dovecot")
                .arg(dir.join("mail")),
            "chown mail",
        )?;
        run(
            Command::new("chown").arg("postfix").arg(dir.join("pdata")),
            "chown pdata",
        )?;
        let p = ports;
        std::fs::write(
            dir.join("dovecot.conf"),
            format!(
                r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
auth_mechanisms = plain login
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={d}/mail/%u allow_all_users=yes
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {lmtp}
  }}
}}
service auth {{
  inet_listener sasl {{
    port = {sasl}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{DOMAIN}
}}
"#,
                imap = p.imap,
                imaps = p.imaps,
                lmtp = p.lmtp,
                sasl = p.sasl,
            ),
        )?;
        std::fs::write(
            dir.join("postfix/main.cf"),
            format!(
                r#"compatibility_level = 3.6
queue_directory = {d}/pq
data_directory = {d}/pdata
mail_owner = postfix
setgid_group = postdrop
myhostname = localhost
mydomain = {DOMAIN}
myorigin = {DOMAIN}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = static:ok
virtual_transport = lmtp:inet:127.0.0.1:{lmtp}
smtpd_tls_cert_file = {d}/cert.pem
smtpd_tls_key_file = {d}/key.pem
smtpd_tls_security_level = may
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{sasl}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file = /dev/stdout
smtputf8_enable = no
biff = no
message_size_limit = 52428800
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
transport_retry_time = 1s
local_header_rewrite_clients =
"#,
                lmtp = p.lmtp,
                sasl = p.sasl,
            ),
        )?;
        let auth = "-o smtpd_sasl_auth_enable=yes -o smtpd_relay_restrictions=permit_sasl_authenticated,reject";
        let mut master = format!(
            "127.0.0.1:{sub} inet n - n - - smtpd -o smtpd_tls_security_level=encrypt {auth}\n\
             127.0.0.1:{smtps} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes {auth}\n\
             127.0.0.1:{inject} inet n - n - - smtpd\n",
            sub = p.submission,
            smtps = p.smtps,
            inject = p.inject,
        );
        for line in [
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ] {
            master.push_str(line);
            master.push('\n');
        }
        std::fs::write(dir.join("postfix/master.cf"), master)?;
        let mut lab = MailLab {
            dir,
            _tmp: tmp,
            ports,
            dovecot: None,
            postfix: None,
        };
        lab.start_dovecot()?;
        run(
            Command::new("postfix")
                .arg("-c")
                .arg(lab.dir.join("postfix"))
                .arg("check"),
            "postfix check",
        )?;
        let log = std::fs::File::create(lab.dir.join("postfix.log"))?;
        lab.postfix = Some(
            Command::new("postfix")
                .arg("-c")
                .arg(lab.dir.join("postfix"))
                .arg("start-fg")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting postfix")?,
        );
        for (port, what) in [
            (p.submission, "postfix submission"),
            (p.smtps, "postfix smtps"),
            (p.inject, "postfix"),
        ] {
            if let Err(e) = wait_port(port, what) {
                bail!("{e}; logs:\n{}", lab.logs());
            }
        }
        Ok(lab)
    }

    /// The test CA's certificate (it signed the servers' certificate).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Starts Dovecot (in the foreground, as a child) and waits for its ports.
    pub fn start_dovecot(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dovecot.out"))?;
        let child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(self.dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dovecot")?;
        self.dovecot = Some(child);
        for (port, what) in [
            (self.ports.imap, "dovecot imap"),
            (self.ports.imaps, "dovecot imaps"),
            (self.ports.lmtp, "dovecot lmtp"),
            (self.ports.sasl, "dovecot auth"),
        ] {
            if let Err(e) = wait_port(port, what) {
                bail!("{e}; dovecot log:\n{}", self.logs());
            }
        }
        Ok(())
    }

    /// Stops Dovecot (SIGTERM, then waits).
    pub fn stop_dovecot(&mut self) -> Result<()> {
        if let Some(mut c) = self.dovecot.take() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on the pid of a child we spawned.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Both servers' logs.
    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!(
            "--- dovecot ---\n{}{}\n--- postfix ---\n{}",
            read("dovecot.out"),
            read("dovecot.log"),
            read("postfix.log")
        )
    }

    /// Injects `raw` (a whole mail, CRLF or LF lines) by plain SMTP, envelope `from` → `to`.
    pub fn send(&self, from: &str, to: &str, raw: &[u8]) -> Result<()> {
        let stream = TcpStream::connect(("127.0.0.1", self.ports.inject))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let mut expect = |code: &str| -> Result<()> {
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    bail!("SMTP connection closed, expected {code}");
                }
                if !line.starts_with(code) {
                    bail!("SMTP: expected {code}, got {line:?}");
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(());
                }
            }
        };
        expect("220")?;
        for (cmd, code) in [
            ("EHLO test.local".to_string(), "250"),
            (format!("MAIL FROM:<{from}>"), "250"),
            (format!("RCPT TO:<{to}>"), "250"),
            ("DATA".to_string(), "354"),
        ] {
            w.write_all(format!("{cmd}\r\n").as_bytes())?;
            expect(code)?;
        }
        let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
        let mut body = String::with_capacity(text.len() + 1024);
        for line in text.split('\n') {
            if line.starts_with('.') {
                body.push('.');
            }
            body.push_str(line);
            body.push_str("\r\n");
        }
        body.push_str(".\r\n");
        w.write_all(body.as_bytes())?;
        expect("250")?;
        w.write_all(b"QUIT\r\n")?;
        Ok(())
    }

    /// The mails delivered to `user` (without the domain), oldest first.
    pub fn mailbox(&self, user: &str) -> Vec<Vec<u8>> {
        let base = self
            .dir
            .join("mail")
            .join(format!("{user}@{DOMAIN}"))
            .join("Maildir");
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(base.join(d)).ok())
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, p)| std::fs::read(p).ok())
            .collect()
    }
}

impl Drop for MailLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.postfix.take() {
            let _ = Command::new("postfix")
                .arg("-c")
                .arg(self.dir.join("postfix"))
                .arg("stop")
                .output();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.stop_dovecot();
    }
}
