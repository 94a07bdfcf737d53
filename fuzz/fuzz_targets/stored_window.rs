//! A window's JSON as read back from Redis: parsed or refused as corrupt, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = std::str::from_utf8(data) {
        let _ = prefstream::state::redis::window_from("fuzz-user", body);
    }
});
