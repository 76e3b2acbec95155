//! Wall-clock reads, kept in one place so the pure crates never read a clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all; there is no sane
    // fallback for key material, so that is fatal.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_agree() {
        let (s, ms) = (now_secs(), now_millis());
        assert!(s > 1_600_000_000, "after 2020");
        assert!(ms / 1000 >= s && ms / 1000 <= s + 1);
    }

    #[test]
    fn random_bytes_differ_between_calls() {
        let (a, b) = (random_bytes::<16>(), random_bytes::<16>());
        assert_ne!(a, b);
        assert_eq!(random_bytes::<0>(), [0u8; 0]);
    }
}
