//! Pairing and trust with real `iom` processes over loopback: joining with invites, admin
//! devices inviting, every way an invite can be wrong, gating of a foreign person's node, and
//! revocation that sticks across restarts.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use iom_protocol::invite::{Invite, pair_proof};
use iom_protocol::pair::{JoinRejection, JoinRequest, JoinResponse};
use iom_protocol::wire::{AgentResponse, BlobResponse, SyncMsg};
use iom_tests::harness::raw::RawPeer;
use iom_tests::harness::{Node, scenario, wait_mesh, wait_until};

fn started(name: &str) -> Result<Node> {
    let mut n = Node::new(name)?;
    n.start()?;
    Ok(n)
}

fn device_count(n: &Node) -> Result<usize> {
    Ok(n.devices()?
        .iter()
        .filter(|d| d["revoked"] == false)
        .count())
}

/// A runs `init`; B and C join; C is an admin and invites D; C is revoked and cut off; after
/// every node restarts, trust is as it was.
#[test]
fn join_admin_invite_revoke_and_restart() {
    scenario(join_admin_invite_revoke_and_restart_body);
}

fn join_admin_invite_revoke_and_restart_body() -> Result<()> {
    let mut a = Node::new("a")?;
    let init = a.cli(&["init", "--name", "a"])?;
    assert!(!init.is_empty());
    a.start()?;
    assert_eq!(a.status()?["holds_person_key"], true);
    let mut b = started("b")?;
    let mut c = started("c")?;

    let t0 = Instant::now();
    b.cli(&["join", &a.invite(false)?])?;
    let join_ms = t0.elapsed().as_millis();
    c.cli(&["join", &a.invite(true)?])?;
    wait_mesh(&[&a, &b, &c], Duration::from_secs(20))?;
    eprintln!("join took {join_ms} ms");

    let (ida, idb, idc) = (a.device_id()?, b.device_id()?, c.device_id()?);
    // Everyone sees the same person and each other as trusted; admin flags as issued.
    let person = a.status()?["person"].clone();
    for n in [&b, &c] {
        assert_eq!(
            n.status()?["person"],
            person,
            "{} adopted the person",
            n.name
        );
    }
    let row = |n: &Node, id: &str| -> Result<serde_json::Value> {
        n.device_entry(id)?
            .ok_or_else(|| anyhow!("{} does not list {id}", n.name))
    };
    assert_eq!(row(&b, &idc)?["admin"], true, "C was invited as admin");
    assert_eq!(row(&c, &idb)?["admin"], false, "B was not");
    assert_eq!(row(&c, &ida)?["name"], "a");

    // B is not an admin: it cannot invite. C is, and invites D.
    let (code, err) = b.fail(&["invite"])?;
    assert_eq!(code, 1);
    assert!(err.contains("not an admin"), "{err}");
    let mut d = started("d")?;
    d.cli(&["join", &c.invite(false)?, "--name", "dee"])?;
    wait_mesh(&[&a, &b, &c, &d], Duration::from_secs(20))?;
    let idd = d.device_id()?;
    assert_eq!(row(&a, &idd)?["name"], "dee");

    // Revoke C from A. A and B drop C within about a second; C cannot come back.
    let revoked = a.json(&["devices", "revoke", "c"])?;
    let t_revoke = Instant::now();
    assert_eq!(revoked["device"], idc.as_str(), "{revoked}");
    // D was certified by C only, so D loses trust with it (a revoked admin's certificates
    // are not trusted any more).
    let lost = revoked["also_untrusted"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(lost.iter().any(|x| x == idd.as_str()), "{revoked}");
    wait_until("A and B to drop C", Duration::from_secs(5), || {
        Ok(!a.connected_to(&idc)?
            && !b.connected_to(&idc)?
            && b.device_entry(&idc)?.is_some_and(|r| r["revoked"] == true))
    })?;
    let cut_ms = t_revoke.elapsed().as_millis();
    eprintln!("C cut off {cut_ms} ms after the revocation");
    assert!(cut_ms < 3000, "C dropped after {cut_ms} ms");
    assert_eq!(row(&a, &idc)?["revoked"], true);
    // C keeps trying for a while; it stays cut off.
    std::thread::sleep(Duration::from_secs(3));
    for n in [&a, &b] {
        assert!(
            !n.connected_to(&idc)?,
            "{} reconnected to revoked C",
            n.name
        );
    }
    for id in [&ida, &idb] {
        let r = row(&c, id)?;
        assert_eq!(r["connection"], "offline", "C's view of {id}: {r}");
    }

    // After every node restarts, trust is as it was.
    for n in [&mut a, &mut b, &mut c, &mut d] {
        n.restart()?;
    }
    wait_mesh(&[&a, &b], Duration::from_secs(20))?;
    for n in [&a, &b] {
        assert_eq!(row(n, &idc)?["revoked"], true, "{} still refuses C", n.name);
        assert!(!n.trusts(&idd)?, "{} still does not trust D", n.name);
        assert!(n.trusts(&ida)? && n.trusts(&idb)?);
    }
    std::thread::sleep(Duration::from_secs(2));
    for n in [&a, &b] {
        assert!(
            !n.connected_to(&idc)?,
            "{} let C back in after restart",
            n.name
        );
    }
    for n in [&a, &b, &c, &d] {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// Reused, expired, other person's, tampered and wrong-proof invites each get their own
/// error, and none of them issues a certificate.
#[test]
fn bad_invites_each_get_their_own_error() {
    scenario(bad_invites_each_get_their_own_error_body);
}

fn bad_invites_each_get_their_own_error_body() -> Result<()> {
    let a = started("a")?;
    let b = started("b")?;
    let e = started("e")?;
    let x = started("x")?; // another person's first device

    let used = a.invite(false)?;
    b.cli(&["join", &used])?;
    wait_mesh(&[&a, &b], Duration::from_secs(20))?;
    let before = device_count(&a)?;

    // Reused.
    let (code, err) = e.fail(&["join", &used])?;
    assert_eq!(code, 1);
    assert!(err.contains("already used"), "reused: {err}");

    // Expired (caught by the joiner from the code itself).
    let short = a.json(&["invite", "--ttl", "1s"])?["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let (_, err) = e.fail(&["join", &short])?;
    assert!(err.contains("expired"), "expired: {err}");

    // From another person, used by a device that already belongs to A's mesh.
    let (_, err) = b.fail(&["join", &x.invite(false)?])?;
    assert!(err.contains("another person"), "other person: {err}");

    // Tampered.
    let good = a.invite(false)?;
    let mut chars: Vec<char> = good.chars().collect();
    let i = chars.len() / 3;
    chars[i] = if chars[i] == 'x' { 'y' } else { 'x' };
    let (_, err) = e.fail(&["join", &chars.into_iter().collect::<String>()])?;
    assert!(err.contains("typo"), "tampered: {err}");

    // Wrong proof, and the inviter's own expiry check, from a raw client.
    let invite = Invite::parse_ignoring_expiry(&good).map_err(|e| anyhow!("{e}"))?;
    let raw = RawPeer::new(invite.inviter.to_peer_id(), &invite.addrs)?;
    let mut req = JoinRequest {
        invite_id: invite.id(),
        joiner: raw.device.id(),
        name: "mallory".into(),
        proof: [7u8; 32],
    };
    match raw.join(invite.inviter.to_peer_id(), &req)? {
        JoinResponse::Rejected(JoinRejection::BadProof) => {}
        other => bail!("wrong proof answered with {other:?}"),
    }
    // A proof made for another joiner (the secret is right, the binding is not).
    req.proof = pair_proof(&invite.secret, &invite.inviter, &e.device_id()?.parse()?);
    match raw.join(invite.inviter.to_peer_id(), &req)? {
        JoinResponse::Rejected(JoinRejection::BadProof) => {}
        other => bail!("proof for another device answered with {other:?}"),
    }
    let expired = Invite::parse_ignoring_expiry(&short).map_err(|e| anyhow!("{e}"))?;
    let req = JoinRequest {
        invite_id: expired.id(),
        joiner: raw.device.id(),
        name: "late".into(),
        proof: pair_proof(&expired.secret, &expired.inviter, &raw.device.id()),
    };
    match raw.join(expired.inviter.to_peer_id(), &req)? {
        JoinResponse::Rejected(JoinRejection::Expired) => {}
        other => bail!("expired invite answered with {other:?}"),
    }

    // None of that issued a certificate, nor burned the good invite.
    assert_eq!(device_count(&a)?, before, "{:?}", a.devices()?);
    assert!(!a.trusts(&raw.device.id().to_string())?);
    assert_eq!(device_count(&e)?, 1, "e is still alone");
    e.cli(&["join", &good])?;
    wait_mesh(&[&a, &b, &e], Duration::from_secs(20))?;
    for n in [&a, &b, &e, &x] {
        n.assert_no_panic()?;
    }
    Ok(())
}

/// A node of a different person may pair, but every other protocol refuses it explicitly.
#[test]
fn foreign_person_is_refused_every_protocol_but_pairing() {
    scenario(foreign_person_is_refused_every_protocol_but_pairing_body);
}

fn foreign_person_is_refused_every_protocol_but_pairing_body() -> Result<()> {
    let mut a = started("a")?;
    let f = a.dir.join("secret.txt");
    std::fs::write(&f, b"not for strangers")?;
    let hash = a.json(&["blob", "add", f.to_str().unwrap_or_default()])?["hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let id: iom_protocol::keys::DeviceId = a.device_id()?.parse()?;
    let raw = RawPeer::new(id.to_peer_id(), &a.listen_addrs()?)?;

    // Sync: explicit refusal, naming why.
    match raw.sync_hello(id.to_peer_id())? {
        SyncMsg::Refused { reason } => {
            assert!(reason.contains("different person"), "{reason}")
        }
        other => bail!("sync Hello from a stranger answered with {other:?}"),
    }
    // Blobs: refused, even for a blob that exists.
    let blob: iom_protocol::id::ContentId = hash.parse().map_err(|e| anyhow!("{e:?}"))?;
    match raw.blob_get(id.to_peer_id(), blob)? {
        BlobResponse::Refused { reason } => assert!(reason.contains("not trusted"), "{reason}"),
        other => bail!("blob request from a stranger answered with {other:?}"),
    }
    // Agent: refused.
    match raw.agent_notify(id.to_peer_id())? {
        AgentResponse::Refused { reason } => assert!(reason.contains("not trusted"), "{reason}"),
        other => bail!("agent request from a stranger answered with {other:?}"),
    }
    // Pairing is open: the request is read and judged (the invite is unknown).
    let req = JoinRequest {
        invite_id: iom_protocol::invite::invite_id(&[9u8; 32]),
        joiner: raw.device.id(),
        name: "stranger".into(),
        proof: [0u8; 32],
    };
    match raw.join(id.to_peer_id(), &req)? {
        JoinResponse::Rejected(JoinRejection::UnknownInvite) => {}
        other => bail!("pairing answered with {other:?}"),
    }
    // Bad frames: an oversized length prefix, a truncated frame and CBOR garbage. The node
    // ends the stream and stays healthy.
    let oversized = vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let truncated = vec![0, 0, 0, 100, 1, 2, 3];
    let garbage = vec![0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x00];
    for (proto, bytes) in [
        ("/iom/pair/1", oversized),
        ("/iom/pair/1", garbage.clone()),
        ("/iom/sync/1", garbage),
        ("/iom/pair/1", truncated),
    ] {
        let raw = RawPeer::new(id.to_peer_id(), &a.listen_addrs()?)?;
        let answer = raw.send_garbage(id.to_peer_id(), proto, bytes)?;
        assert!(
            answer.is_empty(),
            "{proto} answered garbage with {answer:?}"
        );
    }
    assert!(a.is_running());
    a.status()?;
    // The refusals are logged, and nothing was given away.
    let log = a.log_text();
    assert!(log.contains("refused untrusted peer"), "log:\n{log}");
    assert_eq!(device_count(&a)?, 1);
    a.assert_no_panic()
}
