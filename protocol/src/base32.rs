//! Crockford-style base32 for invite codes: lowercase, no padding.
//!
//! The alphabet is `0-9` and `a-z` without `i l o u`. Decoding is forgiving the Crockford way:
//! upper case is accepted, `o` reads as `0`, and `i`/`l` read as `1`. Skipping separators is the
//! caller's job.

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Encodes `bytes` (5 bits per character, most significant bit first, zero-padded at the end).
pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &byte in bytes {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The 5-bit value of one character, if it is in the (forgiving) alphabet.
pub(crate) fn value(ch: char) -> Option<u8> {
    let ch = ch.to_ascii_lowercase();
    match ch {
        'o' => Some(0),
        'i' | 'l' => Some(1),
        'u' => None,
        _ => ALPHABET
            .iter()
            .position(|&a| char::from(a) == ch)
            .and_then(|p| u8::try_from(p).ok()),
    }
}

/// Accumulates 5-bit values into bytes.
#[derive(Default)]
pub(crate) struct Decoder {
    bytes: Vec<u8>,
    acc: u32,
    bits: u32,
}

impl Decoder {
    /// Adds one 5-bit value.
    pub(crate) fn push(&mut self, value: u8) {
        self.acc = (self.acc << 5) | u32::from(value & 31);
        self.bits += 5;
        if self.bits >= 8 {
            self.bits -= 8;
            self.bytes.push(((self.acc >> self.bits) & 0xff) as u8);
            self.acc &= (1 << self.bits) - 1;
        }
    }

    /// The decoded bytes, and whether the input was a well-formed encoding (fewer than 5
    /// leftover bits, all zero).
    pub(crate) fn finish(self) -> (Vec<u8>, bool) {
        let clean = self.bits < 5 && self.acc == 0;
        (self.bytes, clean)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode(text: &str) -> Option<(Vec<u8>, bool)> {
        let mut decoder = Decoder::default();
        for ch in text.chars() {
            decoder.push(value(ch)?);
        }
        Some(decoder.finish())
    }

    #[test]
    fn known_values() {
        assert_eq!(encode(b""), "");
        assert_eq!(encode(&[0xff]), "zw");
        assert_eq!(encode(b"f"), "cr");
        assert_eq!(encode(&[0, 0, 0, 0, 0]), "00000000");
        assert_eq!(decode("ZW"), Some((vec![0xff], true)));
        assert_eq!(
            decode("zz"),
            Some((vec![0xff], false)),
            "non-zero padding bits"
        );
    }

    #[test]
    fn forgiving_and_forbidden_letters() {
        assert_eq!(value('O'), Some(0));
        assert_eq!(value('I'), Some(1));
        assert_eq!(value('l'), Some(1));
        assert_eq!(value('u'), None);
        assert_eq!(value('!'), None);
        assert_eq!(value('é'), None);
        for &a in ALPHABET {
            assert!(!b"ilou".contains(&a));
        }
    }

    proptest! {
        #[test]
        fn round_trips(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            let text = encode(&bytes);
            prop_assert_eq!(decode(&text), Some((bytes.clone(), true)));
            prop_assert_eq!(decode(&text.to_uppercase()), Some((bytes, true)));
        }
    }
}
