//! Fuzz target: arbitrary bytes into the frame decoder (see `iom_protocol::fuzzing::fuzz_frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iom_protocol::fuzzing::fuzz_frame(data);
});
