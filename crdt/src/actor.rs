//! Automerge actor ids for iom devices.
//!
//! An actor id is `device id (32 bytes) || 8 random bytes`. The device part names the author of
//! every change in `iom doc log`. The random part is fresh each time a node opens a document, so
//! a device that crashed after making a change it never flushed cannot reuse the same
//! `(actor, seq)` pair for different content (which would corrupt peers).

/// Length of a device id inside an actor id.
pub const DEVICE_ID_LEN: usize = 32;
/// Length of the random suffix of an actor id.
pub const ACTOR_RANDOM_LEN: usize = 8;
/// Length of an iom actor id.
pub const ACTOR_LEN: usize = DEVICE_ID_LEN + ACTOR_RANDOM_LEN;

/// The actor id of the deterministic first change of singleton documents.
pub(crate) const GENESIS_ACTOR: [u8; 16] = [0u8; 16];

/// Builds an actor id from a device id and 8 fresh random bytes supplied by the caller.
pub fn actor_for(device: &[u8; DEVICE_ID_LEN], random: [u8; ACTOR_RANDOM_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ACTOR_LEN);
    out.extend_from_slice(device);
    out.extend_from_slice(&random);
    out
}

/// The device that owns an actor id, if the actor id has the iom shape.
///
/// Returns `None` for other shapes, e.g. the 16 zero bytes of the genesis change of singleton
/// documents.
pub fn author_of(actor: &[u8]) -> Option<[u8; DEVICE_ID_LEN]> {
    if actor.len() != ACTOR_LEN {
        return None;
    }
    actor.get(..DEVICE_ID_LEN)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_carries_device() {
        let dev = [5u8; 32];
        let a = actor_for(&dev, [1; 8]);
        assert_eq!(a.len(), ACTOR_LEN);
        assert_eq!(author_of(&a), Some(dev));
        assert_ne!(a, actor_for(&dev, [2; 8]));
        assert_eq!(author_of(&GENESIS_ACTOR), None);
        assert_eq!(author_of(&[]), None);
    }
}
