//! A Kafka record as the consumer hands it over: optional key, payload bytes. The first byte
//! picks whether there is a key and how long it is; whatever the verdict, no panic, and an
//! accepted event is keyed by its own user.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prefstream::pipeline::{classify, Verdict};

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let (key, payload) = if head & 0x80 == 0 {
        (None, rest)
    } else {
        let n = usize::from(head & 0x7f).min(rest.len());
        (Some(&rest[..n]), &rest[n..])
    };
    if let Verdict::Event(e) = classify(key, Some(payload), 1 << 20) {
        if let Some(k) = key {
            assert_eq!(k, e.user_id.as_bytes(), "an event whose key is not its user was accepted");
        }
    }
});
