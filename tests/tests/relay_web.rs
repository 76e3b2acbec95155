//! Reach from anywhere (issue 12): a real `iom relay run --domain relay.test` forwards TLS
//! connections by server name to a real node's HTTPS listener over `/iom/tls-forward/1`.
//! Real clients (`curl`, `openssl s_client`) fetch the page and the API through the relay and
//! check the certificate is the node's own; raw TCP clients send no server name, an unknown
//! name, garbage and nothing at all, and get a TLS alert or a closed connection; a device of a
//! person the relay does not serve gets no name. And a certificate for the device's name
//! from Debian's `pebble` (the Let's Encrypt test CA), requested by a real ACME client
//! (`lego`) with HTTP-01 answered through the relay's port-80 listener.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use iom_tests::harness::{Node, free_port, iom_bin, scenario, wait_until};
use serde_json::Value;

const DOMAIN: &str = "relay.test";

/// A real `iom relay run` with the TLS passthrough on.
struct Relay {
    child: Child,
    addr: String,
    tls_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(allow: &[&str]) -> Result<Relay> {
        Relay::start_with(allow, &[])
    }

    fn start_with(allow: &[&str], extra: &[String]) -> Result<Relay> {
        let dir = tempfile::tempdir()?;
        let key = iom_node::relay::load_or_create_relay_key(dir.path())
            .map_err(|e| anyhow!("relay key: {e}"))?;
        let port = free_port()?;
        let tls_port = free_port()?;
        let log = dir.path().join("relay.log");
        let mut cmd = Command::new(iom_bin());
        cmd.arg("--data-dir")
            .arg(dir.path())
            .args(["relay", "run", "--no-rate-limits", "--listen"])
            .arg(format!("/ip4/127.0.0.1/tcp/{port}"))
            .args(["--domain", DOMAIN, "--tls-listen"])
            .arg(format!("127.0.0.1:{tls_port}"))
            .env("IOM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for p in allow {
            cmd.args(["--allow-person", p]);
        }
        cmd.args(extra);
        let child = cmd.spawn().context("spawning iom relay run")?;
        let relay = Relay {
            child,
            addr: format!(
                "/ip4/127.0.0.1/tcp/{port}/p2p/{}",
                key.public().to_peer_id()
            ),
            tls_port,
            log,
            _dir: dir,
        };
        wait_until("the relay's TLS port", Duration::from_secs(20), || {
            Ok(TcpStream::connect(("127.0.0.1", tls_port)).is_ok())
        })
        .with_context(|| relay.log_text())?;
        Ok(relay)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node serving HTTPS on loopback; started once so its person exists, then stopped.
fn https_node(name: &str) -> Result<(Node, u16, String)> {
    let mut n = Node::new(name)?;
    let port = free_port()?;
    n.args
        .extend(["--https".to_string(), format!("127.0.0.1:{port}")]);
    n.start()?;
    let person = n.status()?["person"]
        .as_str()
        .context("no person")?
        .to_string();
    n.stop()?;
    Ok((n, port, person))
}

/// The host name the relay gives `node` (its status, once registered).
fn relay_url(node: &Node) -> Result<Option<String>> {
    Ok(node.status()?["web"]["relay_url"]
        .as_str()
        .map(str::to_string))
}

/// `openssl` with `args`; its stdout, or the error with its stderr.
fn openssl(args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.unwrap_or_default())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// `sha256//BASE64` of the public key in the PEM certificate `pem`, for curl's
/// `--pinnedpubkey`.
fn pinned_key(pem: &Path) -> Result<String> {
    let path = pem.to_str().context("path")?;
    let public = openssl(&["x509", "-in", path, "-pubkey", "-noout"], None)?;
    let der = openssl(&["pkey", "-pubin", "-outform", "DER"], Some(&public))?;
    let digest = openssl(&["dgst", "-sha256", "-binary"], Some(&der))?;
    let b64 = openssl(&["base64", "-A"], Some(&digest))?;
    Ok(format!("sha256//{}", String::from_utf8(b64)?.trim()))
}

/// `curl` of `url` with `host` resolved to the relay's TLS port, the node's key pinned;
/// `(HTTP status, body)`.
fn curl(host: &str, port: u16, url: &str, pin: &str, headers: &[&str]) -> Result<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-k", "--max-time", "10", "--pinnedpubkey", pin])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output()?;
    if !out.status.success() {
        bail!(
            "curl {url}: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// The SHA-256 fingerprint (`AB:CD:…`) of the certificate `openssl s_client` receives when it
/// connects to the relay with server name `host`.
fn fingerprint_through_relay(host: &str, port: u16) -> Result<String> {
    let connect = format!("127.0.0.1:{port}");
    let shown = openssl(
        &[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            host,
            "-showcerts",
        ],
        Some(b""),
    )?;
    let fp = openssl(&["x509", "-noout", "-fingerprint", "-sha256"], Some(&shown))?;
    let text = String::from_utf8(fp)?;
    text.trim()
        .split_once('=')
        .map(|(_, fp)| fp.to_string())
        .ok_or_else(|| anyhow!("openssl printed {text:?}"))
}

/// A ClientHello record with `server_name` (none if `None`).
fn client_hello(server_name: Option<&str>) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    let mut ext = Vec::new();
    if let Some(name) = server_name {
        let n = name.len() as u16;
        ext.extend_from_slice(&[0, 0]);
        ext.extend_from_slice(&(n + 5).to_be_bytes());
        ext.extend_from_slice(&(n + 3).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&n.to_be_bytes());
        ext.extend_from_slice(name.as_bytes());
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut msg = vec![1, 0];
    msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
    msg.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    record.extend_from_slice(&msg);
    record
}

/// Sends `bytes` to the relay's TLS port and reads until it closes (at most `wait`);
/// returns what came back and how long it took.
fn raw(port: u16, bytes: &[u8], wait: Duration) -> Result<(Vec<u8>, Duration)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(wait))?;
    let start = Instant::now();
    s.write_all(bytes)?;
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => bail!("the relay kept the connection open: {e} (got {got:?})"),
    }
    Ok((got, start.elapsed()))
}

const UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
const DECODE_ERROR: [u8; 7] = [21, 3, 3, 0, 2, 2, 50];

#[test]
fn the_relay_forwards_tls_by_name_to_the_device_and_refuses_everything_else() {
    scenario(|| {
        let (mut home, _https_port, person) = https_node("home")?;
        let (mut stranger, _, _) = https_node("stranger")?;
        let mut relay = Relay::start(&[&person])?;
        for n in [&mut home, &mut stranger] {
            n.args.extend(["--relay".to_string(), relay.addr.clone()]);
            n.start()?;
        }

        // The home node gets its name and shows it.
        wait_until("home's relay name", Duration::from_secs(30), || {
            Ok(relay_url(&home)?.is_some())
        })
        .with_context(|| format!("{}\n{}", home.log_text(), relay.log_text()))?;
        let url = relay_url(&home)?.context("no relay url")?;
        let device: iom_protocol::keys::DeviceId = home.device_id()?.parse()?;
        let label = iom_protocol::sni::web_name(&device);
        let host = format!("{label}.{DOMAIN}");
        let port = relay.tls_port;
        assert_eq!(url, format!("https://{host}:{port}/"));

        // `iom invite --web` gives the relay's URL, and the LAN one beside it.
        let invite = home.json(&["invite", "--web"])?;
        let link = invite["url"].as_str().context("no url")?;
        ensure!(link.starts_with(&format!("{url}pair#")), "{invite}");
        ensure!(
            invite["lan_url"]
                .as_str()
                .is_some_and(|l| l.starts_with("https://127.0.0.1:")),
            "{invite}"
        );

        // A real client fetches the page through the relay, the node's key pinned.
        let pem = home.dir.join("tls/self-signed.pem");
        let pin = pinned_key(&pem)?;
        let (status, page) = curl(&host, port, &url, &pin, &[])?;
        assert_eq!(status, 200, "{page}");
        ensure!(page.contains("<html"), "not the page: {page}");
        // The API too, with a token; it is the home node that answers.
        let t = home.json(&["token", "create", "--name", "phone"])?;
        let token = t["token"].as_str().context("no token")?;
        let auth = format!("Authorization: Bearer {token}");
        let (status, body) = curl(&host, port, &format!("{url}v1/status"), &pin, &[&auth])?;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["device"].as_str(), Some(device.to_string().as_str()));
        // openssl sees the node's own certificate: TLS ends on the device.
        let shown = fingerprint_through_relay(&host, port)?;
        let web = home.status()?["web"].clone();
        assert_eq!(web["fingerprint"].as_str(), Some(shown.as_str()), "{web}");
        // A pinned key that is not the node's is refused by curl.
        let wrong = format!("sha256//{}", "A".repeat(43) + "=");
        ensure!(
            curl(&host, port, &url, &wrong, &[]).is_err(),
            "curl accepted a key that is not the node's"
        );

        // Bad input: each gets an alert or a closed connection, and nothing else happens.
        let short = Duration::from_secs(3);
        let (got, _) = raw(port, &client_hello(None), short)?;
        assert_eq!(got, UNRECOGNIZED_NAME, "no server name");
        let (got, _) = raw(
            port,
            &client_hello(Some(&format!("nobody.{DOMAIN}"))),
            short,
        )?;
        assert_eq!(got, UNRECOGNIZED_NAME, "an unknown name");
        let (got, _) = raw(port, &client_hello(Some("example.com")), short)?;
        assert_eq!(got, UNRECOGNIZED_NAME, "a name outside the domain");
        let (got, _) = raw(port, &client_hello(Some(&format!("x.{host}"))), short)?;
        assert_eq!(got, UNRECOGNIZED_NAME, "a name below a device's");
        let (got, _) = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", short)?;
        assert_eq!(got, DECODE_ERROR, "plain HTTP");
        let mut junk = vec![22, 3, 1, 0, 40, 1, 0, 0, 36];
        junk.extend_from_slice(&[0xff; 36]);
        let (got, _) = raw(port, &junk, short)?;
        assert_eq!(got, DECODE_ERROR, "a ClientHello of garbage");
        // A client that says nothing is closed after the ClientHello timeout (5 s).
        let (got, took) = raw(port, &[], Duration::from_secs(15))?;
        ensure!(
            got.is_empty() && took >= Duration::from_secs(4) && took < Duration::from_secs(12),
            "silent client: {got:?} after {took:?}"
        );

        // The stranger's device (a person the relay does not serve) has no name.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(relay_url(&stranger)?, None);
        let stranger_id: iom_protocol::keys::DeviceId = stranger.device_id()?.parse()?;
        let stranger_host = format!("{}.{DOMAIN}", iom_protocol::sni::web_name(&stranger_id));
        let (got, _) = raw(port, &client_hello(Some(&stranger_host)), short)?;
        assert_eq!(got, UNRECOGNIZED_NAME, "the stranger's name");
        ensure!(
            curl(
                &stranger_host,
                port,
                &format!("https://{stranger_host}:{port}/"),
                &pin,
                &[]
            )
            .is_err(),
            "the stranger was reachable"
        );
        let log = relay.log_text();
        ensure!(log.contains("web name refused"), "{log}");
        ensure!(log.contains("TLS passthrough refused"), "{log}");

        // After all that the relay still forwards.
        let (status, _) = curl(&host, port, &url, &pin, &[])?;
        assert_eq!(status, 200);
        ensure!(relay.is_running(), "the relay died: {}", relay.log_text());
        ensure!(!log.contains("panicked"), "{log}");
        home.assert_no_panic()?;
        stranger.assert_no_panic()
    });
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .spawn()
        .with_context(|| format!("spawning {name}"))?;
    Ok(Proc(child))
}

#[test]
fn a_certificate_from_pebble_through_the_relay_then_verified_tls_through_it() {
    scenario(|| {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let (mut home, _https_port, person) = https_node("acme-home")?;
        let http_port = free_port()?;
        let mut relay = Relay::start_with(
            &[&person],
            &[
                "--http-listen".to_string(),
                format!("127.0.0.1:{http_port}"),
            ],
        )?;
        home.args
            .extend(["--relay".to_string(), relay.addr.clone()]);
        home.start()?;
        wait_until("home's relay name", Duration::from_secs(30), || {
            Ok(relay_url(&home)?.is_some())
        })
        .with_context(|| format!("{}\n{}", home.log_text(), relay.log_text()))?;
        let device: iom_protocol::keys::DeviceId = home.device_id()?.parse()?;
        let host = format!("{}.{DOMAIN}", iom_protocol::sni::web_name(&device));

        // Plain HTTP on the relay: a challenge the device does not have is a 404, other
        // paths and other names too.
        let get = |h: &str, path: &str| -> Result<u16> {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "10",
                ])
                .arg("--resolve")
                .arg(format!("{h}:{http_port}:127.0.0.1"))
                .arg(format!("http://{h}:{http_port}{path}"))
                .output()?;
            Ok(String::from_utf8(out.stdout)?.trim().parse()?)
        };
        assert_eq!(get(&host, "/.well-known/acme-challenge/nothere")?, 404);
        assert_eq!(get(&host, "/")?, 404);
        assert_eq!(
            get(&format!("nobody.{DOMAIN}"), "/.well-known/acme-challenge/x")?,
            404
        );
        assert_eq!(get(&host, "/.well-known/acme-challenge/../../etc")?, 404);

        // pebble: its own TLS certificate, DNS from pebble-challtestsrv (every name is
        // 127.0.0.1), HTTP-01 validation on the relay's port.
        let pebble_cert = dir.join("pebble.pem");
        let pebble_key = dir.join("pebble.key");
        iom_tests::harness::self_signed_p256(
            &pebble_cert,
            &pebble_key,
            1,
            "/CN=pebble",
            "IP:127.0.0.1",
            &[],
        )?;
        let (acme_port, mgmt_port, dns_port, cts_mgmt) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": pebble_cert, "privateKey": pebble_key,
            "httpPort": http_port, "tlsPort": free_port()?,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string())?;
        let _dns = spawn(
            "pebble-challtestsrv",
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-management", &format!("127.0.0.1:{cts_mgmt}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""]),
            &dir.join("challtestsrv.log"),
        )?;
        let _pebble = spawn(
            "pebble",
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0"),
            &dir.join("pebble.log"),
        )?;
        wait_until("pebble", Duration::from_secs(20), || {
            Ok(TcpStream::connect(("127.0.0.1", acme_port)).is_ok()
                && TcpStream::connect(("127.0.0.1", dns_port)).is_ok())
        })?;

        // A real ACME client puts the challenge into the node's webroot; pebble fetches it
        // through the relay, which asks the device.
        let webroot = home.dir.join("tls/webroot");
        let lego_dir = dir.join("lego");
        let out = Command::new("lego")
            .env("LEGO_CA_CERTIFICATES", &pebble_cert)
            .args(["--server", &format!("https://127.0.0.1:{acme_port}/dir")])
            .args([
                "--email",
                "phone@relay.test",
                "--accept-tos",
                "--domains",
                &host,
            ])
            .args(["--http", "--http.webroot"])
            .arg(&webroot)
            .arg("--path")
            .arg(&lego_dir)
            .arg("run")
            .output()?;
        ensure!(
            out.status.success(),
            "lego failed: {}\n{}\npebble: {}\nrelay: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("pebble.log")).unwrap_or_default(),
            relay.log_text()
        );
        ensure!(
            relay.log_text().contains("answered by"),
            "the relay did not answer the challenge: {}",
            relay.log_text()
        );
        let cert = lego_dir.join(format!("certificates/{host}.crt"));
        let key = lego_dir.join(format!("certificates/{host}.key"));

        // The node serves that certificate; a client that trusts only pebble's root verifies
        // it through the relay, name included (no -k).
        home.stop()?;
        home.args.extend([
            "--tls-cert".to_string(),
            cert.to_str().context("path")?.to_string(),
            "--tls-key".to_string(),
            key.to_str().context("path")?.to_string(),
        ]);
        home.start()?;
        wait_until("home's relay name again", Duration::from_secs(30), || {
            Ok(relay_url(&home)?.is_some())
        })?;
        let root = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&pebble_cert)
            .arg(format!("https://127.0.0.1:{mgmt_port}/roots/0"))
            .output()?;
        ensure!(
            root.status.success(),
            "{}",
            String::from_utf8_lossy(&root.stderr)
        );
        let root_pem = dir.join("root.pem");
        std::fs::write(&root_pem, &root.stdout)?;
        let port = relay.tls_port;
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(&root_pem)
            .arg("--resolve")
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg(format!("https://{host}:{port}/"))
            .output()?;
        ensure!(
            out.status.success(),
            "verified TLS through the relay failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        ensure!(text.ends_with("\n200") && text.contains("<html"), "{text}");
        // The same client refuses the name on a certificate for another name.
        let wrong = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&root_pem)
            .arg("--resolve")
            .arg(format!("other.{DOMAIN}:{port}:127.0.0.1"))
            .arg(format!("https://other.{DOMAIN}:{port}/"))
            .output()?;
        ensure!(!wrong.status.success(), "an unknown name got through");
        ensure!(relay.is_running(), "{}", relay.log_text());
        home.assert_no_panic()
    });
}
