//! The person key written as words, for a recovery kit on paper.
//!
//! Format: `iomk1` then twelve groups of five characters of the invite alphabet
//! (Crockford-style base32: `0-9a-z` without `i l o u`), separated by `-` or spaces. The 60
//! characters carry 37 bytes: a version byte (`1`), the 32-byte key seed and a 4-byte checksum,
//! the first four bytes of `SHA-256("iom recovery words" ‖ version ‖ seed)`. Decoding accepts
//! upper case, `o` for `0` and `i`/`l` for `1`, and any separators; a mistyped character fails
//! the checksum (a wrong key is never accepted silently).

use sha2::{Digest, Sha256};

use crate::base32;

/// The prefix of a written key.
pub const PREFIX: &str = "iomk1";
/// The version byte inside.
const VERSION: u8 = 1;
/// Characters per group.
const GROUP: usize = 5;
/// Bytes encoded: version, seed, checksum.
const PAYLOAD: usize = 1 + 32 + 4;
/// Characters encoded (37 bytes are 296 bits, 60 characters of 5 bits; 4 padding bits).
const CHARS: usize = 60;

/// Why written words did not decode to a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WordsError {
    /// The text does not start with `iomk1`.
    #[error("recovery words start with {PREFIX:?}; this text does not")]
    Prefix,
    /// A character outside the alphabet.
    #[error("{0:?} is not a character of recovery words (0-9 and a-z without u)")]
    Character(char),
    /// Too few or too many characters.
    #[error("recovery words have {CHARS} characters after {PREFIX:?}, this has {0}")]
    Length(usize),
    /// The checksum does not match: a character is mistyped.
    #[error("the recovery words do not check out: a character is mistyped or missing")]
    Checksum,
    /// A newer version of the format.
    #[error("recovery words of version {0}; this iom reads version {VERSION}")]
    Version(u8),
}

fn checksum(version: u8, seed: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(b"iom recovery words");
    h.update([version]);
    h.update(seed);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// Writes `seed` as `iomk1` and twelve groups of five characters joined by `-`.
pub fn encode(seed: &[u8; 32]) -> String {
    let mut payload = Vec::with_capacity(PAYLOAD);
    payload.push(VERSION);
    payload.extend_from_slice(seed);
    payload.extend_from_slice(&checksum(VERSION, seed));
    let chars = base32::encode(&payload);
    let mut out = String::from(PREFIX);
    for (i, ch) in chars.chars().enumerate() {
        if i % GROUP == 0 {
            out.push('-');
        }
        out.push(ch);
    }
    out
}

/// Reads words written by [`encode`] back into the seed.
pub fn decode(text: &str) -> Result<[u8; 32], WordsError> {
    let text = text.trim();
    let body = text
        .get(..PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PREFIX))
        .map(|_| &text[PREFIX.len()..])
        .ok_or(WordsError::Prefix)?;
    let mut decoder = base32::Decoder::default();
    let mut count = 0;
    for ch in body.chars() {
        if ch == '-' || ch.is_whitespace() {
            continue;
        }
        let v = base32::value(ch).ok_or(WordsError::Character(ch))?;
        decoder.push(v);
        count += 1;
    }
    if count != CHARS {
        return Err(WordsError::Length(count));
    }
    let (bytes, _) = decoder.finish();
    if bytes.len() != PAYLOAD {
        return Err(WordsError::Length(count));
    }
    let version = bytes[0];
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&bytes[1..33]);
    if checksum(version, &seed) != bytes[33..37] {
        return Err(WordsError::Checksum);
    }
    if version != VERSION {
        return Err(WordsError::Version(version));
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn twelve_groups_of_five_after_the_prefix() {
        let words = encode(&[7; 32]);
        let groups: Vec<&str> = words.split('-').collect();
        assert_eq!(groups[0], PREFIX);
        assert_eq!(groups.len(), 13);
        assert!(groups[1..].iter().all(|g| g.len() == 5), "{words}");
        assert_eq!(decode(&words), Ok([7; 32]));
    }

    #[test]
    fn separators_case_and_lookalikes_are_forgiven() {
        let words = encode(&[0; 32]);
        let spaced = words.replace('-', " ").to_uppercase();
        assert_eq!(decode(&spaced), Ok([0; 32]));
        // All-zero seeds start with many zeros: write them as the letter o.
        let oh = words.replacen("00", "oO", 1);
        assert_eq!(decode(&oh), Ok([0; 32]));
    }

    #[test]
    fn errors_are_named() {
        let words = encode(&[9; 32]);
        assert_eq!(decode("hello"), Err(WordsError::Prefix));
        assert_eq!(
            decode(&words[..words.len() - 1]),
            Err(WordsError::Length(59))
        );
        assert_eq!(decode(&format!("{words}x")), Err(WordsError::Length(61)));
        assert_eq!(
            decode(&words.replacen('-', "-u", 1)),
            Err(WordsError::Character('u'))
        );
    }

    proptest! {
        #[test]
        fn any_seed_round_trips(seed in any::<[u8; 32]>()) {
            prop_assert_eq!(decode(&encode(&seed)), Ok(seed));
        }

        #[test]
        fn any_single_substitution_is_caught(seed in any::<[u8; 32]>(), pos in 0usize..60, delta in 1u8..32) {
            let words = encode(&seed);
            let mut chars: Vec<char> = words[PREFIX.len()..].chars().filter(|c| *c != '-').collect();
            let alphabet: Vec<char> = "0123456789abcdefghjkmnpqrstvwxyz".chars().collect();
            let idx = alphabet.iter().position(|c| *c == chars[pos]).unwrap_or(0);
            chars[pos] = alphabet[(idx + usize::from(delta)) % 32];
            let typo: String = chars.into_iter().collect();
            let got = decode(&format!("{PREFIX}{typo}"));
            // The last character carries 4 padding bits; a change there may only touch them.
            if pos == 59 {
                prop_assert!(got.is_err() || got == Ok(seed));
            } else {
                prop_assert!(got.is_err(), "typo at {} accepted", pos);
            }
        }
    }
}
