//! The email channel against a real mail system: Dovecot (IMAP IDLE with STARTTLS, LMTP) and
//! Postfix (submission with STARTTLS and AUTH), started by the test on loopback ports with a
//! fresh certificate ([`iom_tests::maillab`]), and a real `iom` node holding the agent role
//! with the fake Messages API. Mail is injected by SMTP as Alice (allowlisted) or Mallory (not);
//! answers are read from Alice's Maildir as Dovecot delivered them.

use std::time::Duration;

use anyhow::{Context, Result};
use iom_tests::fake_anthropic::{FakeAnthropic, FakeConfig, Scripted};
use iom_tests::harness::{Node, runtime, scenario, wait_until};
use iom_tests::maillab::{self, MailLab};
use mail_parser::MessageParser;
use serde_json::Value;

const BOT: &str = "bot@example.org";
const ALICE: &str = "alice@example.org";
const MALLORY: &str = "mallory@example.org";

/// A lab, the fake model and an agent node whose `[email]` watches the bot's mailbox.
struct Setup {
    lab: MailLab,
    node: Node,
    fake: FakeAnthropic,
    _rt: tokio::runtime::Runtime,
}

fn setup(extra: &str) -> Result<Setup> {
    let lab = MailLab::start(&[("bot", "botpw"), ("alice", "alicepw"), ("mallory", "m")])?;
    let rt = runtime()?;
    let fake = rt.block_on(FakeAnthropic::start(FakeConfig::default()))?;
    let mut env: Vec<(&str, &str)> = fake.node_env().to_vec();
    env.push(("IOM_EMAIL_PASSWORD", "botpw"));
    let mut node = Node::with_env("mail", &env)?;
    std::fs::write(
        node.dir.join("config.toml"),
        format!(
            r#"[agent]
on_interrupted = "retry"

[email]
address = "{BOT}"
owner = "{ALICE}"
allow = ["{ALICE}"]
imap_host = "localhost"
imap_port = {imap}
imap_security = "starttls"
smtp_host = "localhost"
smtp_port = {smtp}
smtp_security = "starttls"
ca_file = "{ca}"
{extra}
"#,
            imap = lab.ports.imap,
            smtp = lab.ports.submission,
            ca = lab.ca_file().display(),
        ),
    )?;
    node.start()?;
    let me = node.device_id()?;
    node.cli(&["agent", "assign", &me])?;
    let s = Setup {
        lab,
        node,
        fake,
        _rt: rt,
    };
    s.wait_idle()?;
    Ok(s)
}

impl Setup {
    fn status(&self) -> Result<Value> {
        self.node.json(&["email", "status"])
    }

    fn wait_idle(&self) -> Result<()> {
        wait_until("the email channel to IDLE", Duration::from_secs(20), || {
            Ok(self.status()?["status"]["state"] == "idle")
        })
        .with_context(|| {
            format!(
                "{:#}\n{}",
                self.status().unwrap_or_default(),
                self.lab.logs()
            )
        })
    }

    /// Waits until the channel has looked at `n` mails in all.
    fn wait_received(&self, n: u64) -> Result<()> {
        wait_until(
            &format!("{n} mails received"),
            Duration::from_secs(30),
            || {
                let s = self.status()?;
                Ok(s["status"]["received"].as_u64() >= Some(n) && s["status"]["state"] == "idle")
            },
        )
    }

    /// Waits until Alice holds `n` mails; returns them.
    fn answers(&self, n: usize) -> Result<Vec<Vec<u8>>> {
        wait_until(
            &format!("{n} answers to Alice"),
            Duration::from_secs(30),
            || Ok(self.lab.mailbox("alice").len() >= n),
        )
        .with_context(|| {
            format!(
                "status {:#}\nnode log:\n{}\n{}",
                self.status().unwrap_or_default(),
                self.node.log_text(),
                self.lab.logs()
            )
        })?;
        Ok(self.lab.mailbox("alice"))
    }

    fn email_conversations(&self) -> Result<Vec<Value>> {
        let list = self.node.json(&["conversations", "list"])?;
        Ok(list["conversations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                c["title"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("email: "))
            })
            .collect())
    }
}

fn mail(from: &str, subject: &str, id: Option<&str>, reply_to: Option<&str>, body: &str) -> String {
    let mut m = format!("From: {from}\r\nTo: {BOT}\r\nSubject: {subject}\r\n");
    if let Some(id) = id {
        m.push_str(&format!("Message-ID: <{id}>\r\n"));
    }
    if let Some(r) = reply_to {
        m.push_str(&format!("In-Reply-To: <{r}>\r\nReferences: <{r}>\r\n"));
    }
    m.push_str(&format!(
        "Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    ));
    m
}

/// An answer's headers and parts.
struct Answer {
    message_id: String,
    in_reply_to: String,
    references: String,
    subject: String,
    text: String,
    html: String,
    auto_submitted: String,
}

fn read(raw: &[u8]) -> Result<Answer> {
    let m = MessageParser::default()
        .parse(raw)
        .context("unparsable answer")?;
    let h = |n: &str| m.header_raw(n).unwrap_or("").trim().to_string();
    Ok(Answer {
        message_id: m.message_id().unwrap_or("").to_string(),
        in_reply_to: h("In-Reply-To"),
        references: h("References"),
        subject: m.subject().unwrap_or("").to_string(),
        text: m.body_text(0).map(|t| t.into_owned()).unwrap_or_default(),
        html: m.body_html(0).map(|t| t.into_owned()).unwrap_or_default(),
        auto_submitted: h("Auto-Submitted"),
    })
}

#[test]
fn an_allowed_sender_gets_answers_in_the_thread_and_others_get_nothing() {
    maillab::require();
    scenario(|| {
        let s = setup("")?;
        s.lab.send(
            ALICE,
            BOT,
            mail(
                ALICE,
                "Lunch plans",
                Some("m1@example.org"),
                None,
                "Where shall we eat?",
            )
            .as_bytes(),
        )?;
        let first = read(&s.answers(1)?[0])?;
        assert_eq!(first.in_reply_to, "<m1@example.org>");
        assert!(
            first.references.contains("<m1@example.org>"),
            "{}",
            first.references
        );
        assert!(
            first.message_id.starts_with("iom-em-") && first.message_id.ends_with("@example.org")
        );
        assert_eq!(first.subject, "Re: Lunch plans");
        assert!(
            first.text.contains("echo: ") && first.text.contains("Where shall we eat?"),
            "{}",
            first.text
        );
        assert!(first.html.contains("Where shall we eat?"), "{}", first.html);
        assert_eq!(first.auto_submitted, "auto-replied");

        // Alice replies to the answer: the same conversation continues.
        let reply = mail(
            ALICE,
            "Re: Lunch plans",
            Some("m2@example.org"),
            Some(&first.message_id),
            "And at what time?",
        );
        s.lab.send(ALICE, BOT, reply.as_bytes())?;
        let answers = s.answers(2)?;
        let second = read(&answers[1])?;
        assert_eq!(second.in_reply_to, "<m2@example.org>");
        assert!(
            second
                .references
                .contains(&format!("<{}>", first.message_id)),
            "{}",
            second.references
        );
        assert!(second.text.contains("And at what time?"));
        let convs = s.email_conversations()?;
        assert_eq!(convs.len(), 1, "one thread, one conversation: {convs:?}");
        assert_eq!(
            convs[0]["messages"], 4,
            "two requests and two replies: {convs:?}"
        );
        // The model saw the first mail as history of the second.
        let last = s
            .fake
            .requests()
            .last()
            .cloned()
            .context("no model request")?;
        assert!(
            last.body.to_string().contains("Where shall we eat?"),
            "history missing"
        );

        // Mallory is not on the list: nothing goes out, and it is logged.
        s.lab.send(
            MALLORY,
            BOT,
            mail(MALLORY, "hi", Some("x1@example.org"), None, "Answer me").as_bytes(),
        )?;
        s.wait_received(3)?;
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(s.lab.mailbox("alice").len(), 2);
        assert!(s.lab.mailbox("mallory").is_empty(), "Mallory got an answer");
        let st = s.status()?;
        assert_eq!(st["status"]["answered"], 2, "{st:#}");
        assert_eq!(st["status"]["ignored"], 1, "{st:#}");
        let outcome = st["status"]["last_message"]["outcome"]
            .as_str()
            .unwrap_or("");
        assert!(outcome.contains("not on the allowlist"), "{outcome}");
        assert!(s.node.log_text().contains("not answered"));
        // The human form of the status names the connection.
        let text = s.node.cli(&["email", "status"])?;
        assert!(
            text.contains("idle") && text.contains("answered 2"),
            "{text}"
        );
        s.node.assert_no_panic()?;
        Ok(())
    });
}

#[test]
fn a_node_killed_between_receipt_and_answer_answers_exactly_once() {
    maillab::require();
    scenario(|| {
        let mut s = setup("")?;
        // The model takes long for the first request: the node dies while it runs.
        s.fake.push_script(Scripted::Delay(Duration::from_secs(30)));
        s.lab.send(
            ALICE,
            BOT,
            mail(
                ALICE,
                "Slow",
                Some("k1@example.org"),
                None,
                "Take your time",
            )
            .as_bytes(),
        )?;
        wait_until("the mail to be asked", Duration::from_secs(20), || {
            Ok(s.status()?["status"]["asked"] == 1 && !s.fake.requests().is_empty())
        })?;
        s.node.kill();
        assert!(s.lab.mailbox("alice").is_empty());
        s.node.start()?;
        let answers = s.answers(1)?;
        let a = read(&answers[0])?;
        assert!(a.text.contains("Take your time"), "{}", a.text);
        assert_eq!(a.in_reply_to, "<k1@example.org>");
        // Nothing more comes: not from the restarted watcher, not from the resumed answer.
        s.wait_idle()?;
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(s.lab.mailbox("alice").len(), 1, "exactly one answer");
        assert_eq!(s.status()?["pending_answers"], 0);
        assert_eq!(s.email_conversations()?.len(), 1);
        Ok(())
    });
}

#[test]
fn an_imap_server_restart_is_survived() {
    maillab::require();
    scenario(|| {
        let mut s = setup("")?;
        s.lab.send(
            ALICE,
            BOT,
            mail(ALICE, "one", Some("r1@example.org"), None, "First").as_bytes(),
        )?;
        s.answers(1)?;
        s.lab.stop_dovecot()?;
        wait_until("the channel to notice", Duration::from_secs(20), || {
            Ok(s.status()?["status"]["state"] != "idle")
        })?;
        // Mail sent while Dovecot is down waits in Postfix's queue.
        s.lab.send(
            ALICE,
            BOT,
            mail(ALICE, "two", Some("r2@example.org"), None, "Second").as_bytes(),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        s.lab.start_dovecot()?;
        let answers = s.answers(2)?;
        assert!(read(&answers[1])?.text.contains("Second"));
        let st = s.status()?;
        assert!(
            !st["status"]["failures"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "the lost connection is reported: {st:#}"
        );
        s.wait_idle()?;
        assert_eq!(s.lab.mailbox("alice").len(), 2);
        Ok(())
    });
}

#[test]
fn bad_mail_gets_no_panic_and_no_reply_storm() {
    maillab::require();
    scenario(|| {
        let s = setup("replies_per_thread_per_hour = 2")?;
        let sent = std::cell::Cell::new(0u64);
        let send = |raw: String| -> Result<()> {
            sent.set(sent.get() + 1);
            s.lab.send(ALICE, BOT, raw.as_bytes())
        };
        // Automatic mail: never answered.
        send(
            mail(
                ALICE,
                "Out of office",
                Some("a1@example.org"),
                None,
                "I am away",
            )
            .replace("Subject:", "Auto-Submitted: auto-replied\r\nSubject:"),
        )?;
        send(
            mail(ALICE, "Newsletter", Some("a2@example.org"), None, "News")
                .replace("Subject:", "Precedence: bulk\r\nSubject:"),
        )?;
        // No Message-ID: answered once (the id comes from UIDVALIDITY and UID).
        send(mail(ALICE, "no id", None, None, "Mail without an id"))?;
        // Broken MIME: a multipart whose boundary never comes.
        send(format!(
            "From: {ALICE}\r\nTo: {BOT}\r\nSubject: broken\r\nMessage-ID: <b1@example.org>\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"nope\"\r\n\r\n\
             --other\r\nContent-Type: text/plain\r\n\r\nhalf a part\r\n"
        ))?;
        // A charset nobody uses.
        send(format!(
            "From: {ALICE}\r\nTo: {BOT}\r\nSubject: =?x-klingon?Q?qapla?=\r\nMessage-ID: <c1@example.org>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\nnuqneH\r\n"
        ))?;
        // A 10 MB attachment.
        let blob: String = {
            let bytes: Vec<u8> = (0..10u32 << 20).map(|i| (i % 251) as u8).collect();
            let b64 = base64_encode(&bytes);
            b64.as_bytes()
                .chunks(76)
                .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
                .collect()
        };
        send(format!(
            "From: {ALICE}\r\nTo: {BOT}\r\nSubject: big\r\nMessage-ID: <big1@example.org>\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
             --b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"big.bin\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{blob}--b--\r\n"
        ))?;
        // A loop: a thread that keeps coming back gets at most 2 answers an hour.
        send(mail(ALICE, "loop", Some("l1@example.org"), None, "loop 1"))?;
        s.answers(5)?; // no-id, broken, charset, big, loop 1
        let loop_answer = s
            .lab
            .mailbox("alice")
            .iter()
            .filter_map(|raw| read(raw).ok())
            .find(|a| a.in_reply_to == "<l1@example.org>")
            .context("no answer to the loop's first mail")?;
        let mut parent = loop_answer.message_id.clone();
        for i in 2..=4 {
            let id = format!("l{i}@example.org");
            send(mail(
                ALICE,
                "Re: loop",
                Some(&id),
                Some(&parent),
                &format!("loop {i}"),
            ))?;
            parent = id;
            s.wait_received(sent.get())?;
        }
        s.wait_received(sent.get())?;
        std::thread::sleep(Duration::from_secs(3));
        let answers: Vec<Answer> = s
            .lab
            .mailbox("alice")
            .iter()
            .map(|r| read(r))
            .collect::<Result<_>>()?;
        let replied: Vec<&str> = answers.iter().map(|a| a.in_reply_to.as_str()).collect();
        for auto in ["<a1@example.org>", "<a2@example.org>"] {
            assert!(
                !replied.contains(&auto),
                "automatic mail {auto} was answered"
            );
        }
        assert!(replied.contains(&"<b1@example.org>") && replied.contains(&"<c1@example.org>"));
        assert!(replied.contains(&"<big1@example.org>"), "{replied:?}");
        let big = answers
            .iter()
            .find(|a| a.in_reply_to == "<big1@example.org>")
            .context("big")?;
        assert!(
            big.text.contains("big.bin"),
            "the attachment is named in the prompt: {}",
            big.text
        );
        assert_eq!(
            answers.iter().filter(|a| a.in_reply_to.is_empty()).count(),
            1,
            "the mail without an id"
        );
        let loop_answers = answers
            .iter()
            .filter(|a| a.subject.ends_with("loop"))
            .count();
        assert_eq!(
            loop_answers, 2,
            "the rate limit stops the loop: {replied:?}"
        );
        assert_eq!(answers.len(), 6, "{replied:?}");
        let st = s.status()?;
        assert_eq!(st["status"]["received"], sent.get(), "{st:#}");
        assert_eq!(
            st["status"]["ignored"], 4,
            "two automatic, two over the rate limit: {st:#}"
        );
        s.node.assert_no_panic()?;
        Ok(())
    });
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_schedule_to_email_mails_its_result_to_the_owner_once() {
    maillab::require();
    scenario(|| {
        let mut s = setup("")?;
        let added = s.node.json(&[
            "schedule",
            "add",
            "* * * * *",
            "minute report",
            "--to",
            "email",
        ])?;
        assert_eq!(added["to"], "email", "{added}");
        // Move the scheduler's clock two minutes on: a slot is due at once.
        s.node
            .env
            .push(("IOM_CLOCK_OFFSET_SECS".into(), "120".into()));
        s.node.restart()?;
        let mails = s.answers(1)?;
        let a = read(&mails[0])?;
        assert_eq!(a.subject, "Scheduled: minute report");
        assert!(a.text.contains("echo: minute report"), "{}", a.text);
        assert!(a.message_id.starts_with("iom-sched-"), "{}", a.message_id);
        std::thread::sleep(Duration::from_secs(3));
        // Once per slot: the wait may cross into the next minute, whose slot is mailed too, but
        // no slot twice.
        let mut ids = Vec::new();
        for m in s.lab.mailbox("alice") {
            ids.push(read(&m)?.message_id);
        }
        let slots: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(slots.len(), ids.len(), "a slot was mailed twice: {ids:?}");
        assert!(ids.len() <= 2, "more slots than minutes passed: {ids:?}");
        Ok(())
    });
}
