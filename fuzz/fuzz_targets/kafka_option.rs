//! `-X key=value` and the duration flags, as typed by an operator: parsed or refused.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok((k, v)) = prefstream::kafka::parse_option(s) {
            assert!(!k.is_empty(), "an empty key was accepted from {s:?}");
            let _ = v;
        }
        let _ = prefstream::config::parse_duration(s);
    }
});
