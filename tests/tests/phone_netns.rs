//! The phone from anywhere, end to end with real parts in network namespaces (issue 12):
//!
//! ```text
//! home node (192.168.10.2) ── NAT A (the laptop node runs here, 192.168.10.1) ──┐
//!                                                                   wan ── relay 10.99.0.1
//! Chromium as a phone (192.168.20.2) ── NAT B ───────────────────────┘   (tcpdump on eth0)
//! ```
//!
//! The home node (`iom node run --https`, the agent role, the fake Anthropic API served inside
//! its namespace) registers its web name with the relay. Headless Chromium, emulating a
//! phone, runs with its chromedriver inside the phone's namespace (the test drives it through
//! a forwarder, [`natlab::NetnsForward`]) and resolves `*.relay.test` to the relay's public
//! address: it opens the invite URL of `iom invite --web` through the relay's SNI passthrough
//! (TLS ends on the home node; Chromium pins the node's self-signed key), pairs, asks, sees the
//! answer stream in and a tool call, uploads a photo that then appears on the laptop (paired
//! with home; `iom blob list`/`blob get`), loses its network (the phone's link goes down), types
//! an ask that waits in the outbox and goes out once the link is back, and is cut off within
//! one second of `iom devices revoke`. Screenshots of every step go to
//! `target/screenshots/phone-netns-*.png`. A capture on the relay's interface for the whole
//! conversation holds the TLS name but none of what was said.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig};
use iom_tests::harness::{runtime, scenario, sha256_file, wait_mesh, wait_until};
use iom_tests::natlab::{
    self, HOST_A_IP, HOST_B_IP, LabNode, LabRelay, NatKind, NatLab, Proc, RELAY_IP,
};
use iom_tests::webdriver::{Browser, Options, WATCH, first_conversation, spki_pin, user_asks};
use serde_json::json;

const DOMAIN: &str = "relay.test";
/// The relay's TLS port (its public HTTPS port).
const TLS_PORT: u16 = 443;
/// The home node's HTTPS listener inside its namespace.
const HOME_HTTPS: &str = "192.168.10.2:8443";
/// The laptop's address on home's LAN.
const LAPTOP_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 1);

/// What is said; none of it may cross the relay's wire in clear.
const PROMPT: &str = "Plan the zebra-quartz picnic at the lighthouse, please. \
    Bring the marmalade sandwiches and the kite. ";
const MEMORY: &str = "prefers the zebra-quartz lighthouse";
const QUEUED: &str = "While offline: pack the violet umbrella.";
const PHONE_NAME: &str = "Anna's netns phone";

/// Panics unless root, `ip`, `iptables`, Chromium, chromedriver, tcpdump and openssl are here.
fn require_everything() {
    natlab::require_netns("the_phone_pairs_asks_uploads_survives_offline_through_the_relay");
    for tool in ["chromium", "chromedriver", "tcpdump", "openssl"] {
        assert!(
            natlab::find_program(tool).is_some(),
            "this test needs `{tool}`: run scripts/install-deps.sh \
             (`IOM_SKIP_NETNS=1 scripts/test.sh` leaves the network-namespace tests out)"
        );
    }
}

/// `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    natlab::run("ip", args).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

// ---- The capture on the relay's interface.

/// `tcpdump -i eth0 -w FILE` in the relay's namespace; stopped on drop.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, file: &Path) -> Result<Capture> {
        let mut cmd = natlab::netns_command(ns, "tcpdump");
        // -U: each packet is written as it comes; -Z root: no privilege drop (the file's dir is
        // root's); -s 0: whole packets.
        cmd.args(["-i", "eth0", "-n", "-U", "-s", "0", "-Z", "root", "-w"])
            .arg(file);
        let proc = Proc::spawn("tcpdump", cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proc.stderr().contains("listening on") {
            if Instant::now() > deadline {
                bail!("tcpdump did not start: {}", proc.dump());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Capture {
            proc,
            file: file.to_path_buf(),
        })
    }

    /// Stops tcpdump (SIGTERM, so it flushes) and returns the pcap file's bytes.
    fn finish(mut self) -> Result<Vec<u8>> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.proc.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc.kill();
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }
}

/// What a pcap capture (Ethernet, IPv4) holds for TCP port `port`.
#[derive(Debug, Default)]
struct PortTraffic {
    packets: usize,
    /// Packets carrying payload, either way.
    data_packets: usize,
    payload_bytes: usize,
    /// All packets in the file.
    total: usize,
    /// The addresses that sent to the port.
    clients: std::collections::BTreeSet<Ipv4Addr>,
}

fn pcap_port_traffic(pcap: &[u8], port: u16) -> Result<PortTraffic> {
    ensure!(pcap.len() >= 24, "the capture has no pcap header");
    let le = match pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file: {:02x?}", &pcap[..4]),
    };
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        let w: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        })
    };
    let linktype = u32_at(pcap, 20).context("short header")?;
    ensure!(linktype == 1, "link type {linktype}, not Ethernet");
    let be16 = |b: &[u8], i: usize| -> Option<u16> {
        Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
    };
    let mut t = PortTraffic::default();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32_at(pcap, at + 8).context("record header")? as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + incl) else {
            break;
        };
        at += 16 + incl;
        t.total += 1;
        if be16(frame, 12) != Some(0x0800) {
            continue;
        }
        let Some(ip) = frame.get(14..) else { continue };
        let Some(&vihl) = ip.first() else { continue };
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ip.get(9) != Some(&6) {
            continue;
        }
        let Some(total_len) = be16(ip, 2) else {
            continue;
        };
        let Some(tcp) = ip.get(ihl..) else { continue };
        let (Some(sport), Some(dport), Some(&off)) = (be16(tcp, 0), be16(tcp, 2), tcp.get(12))
        else {
            continue;
        };
        if sport != port && dport != port {
            continue;
        }
        t.packets += 1;
        if dport == port
            && let Some(src) = ip.get(12..16).and_then(|b| <[u8; 4]>::try_from(b).ok())
        {
            t.clients.insert(Ipv4Addr::from(src));
        }
        let payload = usize::from(total_len).saturating_sub(ihl + usize::from(off >> 4) * 4);
        if payload > 0 {
            t.data_packets += 1;
            t.payload_bytes += payload;
        }
    }
    Ok(t)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_phone_pairs_asks_uploads_survives_offline_through_the_relay() {
    require_everything();
    scenario(|| {
        // Drop order is the reverse of this: nodes, browser, capture, relay, the reaper, the lab.
        let lab = NatLab::up("phone", NatKind::Masquerade).map_err(|e| anyhow!("{e}"))?;
        let _reaper = Reaper(vec![
            lab.b_ns(),
            lab.relay_ns(),
            lab.a_ns(),
            lab.ns("nat-a"),
        ]);
        let tmp = tempfile::tempdir()?;
        let rt = runtime()?;

        // The fake Messages API, served inside home's namespace (on its loopback).
        let handle = rt.handle().clone();
        let fake: FakeAnthropic = natlab::in_netns(&lab.a_ns(), move || {
            handle.block_on(FakeAnthropic::start(FakeConfig::default()))
        })??;

        // Home: HTTPS, the agent role, reserving on the relay; started first so its person
        // is known to the relay's `--allow-person`.
        let mut relay = LabRelay::new(
            &lab.relay_ns(),
            &tmp.path().join("relay"),
            &[
                "--domain",
                DOMAIN,
                "--tls-listen",
                &format!("{RELAY_IP}:{TLS_PORT}"),
            ],
        )?;
        let mut home = LabNode::new(
            "home",
            &lab.a_ns(),
            HOST_A_IP,
            std::slice::from_ref(&relay.addr()),
        )?;
        home.push_args(&["--https", HOME_HTTPS]);
        for (k, v) in fake.node_env() {
            home.set_env(k, v);
        }
        home.start()?;
        let person = home.status()?["person"]
            .as_str()
            .context("no person in status")?
            .to_string();
        relay.push_flags(&["--allow-person", &person]);
        relay.start()?;
        let me = home.device_id()?;
        home.cli(&["agent", "assign", &me])?;

        // The laptop, on home's LAN (its machine is the LAN's router namespace: a second host
        // in home's own namespace would share its addresses), paired with home.
        let mut laptop = LabNode::new("laptop", &lab.ns("nat-a"), LAPTOP_IP, &[])?;
        laptop.start()?;
        let code = home.invite(false)?;
        laptop.cli(&["join", &code])?;
        wait_mesh(&[&home, &laptop], Duration::from_secs(60))?;

        // Home's name on the relay.
        wait_until("home's relay name", Duration::from_secs(60), || {
            Ok(home.status()?["web"]["relay_url"].is_string())
        })
        .with_context(|| format!("{}\n{}", home.log_text(), relay.log()))?;
        let relay_url = home.status()?["web"]["relay_url"]
            .as_str()
            .context("no relay url")?
            .to_string();
        let device: iom_protocol::keys::DeviceId = me.parse()?;
        let host = format!("{}.{DOMAIN}", iom_protocol::sni::web_name(&device));
        ensure!(
            relay_url.starts_with(&format!("https://{host}")),
            "{relay_url} is not {host}"
        );
        let invite = home.json(&["invite", "--web", "--ttl", "15m"])?;
        let url = invite["url"].as_str().context("no url")?.to_string();
        ensure!(
            invite["code"]
                .as_str()
                .is_some_and(|c| c.starts_with("iom1"))
                && invite["expires"].as_u64().is_some(),
            "{invite}"
        );
        ensure!(
            url.starts_with(&format!("{relay_url}pair#")),
            "the invite URL is not the relay's: {invite}"
        );
        let origin = relay_url.trim_end_matches('/').to_string();
        let pin = spki_pin(&home.dir.join("tls/self-signed.pem"))?;

        // The photo the phone uploads.
        let photo = tmp.path().join("photo.png");
        std::fs::write(
            &photo,
            include_bytes!("../../node/src/http/web/icon-192.png"),
        )?;
        let photo = photo.canonicalize()?;
        let photo_hash = sha256_file(&photo)?;

        // The capture runs from before the phone's first packet to after its last.
        let capture = Capture::start(&lab.relay_ns(), &tmp.path().join("relay.pcap"))?;
        let b_ns = lab.b_ns();
        let phone_ip = HOST_B_IP.to_string();
        let phone_device = rt.block_on(async {
            // A phone-sized (390×844, touch) Chromium in the phone's namespace.
            let b = Browser::launch(
                Options::new(390, 844)
                    .in_netns(&b_ns)
                    .arg(format!("--ignore-certificate-errors-spki-list={pin}"))
                    .arg(format!("--host-resolver-rules=MAP *.{DOMAIN} {RELAY_IP}")),
            )
            .await?;

            // 1. Pairing, by the invite URL, through the relay.
            b.open_pairing(&url, Duration::from_secs(20)).await?;
            let device = b
                .pair_as(
                    PHONE_NAME,
                    "phone-netns-1-pair.png",
                    Duration::from_secs(20),
                )
                .await?;
            let entry = home
                .device_entry(&device)?
                .ok_or_else(|| anyhow!("{device} not in iom devices"))?;
            ensure!(
                entry["name"] == json!(PHONE_NAME) && entry["kind"] == json!("browser"),
                "{entry}"
            );
            let at = b.js("return location.origin").await?;
            ensure!(at == json!(origin), "the page is at {at}, not {origin}");

            // 2. The chat signs in with the key; an answer streams in.
            b.goto(&format!("{origin}/")).await?;
            b.wait_chat(Duration::from_secs(20)).await?;
            b.screenshot("phone-netns-2-chat.png").await?;
            b.js(WATCH).await?;
            let prompt = PROMPT.repeat(12);
            b.ask(&prompt).await?;
            let text = b.answer_n(1, Duration::from_secs(60)).await?;
            ensure!(
                text.starts_with(&format!("echo: {}", PROMPT.trim_end())),
                "{text:.200}"
            );
            b.ensure_streamed(&text).await?;
            b.screenshot("phone-netns-3-answer.png").await?;

            // 3. A tool call (a mesh tool: the memory), shown with its result.
            let directive = format!("[[tool memory_update {}]]", json!({ "text": MEMORY }));
            b.ask(&format!("Note it. {directive}")).await?;
            b.answer_n(2, Duration::from_secs(60)).await?;
            let tool = b
                .js(
                    "const t = document.querySelector('.msg.assistant:last-child .tool'); \
                     return t && [t.dataset.state, t.querySelector('summary').textContent]",
                )
                .await?;
            ensure!(
                tool[0] == "done" && tool[1].as_str().unwrap_or("").contains("memory_update"),
                "the tool call as shown: {tool}"
            );
            b.js(
                "const d = document.querySelector('.msg.assistant:last-child details'); \
                  if (d) d.open = true; return true",
            )
            .await?;
            b.screenshot("phone-netns-4-tool.png").await?;

            // 4. A photo, uploaded as a blob of the ask.
            b.pick_files(&[&photo]).await?;
            b.wait_js(
                "the picked photo",
                "return document.querySelectorAll('#picked li').length === 1",
                Duration::from_secs(10),
            )
            .await?;
            b.ask("Here is the photo of the picnic spot.").await?;
            b.answer_n(3, Duration::from_secs(60)).await?;
            b.wait_js(
                "the photo's preview",
                "const u = [...document.querySelectorAll('.msg.user')].pop(); \
                 const img = u && u.querySelector('img.preview'); \
                 return img && img.complete && img.naturalWidth > 0",
                Duration::from_secs(20),
            )
            .await?;
            b.screenshot("phone-netns-5-photo.png").await?;

            // 5. The network goes: the phone's link is down (its routes go with it).
            ip(&["-n", &b_ns, "link", "set", "eth0", "down"])?;
            b.ask(QUEUED).await?;
            b.wait_queued(Duration::from_secs(60)).await?;
            b.screenshot("phone-netns-6-offline.png").await?;
            ensure!(
                !home
                    .json(&["conversations", "list"])?
                    .to_string()
                    .contains("violet umbrella"),
                "the ask reached home while the phone was offline"
            );
            // And comes back: the outbox sends the ask by itself.
            ip(&["-n", &b_ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &b_ns,
                "route",
                "replace",
                "default",
                "via",
                "192.168.20.1",
            ])?;
            let back = b
                .wait_js(
                    "the queued ask answered",
                    "const m = document.querySelector('.msg.assistant:last-child'); \
                     return document.body.dataset.outbox === '0' && m && \
                        m.dataset.state === 'done' && m.querySelector('.text').textContent",
                    Duration::from_secs(90),
                )
                .await?;
            ensure!(
                back.as_str()
                    .is_some_and(|a| a.starts_with(&format!("echo: {QUEUED}"))),
                "{back}"
            );
            b.screenshot("phone-netns-7-back-online.png").await?;

            // 6. Revoked: cut off within a second, through the relay.
            ensure!(b.page_status("/v1/status").await? == 200);
            home.cli(&["devices", "revoke", &device])?;
            let took = b.wait_cut_off("phone").await?;
            eprintln!("revoked phone cut off in {took:?}");
            let ok = b.key_login().await?;
            ensure!(
                ok == json!(false),
                "the revoked phone signed in again: {ok}"
            );
            b.goto(&format!("{origin}/")).await?;
            b.wait_js(
                "the sign-in form after revocation",
                "return !document.getElementById('login').hidden",
                Duration::from_secs(20),
            )
            .await?;
            b.screenshot("phone-netns-8-revoked.png").await?;
            b.close().await?;
            anyhow::Ok(device)
        })?;
        let pcap = capture.finish()?;

        // Home has the conversation, asked over the web, with the queued ask once.
        let convs = home.json(&["conversations", "list"])?;
        let c = first_conversation(&home, &convs)?;
        let asks = user_asks(&c);
        ensure!(
            asks.len() == 4 && asks[3] == QUEUED,
            "the asks as home stored them: {asks:?}"
        );
        ensure!(c["messages"][0]["interface"] == "web", "{c}");
        let memory = home.json(&["memory", "show"])?;
        ensure!(memory["text"] == MEMORY, "{memory}");
        ensure!(
            home.device_entry(&phone_device)?
                .is_none_or(|e| e["revoked"] != json!(false)),
            "the phone is still a device of the mesh"
        );

        // The photo reached the laptop.
        wait_until("the photo on the laptop", Duration::from_secs(60), || {
            Ok(laptop
                .json(&["blob", "list"])?
                .to_string()
                .contains(&photo_hash))
        })?;
        let copy = tmp.path().join("photo-on-laptop.png");
        laptop.cli(&[
            "blob",
            "get",
            &photo_hash,
            "-o",
            &copy.display().to_string(),
        ])?;
        ensure!(
            std::fs::read(&copy)? == std::fs::read(&photo)?,
            "the laptop's copy of the photo differs"
        );

        // The relay's wire: the phone's TLS to the relay's port is there (its server name in
        // clear, as SNI is), and nothing that was said.
        let t = pcap_port_traffic(&pcap, TLS_PORT)?;
        eprintln!(
            "capture: {} packets, {} on port {TLS_PORT} ({} with data, {} bytes) from {:?} \
             (phone {phone_ip})",
            t.total, t.packets, t.data_packets, t.payload_bytes, t.clients
        );
        ensure!(
            t.packets >= 50 && t.data_packets >= 20 && t.payload_bytes >= 20_000,
            "the capture is too small to mean anything: {t:?}"
        );
        ensure!(
            t.clients == std::collections::BTreeSet::from([natlab::NAT_B_IP]),
            "only the phone's NAT ({}) talks TLS to the relay, not {:?}",
            natlab::NAT_B_IP,
            t.clients
        );
        // Home's side: the forwarded bytes ride its libp2p connection to the relay.
        let p2p = pcap_port_traffic(&pcap, natlab::RELAY_PORT)?;
        ensure!(
            p2p.payload_bytes >= t.payload_bytes / 2 && p2p.clients.contains(&natlab::NAT_A_IP),
            "home's libp2p traffic with the relay is missing: {p2p:?}"
        );
        ensure!(
            contains(&pcap, host.as_bytes()),
            "the capture does not hold the phone's TLS server name {host}"
        );
        let photo_bytes = std::fs::read(&photo)?;
        let mid = photo_bytes.len() / 2;
        let answer = format!("echo: {}", PROMPT.trim_end());
        let secrets: [(&str, &[u8]); 8] = [
            ("the prompt", PROMPT.trim_end().as_bytes()),
            ("a part of the prompt", b"zebra-quartz"),
            ("the answer", answer.as_bytes()),
            ("the tool call's text", MEMORY.as_bytes()),
            ("the queued ask", QUEUED.as_bytes()),
            ("a part of the queued ask", b"violet umbrella"),
            ("the phone's name", PHONE_NAME.as_bytes()),
            ("the photo's bytes", &photo_bytes[mid..mid + 64]),
        ];
        for (what, s) in secrets {
            ensure!(
                !contains(&pcap, s),
                "{what} crossed the relay's wire in clear"
            );
        }

        laptop.assert_no_panic()?;
        drop(laptop);
        home.kill();
        drop(fake);
        home.assert_no_panic()?;
        ensure!(relay.is_running(), "the relay died:\n{}", relay.log());
        Ok(())
    });
}

/// Kills whatever still runs in the test's namespaces (Chromium left by a killed
/// chromedriver) before the lab deletes them.
struct Reaper(Vec<String>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for ns in &self.0 {
            natlab::kill_netns_pids(ns);
        }
    }
}
