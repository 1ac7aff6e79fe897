//! Fuzz target: every parser of a Genesys answer (`dialer::fuzzing::genesys_answers`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dialer::fuzzing::genesys_answers(data));
