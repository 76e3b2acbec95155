//! The recovery kit: the person key, encrypted with a passphrase (age scrypt, ASCII-armored so
//! it can be printed or shown as a QR code), and the same key as words
//! ([`iom_protocol::recovery_words`]).
//!
//! The kit's plaintext is three lines:
//!
//! ```text
//! iom recovery kit 1
//! person <person id>
//! key iomk1-xxxxx-…
//! ```
//!
//! Importing checks the passphrase (age), the words' checksum, and that the key is the person
//! key of the person named in the kit and of this device's mesh.

use std::io::{Read, Write};

use age::secrecy::SecretString;
use iom_protocol::keys::{PersonId, PersonKey};
use iom_protocol::recovery_words::{self, WordsError};

use super::crypt::{CryptError, Seal, Unlock};

/// The first line of a kit's plaintext.
pub const KIT_HEADER: &str = "iom recovery kit 1";

/// Why a kit could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The passphrase does not open the kit.
    #[error("wrong passphrase: it does not open this recovery kit")]
    WrongPassphrase,
    /// The kit is damaged (its armor, header or content).
    #[error("the recovery kit is damaged: {0}")]
    Damaged(String),
    /// The written words are wrong.
    #[error(transparent)]
    Words(#[from] WordsError),
    /// The key belongs to another person.
    #[error(
        "this recovery kit holds the key of person {found}, but this device belongs to {expected}"
    )]
    OtherPerson {
        /// The kit's person.
        found: String,
        /// This device's person.
        expected: String,
    },
    /// Writing the kit failed.
    #[error("{0}")]
    Io(String),
}

/// Writes the kit of `key`, encrypted with `passphrase`, as ASCII armor.
pub fn export(key: &PersonKey, passphrase: SecretString) -> Result<String, KitError> {
    let plain = format!(
        "{KIT_HEADER}\nperson {}\nkey {}\n",
        key.id(),
        recovery_words::encode(&key.seed())
    );
    let io = |e: std::io::Error| KitError::Io(e.to_string());
    let armor = age::armor::ArmoredWriter::wrap_output(Vec::new(), age::armor::Format::AsciiArmor)
        .map_err(io)?;
    let mut w = Seal::Passphrase(passphrase)
        .wrap(armor)
        .map_err(|e| KitError::Io(e.to_string()))?;
    w.write_all(plain.as_bytes()).map_err(io)?;
    let armor = w.finish().map_err(io)?;
    let bytes = armor.finish().map_err(io)?;
    String::from_utf8(bytes).map_err(|e| KitError::Io(e.to_string()))
}

/// Reads a kit written by [`export`] and returns its key.
pub fn import(kit: &[u8], passphrase: SecretString) -> Result<PersonKey, KitError> {
    let reader = age::armor::ArmoredReader::new(kit);
    let mut plain = Unlock::Passphrase(passphrase)
        .open(reader)
        .map_err(|e| match e {
            CryptError::WrongKey => KitError::WrongPassphrase,
            other => KitError::Damaged(other.to_string()),
        })?;
    let mut text = String::new();
    plain
        .by_ref()
        .take(4096)
        .read_to_string(&mut text)
        .map_err(|e| KitError::Damaged(e.to_string()))?;
    parse(&text)
}

/// Reads a kit's plaintext.
fn parse(text: &str) -> Result<PersonKey, KitError> {
    let mut lines = text.lines();
    if lines.next() != Some(KIT_HEADER) {
        return Err(KitError::Damaged(format!(
            "it does not start with {KIT_HEADER:?}"
        )));
    }
    let person = lines
        .next()
        .and_then(|l| l.strip_prefix("person "))
        .and_then(|p| p.parse::<PersonId>().ok())
        .ok_or_else(|| KitError::Damaged("no person line".into()))?;
    let words = lines
        .next()
        .and_then(|l| l.strip_prefix("key "))
        .ok_or_else(|| KitError::Damaged("no key line".into()))?;
    let key = PersonKey::from_seed(recovery_words::decode(words)?);
    if key.id() != person {
        return Err(KitError::Damaged(
            "its key is not the key of its person".into(),
        ));
    }
    Ok(key)
}

/// The key written as words.
pub fn from_words(words: &str) -> Result<PersonKey, KitError> {
    Ok(PersonKey::from_seed(recovery_words::decode(words)?))
}

/// Checks that `key` is `expected`'s person key.
pub fn check_person(key: &PersonKey, expected: &PersonId) -> Result<(), KitError> {
    if &key.id() != expected {
        return Err(KitError::OtherPerson {
            found: key.id().to_string(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pass(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[test]
    fn export_import_and_words() {
        let key = PersonKey::from_seed([5; 32]);
        let kit = export(&key, pass("correct horse")).unwrap();
        assert!(
            kit.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"),
            "{kit}"
        );
        let back = import(kit.as_bytes(), pass("correct horse")).unwrap();
        assert_eq!(back.id(), key.id());
        let words = recovery_words::encode(&key.seed());
        assert_eq!(from_words(&words).unwrap().id(), key.id());
        check_person(&back, &key.id()).unwrap();
        let other = PersonKey::from_seed([6; 32]).id();
        assert!(matches!(
            check_person(&back, &other),
            Err(KitError::OtherPerson { .. })
        ));
    }

    #[test]
    fn wrong_passphrase_and_damage_are_named() {
        let key = PersonKey::from_seed([5; 32]);
        let kit = export(&key, pass("right")).unwrap();
        assert!(matches!(
            import(kit.as_bytes(), pass("wrong")),
            Err(KitError::WrongPassphrase)
        ));
        // Damage in the middle of the armor.
        let mut damaged = kit.clone().into_bytes();
        let at = damaged.len() / 2;
        damaged[at] = if damaged[at] == b'A' { b'B' } else { b'A' };
        let err = import(&damaged, pass("right")).unwrap_err();
        assert!(matches!(err, KitError::Damaged(_)), "{err}");
        assert!(matches!(
            import(b"hello", pass("right")),
            Err(KitError::Damaged(_))
        ));
        // Words with a typo.
        let mut words = recovery_words::encode(&key.seed());
        let last = words.pop().unwrap();
        words.push(if last == 'a' { 'b' } else { 'a' });
        let typo = words.replacen("iomk1-", "iomk1-z", 1);
        assert!(from_words(&typo).is_err());
        assert!(parse("iom recovery kit 1\nperson x\nkey y\n").is_err());
    }
}
