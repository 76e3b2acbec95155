//! Fuzz target: arbitrary bytes into the invite decoder (see `iom_protocol::fuzzing::fuzz_invite`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iom_protocol::fuzzing::fuzz_invite(data);
});
