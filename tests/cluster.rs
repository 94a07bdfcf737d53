//! The state store and the service on a real Redis Cluster: `redis-server --cluster-enabled
//! yes` processes on loopback made into a cluster by `redis-cli --cluster create`. The store's
//! conformance suite and its key-space walks (recovery, staging) across every primary; then the
//! `prefstream` binary on tansu with the cluster: every window to exactly one version through a
//! SIGKILL and a `forget`, and through a slot migration of the busy users' slots mid-stream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prefstream::event::{Event, EventBody};
use prefstream::state::conformance::{self, event};
use prefstream::state::redis::{RedisStore, RedisTls};
use prefstream::state::StateStore;

#[test]
fn conformance_and_key_space_walks_on_three_primaries() {
    let _g = serial();
    let cluster = RedisCluster::start(3, 0);
    tokio::runtime::Runtime::new().unwrap().block_on(store_on(&cluster));
}

async fn store_on(cluster: &RedisCluster) {
    // Several seed URLs select the cluster client.
    let store = RedisStore::open(&cluster.url(), &RedisTls::default(), false).await.unwrap();
    let pong = store.ping().await.unwrap();
    assert!(pong.contains("cluster of 3 primaries"), "{pong}");
    conformance::run_all(&store).await;
    assert!(cluster.keys("*").is_empty(), "left behind: {:?}", cluster.keys("*"));

    // Claimed windows of 30 users, spread by their hash tags over all three primaries: the
    // recovery scan must find every one.
    let users: Vec<String> = (0..30).map(|i| format!("spread-{i}")).collect();
    for u in &users {
        for j in 0..4 {
            store.append(u, &event(u, &format!("{u}-e{j}"), j), 4).await.unwrap();
        }
    }
    for p in cluster.primaries() {
        let size: usize = cluster.cli(p, &["dbsize"]).trim().parse().unwrap();
        assert!(size > 0, "primary {p} holds none of the 30 users");
    }
    let mut found: Vec<String> =
        store.recover(Duration::ZERO).await.unwrap().into_iter().map(|w| w.user_id.clone()).collect();
    found.sort();
    let mut want = users.clone();
    want.sort();
    assert_eq!(found, want, "recovery walks every primary");

    // A staging namespace spread the same way is cleared on every primary.
    let staging = store.with_namespace("replay-test");
    for u in &users {
        staging.append(u, &event(u, &format!("{u}-s"), 0), 4).await.unwrap();
    }
    assert_eq!(staging.users_with("pending").await.unwrap().len(), 30);
    let deleted = staging.clear_namespace().await.unwrap();
    assert!(deleted >= 60, "pending + seen of 30 users, got {deleted}");
    assert!(cluster.keys("replay-test:*").is_empty());
    for u in &users {
        store.forget(u).await.unwrap();
    }
    assert!(cluster.keys("*").is_empty());
}

/// Like `e2e_tansu::sigkill_mid_stream_then_restart_loses_nothing`, on the cluster; then a
/// `forget` erases a user's keys wherever their slot lives.
#[test]
fn service_on_a_cluster_sigkill_then_forget() {
    let _g = serial();
    let cluster = RedisCluster::start(3, 0);
    let broker = Tansu::start();
    broker.create_service_topics(4);
    let brokers = broker.brokers();
    let events = synth_events(12, 42, 41);
    let want = windows(&events);
    let (first, second) = events.split_at(events.len() / 2);
    produce_events(&brokers, first);
    let mut service = Service::start(&brokers, &cluster.url(), "cluster-kill-a", &[]);
    wait_for_versions(&brokers, want / 4, Duration::from_secs(300), &[&service]);
    produce_events(&brokers, second);
    service.kill9();
    let mut restarted = Service::start(&brokers, &cluster.url(), "cluster-kill-b", &[]);
    wait_for_versions(&brokers, want, Duration::from_secs(600), &[&restarted]);
    check_ledger_eventually(&brokers, &events, &cluster, Duration::from_secs(60));

    let gone = events[0].user_id.clone();
    assert!(!cluster.keys(&format!("pref:{{{gone}}}:*")).is_empty());
    let forget = Event { event_id: "forget-1".into(), body: EventBody::Forget, ..events[0].clone() };
    produce_events(&brokers, &[forget]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.keys(&format!("pref:{{{gone}}}:*")).is_empty() {
        assert!(Instant::now() < deadline, "{gone}'s keys outlived the forget:\n{}", restarted.log_text());
        std::thread::sleep(Duration::from_millis(300));
    }
    let tombstone = read_all(&brokers, UPDATES).into_iter().rfind(|r| r.key.as_deref() == Some(gone.as_bytes()));
    assert!(tombstone.is_some_and(|r| r.payload.is_none()), "the tombstone is the forgotten user's last message");
    assert!(restarted.terminate().success());
}

/// The service on `cluster` takes 120 events, then the rest of 720 arrive paced while `fault`
/// breaks the cluster (2 s into the arrivals; it returns what it did, for the record); then
/// every window must be applied exactly once.
fn fault_mid_stream(
    mut cluster: RedisCluster,
    name: &str,
    extra: &[&str],
    fault: impl FnOnce(&mut RedisCluster) -> String,
) {
    let broker = Tansu::start();
    broker.create_service_topics(4);
    let brokers = broker.brokers();
    let events = synth_events(12, 60, 42);
    let (first, rest) = events.split_at(120);
    produce_events(&brokers, first);
    let mut service = Service::start(&brokers, &cluster.url(), name, extra);
    wait_for_versions(&brokers, windows(first), Duration::from_secs(300), &[&service]);

    let producing = produce_paced(&brokers, rest, 12, Duration::from_millis(200));
    std::thread::sleep(Duration::from_secs(2));
    let what = fault(&mut cluster);
    producing.join().unwrap();

    let all = wait_for_versions(&brokers, windows(&events), Duration::from_secs(600), &[&service]);
    check_ledger_eventually(&brokers, &events, &cluster, Duration::from_secs(60));
    let metrics = service.metrics();
    eprintln!(
        "{name}: {what}; {} events, {} publications; redis retries {:?}",
        events.len(),
        all.len(),
        metric_value(&metrics, "prefstream_retries_total{component=\"redis\"}")
    );
    assert!(service.terminate().success());
}

/// Every slot of one primary — a third of the users, all of them busy — moves to another
/// primary with `redis-cli --cluster reshard` while events arrive: scripts meet ASK, MOVED and
/// TRYAGAIN mid-migration and are retried; nothing is lost or applied twice.
#[test]
fn slot_migration_of_busy_users_mid_stream() {
    let _g = serial();
    fault_mid_stream(RedisCluster::start(3, 0), "cluster-reshard", &[], |cluster| {
        let (from, to) = (cluster.primaries()[0], cluster.primaries()[1]);
        let started = Instant::now();
        cluster.reshard(from, to, 5461);
        let took = started.elapsed();
        cluster.wait_ok(Duration::from_secs(30));
        let size: usize = cluster.cli(from, &["dbsize"]).trim().parse().unwrap();
        assert_eq!(size, 0, "every key left the emptied primary");
        format!("reshard of 5461 slots took {took:?}")
    });
}

/// Three primaries with a replica each (6 processes); one primary is SIGKILLed mid-stream and
/// its replica promoted (node timeout 2 s). Writes to its slots fail until the promotion and
/// are retried. Replication is asynchronous: a write the dead primary acknowledged but had not
/// yet sent to its replica is gone, and the ledger would show it; `--redis-wait-replicas 1`
/// makes every accepted write wait for a replica, so that nothing acknowledged can be lost;
/// while the promoted primary has no replica its users wait (3 s here, until the dead node is
/// restarted and rejoins as a replica).
#[test]
fn primary_killed_replica_promoted_mid_stream() {
    let _g = serial();
    let extra = ["--redis-wait-replicas", "1"];
    fault_mid_stream(RedisCluster::start(3, 1), "cluster-failover", &extra, |cluster| {
        let victim = cluster.primaries()[0];
        let killed = Instant::now();
        cluster.nodes[victim].kill();
        cluster.wait_ok(Duration::from_secs(60));
        let promoted = killed.elapsed();
        assert_eq!(cluster.primaries().len(), 3, "a replica took over the dead primary's slots");
        // The promoted primary has no replica, so WAIT 1 holds its users' writes back until
        // the operator brings the dead node back; it rejoins as the new primary's replica.
        std::thread::sleep(Duration::from_secs(3));
        cluster.nodes[victim].restart();
        cluster.wait_ok(Duration::from_secs(60));
        format!("primary killed, replica serving after {promoted:?}")
    });
}

/// Three instances of the service in one consumer group on tansu, with the cluster: one is
/// SIGKILLed and a fourth joins while events arrive; the survivors and the newcomer take over
/// its partitions and its claimed windows, and nothing is lost or applied twice.
#[test]
fn three_instances_one_killed_one_added() {
    let _g = serial();
    let cluster = RedisCluster::start(3, 0);
    let broker = Tansu::start();
    broker.create_service_topics(4);
    let brokers = broker.brokers();
    let url = cluster.url();
    let mut a = Service::start(&brokers, &url, "trio-a", &[]);
    let mut b = Service::start(&brokers, &url, "trio-b", &[]);
    let mut c = Service::start(&brokers, &url, "trio-c", &[]);
    // Let all three join before the load arrives, so each owns partitions.
    std::thread::sleep(Duration::from_secs(8));
    for s in [&a, &b, &c] {
        assert!(s.metric("prefstream_assigned_partitions").unwrap_or(0.0) >= 1.0, "{}", s.log_text());
    }
    let events = synth_events(12, 60, 44);
    let producing = produce_paced(&brokers, &events, 12, Duration::from_millis(400));
    std::thread::sleep(Duration::from_secs(3));
    a.kill9();
    // The newcomer joins after the killed member's session (6 s) has expired. tansu 0.6's
    // coordinator mishandles an expiry that lands inside a rebalance, or with more than one
    // survivor: a member that does not rejoin keeps its old partitions while the leader hands
    // them out again, and one partition stays unowned for good (CI, 2026-12-04: 150 of 180
    // versions after 600 s). A join after the expiry makes every live member rejoin, which
    // puts the group right. Kafka's coordinator does not need this; the service cannot help it.
    std::thread::sleep(Duration::from_secs(10));
    let mut d = Service::start(&brokers, &url, "trio-d", &[]);
    producing.join().unwrap();

    wait_for_versions(&brokers, windows(&events), Duration::from_secs(600), &[&b, &c, &d]);
    check_ledger_eventually(&brokers, &events, &cluster, Duration::from_secs(60));
    for s in [&mut b, &mut c, &mut d] {
        assert!(s.terminate().success(), "{}", s.log_text());
    }
}

/// A TLS-only cluster (clients and the cluster bus): the store works through `rediss://` seeds
/// with the CA that signed the nodes' certificate, and another CA is refused with the flag
/// that fixes it.
#[test]
fn tls_only_cluster_and_a_wrong_ca() {
    let _g = serial();
    let pki = Pki::new();
    let cluster = RedisCluster::start_tls(3, &pki);
    assert!(cluster.url().starts_with("rediss://"));
    let tls = |ca: &str| RedisTls { ca_file: Some(pki.path(ca)), ..Default::default() };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = RedisStore::open(&cluster.url(), &tls("ca.pem"), false).await.unwrap_or_else(|e| panic!("{e}"));
        let pong = store.ping().await.unwrap();
        assert!(pong.contains("cluster of 3 primaries"), "{pong}");
        conformance::run_all(&store).await;
        let Err(err) = RedisStore::open(&cluster.url(), &tls("other-ca.pem"), false).await else {
            panic!("a wrong CA is refused")
        };
        let text = err.to_string();
        eprintln!("cluster with another CA: {text}");
        assert!(text.contains("--redis-ca-file"), "{text}");
    });
}
