//! Bearer tokens for the HTTP listener, kept in the node's local state (not synced: a token is
//! for one device's listener). Only a SHA-256 hash of each token is stored; the token itself is
//! shown once, when it is created.
//!
//! A token reads `iom_` followed by 48 hex characters (24 random bytes).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// State key prefix of token records.
const PREFIX: &str = "http/token/";

/// A stored token (without the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short public id (8 hex characters), used to revoke.
    pub id: String,
    /// A name chosen by the user.
    pub name: String,
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// A token that was just created: the only time the secret is known.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    /// The record as stored.
    #[serde(flatten)]
    pub record: TokenRecord,
    /// The token to send as `Authorization: Bearer TOKEN`.
    pub token: String,
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The name is unusable.
    #[error("a token name is 1 to 64 printable characters")]
    BadName,
}

fn hash(token: &str) -> String {
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    hex::encode(digest)
}

/// Creates a token named `name`; returns it with its secret.
pub async fn create(store: &Store, name: Option<&str>) -> Result<NewToken, TokenError> {
    let id = hex::encode(crate::time::random_bytes::<4>());
    let name = name.map(str::trim).unwrap_or("").to_string();
    let name = if name.is_empty() {
        format!("token-{id}")
    } else {
        name
    };
    if name.len() > 64 || name.chars().any(char::is_control) {
        return Err(TokenError::BadName);
    }
    let token = format!("iom_{}", hex::encode(crate::time::random_bytes::<24>()));
    let record = TokenRecord {
        id: id.clone(),
        name,
        hash: hash(&token),
        created_at: crate::time::now_secs(),
    };
    let bytes = serde_json::to_vec(&record).unwrap_or_default();
    store.state_put(format!("{PREFIX}{id}").as_bytes(), &bytes)?;
    store.flush().await?;
    Ok(NewToken { record, token })
}

/// Every token record, oldest first.
pub fn list(store: &Store) -> Result<Vec<TokenRecord>, TokenError> {
    let mut out: Vec<TokenRecord> = store
        .state_scan(PREFIX.as_bytes())?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(out)
}

/// Whether any token exists.
pub fn any(store: &Store) -> Result<bool, TokenError> {
    Ok(!list(store)?.is_empty())
}

/// Revokes a token by id (or by its unique name). Returns the revoked record, if one matched.
pub async fn revoke(store: &Store, id_or_name: &str) -> Result<Option<TokenRecord>, TokenError> {
    let all = list(store)?;
    let found = all.iter().find(|t| t.id == id_or_name).or_else(|| {
        let named: Vec<&TokenRecord> = all.iter().filter(|t| t.name == id_or_name).collect();
        (named.len() == 1).then(|| named[0])
    });
    let Some(t) = found.cloned() else {
        return Ok(None);
    };
    store.state_remove(format!("{PREFIX}{}", t.id).as_bytes())?;
    store.flush().await?;
    Ok(Some(t))
}

/// The record of a presented token, if it is valid.
pub fn verify(store: &Store, token: &str) -> Result<Option<TokenRecord>, TokenError> {
    if !token.starts_with("iom_") || token.len() > 128 {
        return Ok(None);
    }
    let h = hash(token);
    Ok(list(store)?.into_iter().find(|t| eq_ct(&t.hash, &h)))
}

/// Constant-time string equality (for equal lengths; different lengths are unequal at once).
pub fn eq_ct(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(!any(&store).unwrap());
        let t = create(&store, Some("ci")).await.unwrap();
        assert!(t.token.starts_with("iom_"));
        assert_eq!(verify(&store, &t.token).unwrap().unwrap().id, t.record.id);
        assert!(verify(&store, "iom_nope").unwrap().is_none());
        assert!(verify(&store, "").unwrap().is_none());
        // Only the hash is stored.
        let raw = store.state_scan(PREFIX.as_bytes()).unwrap();
        assert!(
            !raw.iter()
                .any(|(_, v)| String::from_utf8_lossy(v).contains(&t.token))
        );
        assert_eq!(revoke(&store, "ci").await.unwrap().unwrap().id, t.record.id);
        assert!(verify(&store, &t.token).unwrap().is_none());
        assert!(revoke(&store, "ci").await.unwrap().is_none());
        assert!(create(&store, Some("a\nb")).await.is_err());
    }
}
