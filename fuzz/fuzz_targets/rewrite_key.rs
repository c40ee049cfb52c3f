//! Fuzz the job options' validation and the key rewrite together (see ../check.rs).
#![no_main]

#[path = "../check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
