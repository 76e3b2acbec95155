//! The relay's stable identity: a 32-byte ed25519 seed in `DATA/relay.key` (mode 0600), made on
//! first run. The same data dir always gives the same `PeerId`, so the addresses users copy
//! into `iom node run --relay` stay valid across restarts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use super::server::RelayError;
use crate::time::random_bytes;

/// Where the relay key lives in `data_dir`.
pub fn relay_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("relay.key")
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RelayError + '_ {
    move |source| RelayError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the relay key from `data_dir`, creating the directory (0700) and a fresh key (0600)
/// if there is none. Refuses a key file that others can read or that is not 32 bytes.
pub fn load_or_create_relay_key(data_dir: &Path) -> Result<Keypair, RelayError> {
    let path = relay_key_path(data_dir);
    let seed = match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path)
                .map_err(io_err(&path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(RelayError::KeyPermissions { path, mode });
            }
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| RelayError::MalformedKey {
                path: path.clone(),
                len: bytes.len(),
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !data_dir.exists() {
                std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
                std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(data_dir))?;
            }
            let seed = random_bytes::<32>();
            write_secret(&path, &seed)?;
            seed
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    Keypair::ed25519_from_bytes(seed).map_err(|_| RelayError::MalformedKey { path, len: 32 })
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), RelayError> {
    crate::secret_file::write_secret(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("relay");
        let a = load_or_create_relay_key(&data).unwrap();
        let b = load_or_create_relay_key(&data).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let path = relay_key_path(&data);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_relay_key(&data),
            Err(RelayError::KeyPermissions { .. })
        ));
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create_relay_key(&data),
            Err(RelayError::MalformedKey { len: 5, .. })
        ));
    }
}
