//! Fuzz target: the dial job parser (`dialer::fuzzing::job_parser`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dialer::fuzzing::job_parser(data));
