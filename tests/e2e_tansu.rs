//! End to end: the `prefstream` binary against tansu (a Kafka-protocol broker in its own
//! process) and redis-server (AOF, fsync always), with the shipped model. Each test starts its
//! own broker and Redis; they run one at a time (two cores, one model each).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn thousands_of_events_make_exactly_floor_n_over_4_versions() {
    let _g = serial();
    let (broker, redis) = stack();
    // 16 users × 63 events: 15 full windows and a partial one each (1,008 events).
    let events = synth_events(16, 63, 11);
    produce_events(&broker.brokers(), &events);
    let mut service = Service::start(&broker.brokers(), &redis.url(), "bulk", &[]);
    let want = windows(&events);
    wait_for_versions(&broker.brokers(), want, Duration::from_secs(600), &[&service]);
    check_ledger_eventually(&broker.brokers(), &events, &redis, Duration::from_secs(60));
    let metrics = service.metrics();
    assert!(metrics.contains("prefstream_updates_published_total"), "{metrics}");
    assert!(http_get(service.http_port, "/readyz").contains("200 OK"));
    assert!(service.terminate().success(), "SIGTERM exits cleanly:\n{}", service.log_text());
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing() {
    let _g = serial();
    let (broker, redis) = stack();
    let events = synth_events(12, 42, 12);
    let want = windows(&events);
    let (first, second) = events.split_at(events.len() / 2);
    produce_events(&broker.brokers(), first);
    let mut service = Service::start(&broker.brokers(), &redis.url(), "kill-a", &[]);
    wait_for_versions(&broker.brokers(), want / 4, Duration::from_secs(300), &[&service]);
    produce_events(&broker.brokers(), second);
    service.kill9();
    let mut restarted = Service::start(&broker.brokers(), &redis.url(), "kill-b", &[]);
    wait_for_versions(&broker.brokers(), want, Duration::from_secs(600), &[&restarted]);
    check_ledger_eventually(&broker.brokers(), &events, &redis, Duration::from_secs(60));
    assert!(restarted.terminate().success());
}

#[test]
fn two_instances_one_killed_the_other_takes_over() {
    let _g = serial();
    let (broker, redis) = stack();
    let events = synth_events(12, 42, 13);
    let want = windows(&events);
    let mut a = Service::start(&broker.brokers(), &redis.url(), "pair-a", &[]);
    let mut b = Service::start(&broker.brokers(), &redis.url(), "pair-b", &[]);
    // Let both join before the load arrives, so the partitions are split between them.
    std::thread::sleep(Duration::from_secs(8));
    produce_events(&broker.brokers(), &events);
    wait_for_versions(&broker.brokers(), want / 4, Duration::from_secs(300), &[&a, &b]);
    a.kill9();
    wait_for_versions(&broker.brokers(), want, Duration::from_secs(600), &[&b]);
    check_ledger_eventually(&broker.brokers(), &events, &redis, Duration::from_secs(60));
    assert!(b.terminate().success());
}

#[test]
fn redis_restart_mid_run_recovers() {
    let _g = serial();
    let (broker, mut redis) = stack();
    let events = synth_events(12, 42, 14);
    let want = windows(&events);
    let (first, second) = events.split_at(events.len() / 2);
    produce_events(&broker.brokers(), first);
    let mut service = Service::start(&broker.brokers(), &redis.url(), "redis-restart", &[]);
    wait_for_versions(&broker.brokers(), want / 4, Duration::from_secs(300), &[&service]);
    // Redis dies (SIGKILL) while events keep arriving, and comes back with its AOF.
    redis.kill();
    produce_events(&broker.brokers(), second);
    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    wait_for_versions(&broker.brokers(), want, Duration::from_secs(600), &[&service]);
    check_ledger_eventually(&broker.brokers(), &events, &redis, Duration::from_secs(60));
    assert!(service.terminate().success());
}

#[test]
fn malformed_input_goes_to_the_dead_letter_topic_with_reasons() {
    let _g = serial();
    let (broker, redis) = stack();
    let events = synth_events(4, 9, 15);
    let good = events[0].to_json();
    let wrong_version = good.replace("\"schema_version\":1", "\"schema_version\":2");
    let unknown_kind =
        good.replace("\"kind\":\"comparison\"", "\"kind\":\"click\"").replace("\"kind\":\"ugc\"", "\"kind\":\"click\"");
    let huge = format!(
        r#"{{"schema_version":1,"event_id":"big","user_id":"u-big","ts":"2026-11-26T10:00:00Z","kind":"ugc","text":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let user = events[0].user_id.as_bytes();
    // (key, payload, expected reason)
    type Bad<'a> = (Option<&'a [u8]>, &'a [u8], &'a str);
    let bad: Vec<Bad> = vec![
        (Some(user), b"{not json", "not JSON"),
        (Some(user), wrong_version.as_bytes(), "schema violation"),
        (Some(b"u-big"), huge.as_bytes(), "exceeds"),
        (Some(user), b"\xff\xfe\x00garbage", "UTF-8"),
        (Some(user), unknown_kind.as_bytes(), "schema violation"),
        (Some(b"someone-else"), good.as_bytes(), "not the event's user_id"),
    ];
    // Bad records interleaved with the good ones: the pipeline goes on past each.
    let mut records: Vec<(Option<&[u8]>, &[u8])> = Vec::new();
    let payloads: Vec<String> = events.iter().map(|e| e.to_json()).collect();
    for (i, (e, p)) in events.iter().zip(&payloads).enumerate() {
        records.push((Some(e.user_id.as_bytes()), p.as_bytes()));
        if let Some((k, v, _)) = bad.get(i / 4) {
            if i % 4 == 3 {
                records.push((*k, *v));
            }
        }
    }
    produce(&broker.brokers(), EVENTS, &records);
    let mut service = Service::start(&broker.brokers(), &redis.url(), "dlq", &[]);
    wait_for_versions(&broker.brokers(), windows(&events), Duration::from_secs(300), &[&service]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let letters = loop {
        let letters = read_all(&broker.brokers(), DLQ);
        if letters.len() >= bad.len() || std::time::Instant::now() > deadline {
            break letters;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(letters.len(), bad.len(), "every bad record is dead-lettered once: {letters:?}");
    for (key, payload, reason) in &bad {
        let found = letters.iter().find(|l| {
            l.key.as_deref() == *key
                && l.headers.get("prefstream.error").is_some_and(|r| r.contains(reason))
                && l.headers.get("prefstream.original_size") == Some(&payload.len().to_string())
        });
        let l = found.unwrap_or_else(|| panic!("no dead letter with reason {reason:?}: {letters:#?}"));
        assert!(l.headers["prefstream.source"].starts_with("prefstream.events/"));
        let truncated = l.headers["prefstream.truncated"] == "true";
        assert_eq!(truncated, payload.len() > 256 << 10, "only oversize payloads are truncated");
        let kept = l.payload.as_deref().unwrap_or_default();
        assert!(payload.starts_with(kept) && !kept.is_empty(), "the dead letter carries the payload");
    }
    check_ledger_eventually(&broker.brokers(), &events, &redis, Duration::from_secs(60));
    assert!(service.terminate().success());
}
