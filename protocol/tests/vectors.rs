//! Test vectors published in `docs/protocol.md`. If one of these changes, the wire format
//! changed: bump the version and update the document.
#![allow(clippy::unwrap_used)]

use iom_protocol::cert::{CertBody, Certificate, signing_input};
use iom_protocol::invite::{Invite, pair_proof};
use iom_protocol::keys::{DeviceKey, PersonKey};

const CERT_HEX: &str = "a364626f6479a166446576696365a5646e616d65666c6170746f706561646d696ef566\
646576696365582081397\
70ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b39466706572736f6e58208a88e3dd7409f1\
95fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c696973737565645f61741a6553f100667369676e65\
72a166506572736f6e58208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c697369\
676e617475726558405b1fbbd7f691c3b513ad8ec7133a72bbd7d6be4195203d694af56191099a1eaef8b65ed486\
78207b76e9dcbd6d2e3dbbd944c3fdcc3ea415387cd450e258f606";

#[test]
fn certificate_vector() {
    let person = PersonKey::from_seed([1; 32]);
    let laptop = DeviceKey::from_seed([2; 32]);
    assert_eq!(
        person.id().to_string(),
        "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    );
    assert_eq!(
        laptop.id().to_string(),
        "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    );
    let body = CertBody::Device {
        kind: None,
        person: person.id(),
        device: laptop.id(),
        name: "laptop".into(),
        admin: true,
        issued_at: 1_700_000_000,
    };
    let cert = Certificate::issue_by_person(body.clone(), &person).unwrap();
    let input = signing_input(&body, cert.signer()).unwrap();
    assert!(input.starts_with(b"iom-cert-v1\0\x82\xa1\x66Device\xa5\x64name"));
    assert_eq!(hex::encode(cert.to_bytes()), CERT_HEX);
    assert_eq!(
        cert.id().to_string(),
        "c93a3763b05ea92aa8b1a12b2e3ded48d70ed196bb7ba787742b7cca161d25df"
    );
    assert_eq!(
        Certificate::from_bytes(&hex::decode(CERT_HEX).unwrap()).unwrap(),
        cert
    );
}

#[test]
fn invite_and_pair_proof_vector() {
    let person = PersonKey::from_seed([1; 32]);
    let laptop = DeviceKey::from_seed([2; 32]);
    let joiner = DeviceKey::from_seed([3; 32]);
    let invite = Invite {
        person: person.id(),
        inviter: laptop.id(),
        addrs: vec!["/ip4/192.168.1.20/udp/4001/quic-v1".into()],
        secret: [7; 32],
        expires_at: 1_700_000_900,
        admin: false,
    };
    let code = invite.encode().unwrap();
    assert!(code.starts_with("iom106k6arb4chs770br48qpjw1m5wrkjche64v3gbhh5rs30bvnchr2yd1g"));
    assert!(code.ends_with("dmxrvt4qfp1xdrzjdkjhn6ay3gd5s6awtzc5t1msakyj2a5qx49g"));
    assert_eq!(Invite::parse(&code, 1_700_000_000).unwrap(), invite);
    assert_eq!(
        invite.id().to_string(),
        "617e3321b4c624f440e07af9bdbc917767465ca461c74255e051ce002bd611fd"
    );
    assert_eq!(
        hex::encode(pair_proof(&invite.secret, &laptop.id(), &joiner.id())),
        "a83a09f1859c863ee26af9e6555f4baf04fec492d725d204e9dce6923cb620e3"
    );
}
