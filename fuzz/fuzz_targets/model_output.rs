//! Whatever the model generates: the parser finds a description or says why not; a
//! description it accepts is non-empty, trimmed and free of the format's tags.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let out = prefstream::prompt::parse_output(&text);
    assert_eq!(out.description.is_some(), out.format_ok());
    if let Some(d) = &out.description {
        assert!(!d.is_empty() && d.trim() == d, "accepted {d:?}");
        for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
            assert!(!d.contains(tag), "tag {tag} left in {d:?}");
        }
    }
});
