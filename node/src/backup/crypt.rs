//! The age encryption around a backup or a recovery kit: a passphrase (age's scrypt recipient)
//! or an X25519 recipient key (`age1…`), decrypted with the passphrase or the matching
//! identity (`AGE-SECRET-KEY-1…`). No cryptography of our own.

use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::SecretString;

/// How to encrypt.
pub enum Seal {
    /// With a passphrase (scrypt; about a second of work to open, by age's own measure).
    Passphrase(SecretString),
    /// To an X25519 recipient (whoever holds the identity can open it).
    Recipient(Box<age::x25519::Recipient>),
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seal::Passphrase(_) => f.write_str("Seal::Passphrase(..)"),
            Seal::Recipient(r) => write!(f, "Seal::Recipient({r})"),
        }
    }
}

/// How to decrypt.
pub enum Unlock {
    /// With the passphrase.
    Passphrase(SecretString),
    /// With an X25519 identity.
    Identity(Box<age::x25519::Identity>),
}

impl std::fmt::Debug for Unlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unlock::Passphrase(_) => f.write_str("Unlock::Passphrase(..)"),
            Unlock::Identity(_) => f.write_str("Unlock::Identity(..)"),
        }
    }
}

/// Why encryption or decryption failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// The passphrase (or identity) does not open the file.
    #[error(
        "wrong passphrase or key: it does not open this file (a file encrypted to a recipient key \
         needs --identity, a passphrase file needs --passphrase-file)"
    )]
    WrongKey,
    /// Not an age file, or a damaged header.
    #[error("this is not an encrypted iom file (no valid age header): {0}")]
    NotAge(String),
    /// The work factor of the passphrase is more than this machine is willing to spend.
    #[error("{0}")]
    Other(String),
    /// A recipient or identity that does not parse.
    #[error("{0}")]
    BadKey(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Seal {
    /// A recipient from its `age1…` text.
    pub fn recipient(text: &str) -> Result<Seal, CryptError> {
        age::x25519::Recipient::from_str(text.trim())
            .map(|r| Seal::Recipient(Box::new(r)))
            .map_err(|e| {
                CryptError::BadKey(format!("{text:?} is not an age recipient (age1…): {e}"))
            })
    }

    /// Wraps `out`: what is written to the result is encrypted into `out`. Call
    /// [`age::stream::StreamWriter::finish`] at the end (without it the file is truncated and
    /// refused when read).
    pub fn wrap<W: Write>(&self, out: W) -> Result<age::stream::StreamWriter<W>, CryptError> {
        let encryptor = match self {
            Seal::Passphrase(p) => {
                let mut r = age::scrypt::Recipient::new(p.clone());
                // Unit tests: a small work factor (the same format, less work); the shipped
                // binary keeps age's calibration of about a second.
                if cfg!(test) {
                    r.set_work_factor(10);
                }
                age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
                    .map_err(|e| CryptError::Other(e.to_string()))?
            }
            Seal::Recipient(r) => {
                age::Encryptor::with_recipients(std::iter::once(r.as_ref() as &dyn age::Recipient))
                    .map_err(|e| CryptError::Other(e.to_string()))?
            }
        };
        Ok(encryptor.wrap_output(out)?)
    }
}

impl Unlock {
    /// An identity from a file in age's format (`AGE-SECRET-KEY-1…`, `#` comments allowed).
    pub fn identity_file(path: &Path) -> Result<Unlock, CryptError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CryptError::BadKey(format!("cannot read {}: {e}", path.display())))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| {
                CryptError::BadKey(format!("{} holds no age identity", path.display()))
            })?;
        age::x25519::Identity::from_str(line)
            .map(|i| Unlock::Identity(Box::new(i)))
            .map_err(|e| {
                CryptError::BadKey(format!(
                    "{} is not an age identity (AGE-SECRET-KEY-1…): {e}",
                    path.display()
                ))
            })
    }

    /// Opens the age file `input`; the result reads the plaintext. Every read checks the
    /// stream's authentication, and a truncated file fails at its end.
    pub fn open<R: Read>(&self, input: R) -> Result<impl Read + use<R>, CryptError> {
        let decryptor = age::Decryptor::new(input).map_err(decrypt_error)?;
        let reader = match self {
            Unlock::Passphrase(p) => {
                let id = age::scrypt::Identity::new(p.clone());
                decryptor.decrypt(std::iter::once(&id as &dyn age::Identity))
            }
            Unlock::Identity(id) => {
                decryptor.decrypt(std::iter::once(id.as_ref() as &dyn age::Identity))
            }
        }
        .map_err(decrypt_error)?;
        Ok(Damage(reader))
    }
}

fn decrypt_error(e: age::DecryptError) -> CryptError {
    use age::DecryptError as E;
    match e {
        E::DecryptionFailed | E::KeyDecryptionFailed | E::NoMatchingKeys => CryptError::WrongKey,
        E::InvalidHeader | E::UnknownFormat => CryptError::NotAge(e.to_string()),
        E::InvalidMac => CryptError::NotAge("its header was altered".into()),
        E::Io(io) => CryptError::NotAge(io.to_string()),
        other => CryptError::Other(other.to_string()),
    }
}

/// Names a failed read of the plaintext for what it is: damage or truncation (age checks
/// every chunk's tag and the final chunk's flag).
struct Damage<R>(R);

impl<R: Read> Read for Damage<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the archive is damaged or truncated (age refused it: {e})"),
            )
        })
    }
}

/// Reads a passphrase from the first line of `path` (a trailing newline is not part of it).
pub fn passphrase_file(path: &Path) -> Result<SecretString, CryptError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CryptError::BadKey(format!("cannot read {}: {e}", path.display())))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(CryptError::BadKey(format!(
            "{} is empty: its first line is the passphrase",
            path.display()
        )));
    }
    Ok(SecretString::from(line.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Read;

    use super::*;

    fn seal(s: &Seal, plain: &[u8]) -> Vec<u8> {
        let mut w = s.wrap(Vec::new()).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap()
    }

    fn open(u: &Unlock, sealed: &[u8]) -> Result<Vec<u8>, CryptError> {
        let mut r = u.open(sealed)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn recipient_round_trip_and_wrong_identity() {
        let id = age::x25519::Identity::generate();
        let sealed = seal(
            &Seal::recipient(&id.to_public().to_string()).unwrap(),
            b"secret",
        );
        assert_eq!(
            open(&Unlock::Identity(Box::new(id)), &sealed).unwrap(),
            b"secret"
        );
        let other = Unlock::Identity(Box::new(age::x25519::Identity::generate()));
        assert!(matches!(open(&other, &sealed), Err(CryptError::WrongKey)));
        let pass = Unlock::Passphrase(SecretString::from("x".to_string()));
        assert!(matches!(open(&pass, &sealed), Err(CryptError::WrongKey)));
    }

    #[test]
    fn truncation_and_tampering_fail_on_read() {
        let id = age::x25519::Identity::generate();
        let seal_to = Seal::recipient(&id.to_public().to_string()).unwrap();
        let plain = vec![7u8; 200_000];
        let sealed = seal(&seal_to, &plain);
        let unlock = Unlock::Identity(Box::new(id));
        let cut = &sealed[..sealed.len() - 1000];
        let err = open(&unlock, cut).unwrap_err();
        assert!(err.to_string().contains("damaged or truncated"), "{err}");
        let mut flipped = sealed.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        let err = open(&unlock, &flipped).unwrap_err();
        assert!(err.to_string().contains("damaged or truncated"), "{err}");
        assert!(matches!(
            open(&unlock, b"not age at all"),
            Err(CryptError::NotAge(_))
        ));
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(
            Seal::recipient("age1nope")
                .unwrap_err()
                .to_string()
                .contains("not an age recipient")
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id");
        std::fs::write(&p, "# comment\nnot a key\n").unwrap();
        assert!(
            Unlock::identity_file(&p)
                .unwrap_err()
                .to_string()
                .contains("not an age identity")
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(
            passphrase_file(&p)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
