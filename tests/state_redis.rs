//! The Redis state store against a real `redis-server` (started here on a free port, killed on
//! drop): the shared conformance suite, true concurrency, the key layout contract, bounded
//! memories, reconnect after a server restart, and `SCRIPT FLUSH`.

use prefstream::state::conformance::{self, event};
use prefstream::state::redis::{key, RedisStore};
use prefstream::state::{AppendOutcome, ApplyOutcome, StateStore, Window};
use std::sync::Arc;

mod common;
use common::{Pki, RedisServer};

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

#[tokio::test]
async fn redis_store_conformance() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    conformance::run_all(&store).await;
    // Everything the suite created was forgotten again: no keys left behind.
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw(&server.url()).await).await.unwrap();
    assert!(keys.is_empty(), "left behind: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_tasks_same_forty_events_make_ten_windows() {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&server.url()).await.unwrap());
    let u = "concurrent-user";
    let events: Arc<Vec<_>> = Arc::new((0..40).map(|i| event(u, &format!("ev-{i:02}"), i)).collect());
    let mut tasks = Vec::new();
    for k in 0..8 {
        let (store, events) = (store.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let (mut windows, mut dups) = (Vec::new(), 0);
            for j in 0..events.len() {
                // Each task starts at a different offset so appends of one event race.
                match store.append(u, &events[(j + k * 5) % events.len()], 4).await.unwrap() {
                    AppendOutcome::Full(w) => windows.push(w),
                    AppendOutcome::Duplicate => dups += 1,
                    AppendOutcome::Pending(_) => {}
                }
            }
            (windows, dups)
        }));
    }
    let mut windows: Vec<Window> = Vec::new();
    let mut dups = 0;
    for t in tasks {
        let (w, d) = t.await.unwrap();
        windows.extend(w);
        dups += d;
    }
    assert_eq!(windows.len(), 10);
    assert_eq!(dups, 7 * 40);
    let mut ids: Vec<String> = windows.iter().flat_map(Window::event_ids).collect();
    assert_eq!(ids.len(), 40);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "an event landed in two windows");
    assert_eq!(store.pending_len(u).await.unwrap(), 0);
    let mut inflight = store.inflight(u).await.unwrap();
    inflight.sort_by(|a, b| a.id.cmp(&b.id));
    windows.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(inflight, windows);
}

#[tokio::test]
async fn key_layout_contract() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut c = raw(&server.url()).await;
    let u = "user:{odd}";
    for i in 0..4 {
        store.append(u, &event(u, &format!("k{i}"), i), 4).await.unwrap();
    }
    let w = store.inflight(u).await.unwrap().remove(0);
    // One failed attempt first: its count must be gone once the window is applied and complete.
    store.fail(u, &w.id, "invalid output", 3).await.unwrap();
    store.apply(u, &w.id, 0, "likes brevity", &w.event_ids(), "tiny-v1").await.unwrap();
    store.complete(u, &w.id).await.unwrap();
    store.append(u, &event(u, "k9", 9), 4).await.unwrap();

    assert_eq!(key(u, "desc"), "pref:{user:{odd}}:desc");
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    keys.sort();
    let expected: Vec<String> = ["applied", "desc", "pending", "seen", "seq"].iter().map(|s| key(u, s)).collect();
    assert_eq!(keys, expected);
    // Every key of the user has the same Cluster hash tag (first `{` to the next `}`), hence
    // the same slot.
    let tag = |k: &str| {
        let open = k.find('{').unwrap();
        let close = open + k[open..].find('}').unwrap();
        k[open + 1..close].to_string()
    };
    assert!(keys.iter().all(|k| tag(k) == "user:{odd"), "{keys:?}");
    let desc: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(key(u, "desc")).query_async(&mut c).await.unwrap();
    let mut fields: Vec<&str> = desc.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(fields, ["description", "event_ids", "model", "updated_at", "version"]);
    assert_eq!(desc["version"], "1");
    assert_eq!(desc["event_ids"], r#"["k0","k1","k2","k3"]"#);
    let pending: Vec<String> =
        redis::cmd("LRANGE").arg(key(u, "pending")).arg(0).arg(-1).query_async(&mut c).await.unwrap();
    assert_eq!(pending, [event(u, "k9", 9).to_json()]);
    store.forget(u).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn dedupe_and_applied_memories_are_bounded() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap().with_caps(3, 2);
    let mut c = raw(&server.url()).await;
    let u = "bounded";
    for i in 0..5 {
        let o = store.append(u, &event(u, &format!("s{i}"), i), 100).await.unwrap();
        assert_eq!(o, AppendOutcome::Pending(i as usize + 1));
    }
    let n: i64 = redis::cmd("ZCARD").arg(key(u, "seen")).query_async(&mut c).await.unwrap();
    assert_eq!(n, 3);
    assert_eq!(store.append(u, &event(u, "s4", 4), 100).await.unwrap(), AppendOutcome::Duplicate);
    assert_eq!(store.append(u, &event(u, "s2", 2), 100).await.unwrap(), AppendOutcome::Duplicate);
    assert_eq!(store.append(u, &event(u, "s0", 0), 100).await.unwrap(), AppendOutcome::Pending(6));

    let ids = vec!["x".to_string()];
    for (v, w) in ["w1", "w2", "w3"].iter().enumerate() {
        let r = store.apply_unclaimed(u, w, v as u64, "d", &ids, "m").await.unwrap();
        assert_eq!(r, ApplyOutcome::Applied(v as u64 + 1));
    }
    assert_eq!(store.apply_unclaimed(u, "w2", 0, "d", &ids, "m").await.unwrap(), ApplyOutcome::AlreadyApplied(2));
    assert_eq!(store.apply_unclaimed(u, "w1", 0, "d", &ids, "m").await.unwrap(), ApplyOutcome::Conflict(3));
    assert_eq!(store.apply(u, "w4", 3, "d", &ids, "m").await.unwrap(), ApplyOutcome::NotClaimed);
}

#[tokio::test]
async fn reconnects_after_server_restart() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let u = "restart";
    assert_eq!(store.append(u, &event(u, "r1", 1), 4).await.unwrap(), AppendOutcome::Pending(1));

    server.restart(); // same port
                      // No persistence: the data is gone, but the store reconnects (one internal retry).
    assert_eq!(store.pending_len(u).await.unwrap(), 0);
    assert_eq!(store.append(u, &event(u, "r1", 1), 4).await.unwrap(), AppendOutcome::Pending(1));
    for i in 2..=4 {
        store.append(u, &event(u, &format!("r{i}"), i), 4).await.unwrap();
    }
    let w = store.inflight(u).await.unwrap().remove(0);
    assert_eq!(store.apply(u, &w.id, 0, "d", &w.event_ids(), "m").await.unwrap(), ApplyOutcome::Applied(1));
}

#[tokio::test]
async fn scripts_survive_script_flush() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut c = raw(&server.url()).await;
    let u = "flush";
    store.append(u, &event(u, "x1", 1), 2).await.unwrap();
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    let w = match store.append(u, &event(u, "x2", 2), 2).await.unwrap() {
        AppendOutcome::Full(w) => w,
        other => panic!("{other:?}"),
    };
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    assert_eq!(store.apply(u, &w.id, 0, "d", &w.event_ids(), "m").await.unwrap(), ApplyOutcome::Applied(1));
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    store.append(u, &event(u, "x3", 3), 1).await.unwrap();
    let w = store.inflight(u).await.unwrap().remove(0);
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    assert_eq!(store.fail(u, &w.id, "bad", 0).await.unwrap(), prefstream::state::FailOutcome::Parked);
    assert_eq!(store.parked(u).await.unwrap()[0].window, w);
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    assert_eq!(store.take_partial(u, 4).await.unwrap(), None);
}

/// A TLS-only redis-server with the test CA's server certificate; `auth_clients` is
/// `tls-auth-clients` (`yes`: a client certificate is required).
fn tls_redis(pki: &Pki, auth_clients: &str) -> RedisServer {
    RedisServer::start_tls(pki.server_args(auth_clients))
}

/// `rediss://` (issue 28 item 2): the store works through TLS with the CA that signed the
/// server; a wrong CA, a plain URL with TLS files, and a missing client certificate where the
/// server requires one are each refused with an error that names the flag to fix.
#[tokio::test]
async fn rediss_with_the_right_ca_and_client_certificates_and_clear_refusals() {
    use prefstream::state::redis::RedisTls;
    let pki = Pki::new();
    let tls = |ca: &str, client: bool| RedisTls {
        ca_file: Some(pki.path(ca)),
        client_cert: client.then(|| pki.path("client.pem")),
        client_key: client.then(|| pki.path("client.key")),
    };

    let server = tls_redis(&pki, "no");
    let store = RedisStore::connect_with(&server.url(), &tls("ca.pem", false)).await.unwrap_or_else(|e| panic!("{e}"));
    conformance::run_all(&store).await;

    let Err(err) = RedisStore::connect_with(&server.url(), &tls("other-ca.pem", false)).await else {
        panic!("a wrong CA is refused")
    };
    let text = err.to_string();
    assert!(text.contains("--redis-ca-file") && text.contains("TLS handshake"), "{text}");
    eprintln!("with another CA: {text}");
    let plain = server.url().replacen("rediss", "redis", 1);
    let Err(err) = RedisStore::connect_with(&plain, &tls("ca.pem", false)).await else {
        panic!("TLS files with redis://")
    };
    assert!(err.to_string().contains("not rediss://"), "{err}");
    drop(server);

    let mutual = tls_redis(&pki, "yes");
    let store = RedisStore::connect_with(&mutual.url(), &tls("ca.pem", true)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.pending_len("nobody").await.unwrap(), 0);
    // TLS 1.3 may report the missing certificate only at the first reply.
    let refused = match RedisStore::connect_with(&mutual.url(), &tls("ca.pem", false)).await {
        Err(e) => e.to_string(),
        Ok(store) => store.pending_len("nobody").await.err().map(|e| e.to_string()).unwrap_or_default(),
    };
    assert!(!refused.is_empty(), "a server that requires a client certificate refuses a client without one");
    eprintln!("without a client certificate: {refused}");
}
