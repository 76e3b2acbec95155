//! Fuzz target: arbitrary bytes into the trusted-peer message decoders (see
//! `iom_protocol::fuzzing::fuzz_wire`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iom_protocol::fuzzing::fuzz_wire(data);
});
