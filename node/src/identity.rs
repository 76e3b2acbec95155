//! This device's keys on disk: `DATA/keys/device.key` (the libp2p identity), the person's public
//! key `DATA/keys/person.pub`, and on the device that created the mesh, `DATA/keys/person.key`.
//! Secret keys are written with mode 0600 in a 0700 directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, RwLock, RwLockReadGuard};

use iom_protocol::cert::{CertBody, CertError, Certificate};
use iom_protocol::keys::{DeviceId, DeviceKey, PersonId, PersonKey};

use crate::time::random_bytes;

/// Why the keys could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file has the wrong size or content.
    #[error("{path} is not a valid key file ({detail}); restore it from a backup or move it away")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A secret key file is readable by others.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// This device's keys.
pub struct Identity {
    /// The device key (also the libp2p identity).
    pub device: DeviceKey,
    /// The person this device belongs to.
    pub person: PersonId,
    /// The person key, only on the device that created the mesh.
    pub person_key: Option<PersonKey>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device", &self.device.id())
            .field("person", &self.person)
            .field("person_key", &self.person_key.is_some())
            .finish()
    }
}

fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    crate::secret_file::write_secret(path, bytes).map_err(io(path))
}

fn read_32(path: &Path, secret: bool) -> Result<Option<[u8; 32]>, IdentityError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    if secret {
        let mode = std::fs::metadata(path)
            .map_err(io(path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(Some)
        .map_err(|_| IdentityError::Malformed {
            path: path.to_path_buf(),
            detail: format!("{} bytes, expected 32", bytes.len()),
        })
}

impl Identity {
    /// Whether `data_dir` already holds a device key.
    pub fn exists(data_dir: &Path) -> bool {
        keys_dir(data_dir).join("device.key").exists()
    }

    /// Creates the keys of a new mesh: a device key and a person key. Returns `None` if the
    /// data dir already has keys (nothing is overwritten).
    pub fn create(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let dir = keys_dir(data_dir);
        if Identity::exists(data_dir) {
            return Ok(None);
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let person_key = PersonKey::from_seed(random_bytes::<32>());
        let device = DeviceKey::from_seed(random_bytes::<32>());
        write_secret(&dir.join("person.key"), &person_key.seed())?;
        write_secret(&dir.join("person.pub"), person_key.id().as_bytes())?;
        write_secret(&dir.join("device.key"), &device.seed())?;
        Ok(Some(Identity {
            person: person_key.id(),
            device,
            person_key: Some(person_key),
        }))
    }

    /// Loads the keys from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Identity, IdentityError> {
        let dir = keys_dir(data_dir);
        let device_path = dir.join("device.key");
        let device = read_32(&device_path, true)?.ok_or_else(|| IdentityError::Malformed {
            path: device_path.clone(),
            detail: "missing".into(),
        })?;
        let person_pub = dir.join("person.pub");
        let person = read_32(&person_pub, false)?.ok_or_else(|| IdentityError::Malformed {
            path: person_pub.clone(),
            detail: "missing".into(),
        })?;
        let person_key = read_32(&dir.join("person.key"), true)?.map(PersonKey::from_seed);
        let person = PersonId::from_bytes(person).map_err(|e| IdentityError::Malformed {
            path: person_pub.clone(),
            detail: e.to_string(),
        })?;
        if let Some(pk) = &person_key
            && pk.id() != person
        {
            return Err(IdentityError::Malformed {
                path: person_pub,
                detail: "person.pub does not match person.key".into(),
            });
        }
        Ok(Identity {
            device: DeviceKey::from_seed(device),
            person,
            person_key,
        })
    }

    /// Switches this device to another person's mesh (after a successful join). The old
    /// person key, if any, is moved aside to `person.key.replaced-<unix time>`, never deleted.
    pub fn adopt_person(&mut self, data_dir: &Path, person: PersonId) -> Result<(), IdentityError> {
        let dir = keys_dir(data_dir);
        let key_path = dir.join("person.key");
        if key_path.exists() {
            let aside = dir.join(format!("person.key.replaced-{}", crate::time::now_secs()));
            std::fs::rename(&key_path, &aside).map_err(io(&key_path))?;
        }
        write_secret(&dir.join("person.pub"), person.as_bytes())?;
        self.person = person;
        self.person_key = None;
        Ok(())
    }
}

/// Stores `key` as this device's person key (a recovery kit imported). Refused unless it is
/// the key of the person in `person.pub`; an existing person key is left as it is.
pub fn install_person_key(data_dir: &Path, key: &PersonKey) -> Result<(), IdentityError> {
    let id = Identity::load(data_dir)?;
    let path = keys_dir(data_dir).join("person.key");
    if key.id() != id.person {
        return Err(IdentityError::Malformed {
            path,
            detail: format!(
                "the imported key is person {}'s, this device belongs to {}",
                key.id(),
                id.person
            ),
        });
    }
    if id.person_key.is_some() {
        return Ok(());
    }
    write_secret(&path, &key.seed())
}

/// Signs `body` with the person key when one is given, else with the device key (an admin
/// device certifies on the person's behalf). The one place certificates are issued.
pub fn issue(
    body: CertBody,
    person_key: Option<&PersonKey>,
    device: &DeviceKey,
) -> Result<Certificate, CertError> {
    match person_key {
        Some(key) => Certificate::issue_by_person(body, key),
        None => Certificate::issue_by_device(body, device),
    }
}

/// This device's keys, shared by the services of a running node. The device key never
/// changes; the person changes once, when the device joins another mesh.
#[derive(Clone)]
pub struct SharedIdentity {
    inner: Arc<RwLock<Identity>>,
    data_dir: Arc<Path>,
}

impl std::fmt::Debug for SharedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.read().fmt(f)
    }
}

impl SharedIdentity {
    /// Shares `identity`, whose files live in `data_dir`.
    pub fn new(identity: Identity, data_dir: &Path) -> SharedIdentity {
        SharedIdentity {
            inner: Arc::new(RwLock::new(identity)),
            data_dir: data_dir.into(),
        }
    }

    /// The keys, read-locked (hold the guard briefly).
    pub fn read(&self) -> RwLockReadGuard<'_, Identity> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.read().device.id()
    }

    /// This device's id as a libp2p PeerId.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.device_id().to_peer_id()
    }

    /// The person this device belongs to.
    pub fn person(&self) -> PersonId {
        self.read().person
    }

    /// Whether this device holds the person key.
    pub fn holds_person_key(&self) -> bool {
        self.read().person_key.is_some()
    }

    /// Issues a certificate with the person key if this device holds it, else with the
    /// device key.
    pub fn issue(&self, body: CertBody) -> Result<Certificate, CertError> {
        let id = self.read();
        issue(body, id.person_key.as_ref(), &id.device)
    }

    /// Installs the person key (a recovery kit imported), on disk and here.
    pub fn install_person_key(&self, key: PersonKey) -> Result<(), IdentityError> {
        let mut id = self.inner.write().unwrap_or_else(|e| e.into_inner());
        install_person_key(&self.data_dir, &key)?;
        id.person_key = Some(key);
        Ok(())
    }

    /// Switches this device to another person's mesh (after a join), on disk and here.
    pub fn adopt_person(&self, person: PersonId) -> Result<(), IdentityError> {
        let mut id = self.inner.write().unwrap_or_else(|e| e.into_inner());
        id.adopt_person(&self.data_dir, person)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_refuse_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::create(dir.path()).unwrap().unwrap();
        assert!(Identity::create(dir.path()).unwrap().is_none());
        let back = Identity::load(dir.path()).unwrap();
        assert_eq!(back.device.id(), id.device.id());
        assert_eq!(back.person, id.person);
        let key = dir.path().join("keys/device.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Permissions { .. })
        ));
    }
}
