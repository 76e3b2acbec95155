//! Printing: JSON for scripts, plain lines for people.

use serde_json::Value;

/// Prints `value` as pretty JSON.
pub fn json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("{value}"),
    }
}

/// A string field, or "".
pub fn s<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Unix seconds as a UTC timestamp.
pub fn time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// Prints `text` as a terminal QR code (or says why it cannot).
pub fn qr(text: &str) {
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(qr) => println!(
            "{}",
            qr.render::<qrcode::render::unicode::Dense1x2>()
                .quiet_zone(true)
                .build()
        ),
        Err(e) => eprintln!("(no QR code: {e})"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_time() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00Z");
        assert_eq!(super::time(1_700_000_000), "2023-11-14 22:13:20Z");
    }
}
