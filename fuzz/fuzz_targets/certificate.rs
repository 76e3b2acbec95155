//! Fuzz target: arbitrary bytes into the certificate decoder (see `iom_protocol::fuzzing::fuzz_certificate`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iom_protocol::fuzzing::fuzz_certificate(data);
});
