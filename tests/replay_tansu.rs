//! `prefstream replay` end to end on tansu + redis-server with the shipped model (greedy): a
//! dry run reproduces what live produced and writes nothing; a rebuild killed mid-way and
//! resumed from its checkpoint ends where an unbroken one does (live's own descriptions).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const FROM: &str = "2000-01-01T00:00:00Z";

fn replay(brokers: &str, redis_url: &str, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_prefstream"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["replay", "--brokers", brokers, "--redis-url", redis_url, "--from", FROM, "--greedy"])
        .args(["--idle-end", "2s"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: std::process::Child) -> (Output, serde_json::Value) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed:\n{text}");
    (out, serde_json::Value::Null)
}

/// Every key and its value, for "nothing was written" checks.
fn snapshot(redis: &RedisServer) -> BTreeMap<String, String> {
    let mut c = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    keys.into_iter()
        .map(|k| {
            let t: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
            let v: redis::Value = match t.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&k).query(&mut c).unwrap(),
                "list" => redis::cmd("LRANGE").arg(&k).arg(0).arg(-1).query(&mut c).unwrap(),
                "zset" => redis::cmd("ZRANGE").arg(&k).arg(0).arg(-1).arg("WITHSCORES").query(&mut c).unwrap(),
                _ => redis::cmd("GET").arg(&k).query(&mut c).unwrap(),
            };
            (k, format!("{v:?}"))
        })
        .collect()
}

fn descriptions(redis: &RedisServer, users: &[String]) -> BTreeMap<String, (u64, String)> {
    let mut c = redis.conn();
    users
        .iter()
        .map(|u| {
            let (v, d): (u64, String) = redis::cmd("HMGET")
                .arg(format!("pref:{{{u}}}:desc"))
                .arg("version")
                .arg("description")
                .query(&mut c)
                .unwrap();
            (u.clone(), (v, d))
        })
        .collect()
}

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn replay_reproduces_live_dry_run_writes_nothing_and_resume_matches() {
    let (broker, redis) = stack();
    let events = synth_events(8, 24, 31);
    let users: Vec<String> = {
        let mut u: Vec<String> = events.iter().map(|e| e.user_id.clone()).collect();
        u.sort();
        u.dedup();
        u
    };
    // (One record per batch, see `produce`: a resumed replay starts at its checkpoint.)
    produce_events(&broker.brokers(), &events);
    let mut live = Service::start(&broker.brokers(), &redis.url(), "replay-live", &[]);
    wait_for_versions(&broker.brokers(), users.len() * 6, Duration::from_secs(300), &[&live]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(live.terminate().success());
    let before = snapshot(&redis);
    let live_desc = descriptions(&redis, &users);
    let updates_before = read_all(&broker.brokers(), UPDATES).len();
    let dir = tempfile::tempdir().unwrap();

    // Dry run: the same descriptions as live, and nothing written anywhere.
    let r = dir.path().join("dry.json");
    finish(replay(&broker.brokers(), &redis.url(), &["--dry-run", "--report", r.to_str().unwrap()]));
    let dry = report(&r);
    assert_eq!(dry["users"], users.len(), "{dry}");
    assert_eq!(dry["descriptions_changed"], 0, "greedy replay reproduces live: {dry}");
    assert_eq!(dry["descriptions_unchanged"], users.len());
    assert_eq!(dry["windows_applied"], users.len() * 6);
    assert_eq!(snapshot(&redis), before, "a dry run writes nothing to Redis");
    assert_eq!(read_all(&broker.brokers(), UPDATES).len(), updates_before, "a dry run publishes nothing");

    // Rebuild, killed mid-way (rate-limited so the kill lands inside the range), then resumed.
    let ckpt = dir.path().join("ckpt.json");
    let r = dir.path().join("rebuild.json");
    let args = ["--rebuild", "--id", "t1", "--checkpoint", ckpt.to_str().unwrap(), "--report", r.to_str().unwrap()];
    let mut first = replay(&broker.brokers(), &redis.url(), &[&args[..], &["--max-events-per-sec", "30"]].concat());
    std::thread::sleep(Duration::from_secs(4));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(ckpt.exists(), "the killed replay left a checkpoint");
    let staged: Vec<String> = redis::cmd("KEYS").arg("replay:t1:*").query(&mut redis.conn()).unwrap();
    assert!(!staged.is_empty(), "the killed replay had staged state");
    finish(replay(&broker.brokers(), &redis.url(), &args));
    let rebuilt = report(&r);
    assert_eq!(rebuilt["resumed"], true, "{rebuilt}");
    assert_eq!(rebuilt["swapped"], users.len(), "{rebuilt}");
    assert_eq!(rebuilt["descriptions_changed"], 0, "resumed rebuild reproduces live: {rebuilt}");
    let after = descriptions(&redis, &users);
    for u in &users {
        let ((v0, d0), (v1, d1)) = (&live_desc[u], &after[u]);
        assert_eq!(d1, d0, "{u}: the rebuilt description is the unbroken one");
        assert_eq!(*v1, v0 + 1, "{u}: the swap is one new version");
    }
    let left: Vec<String> = redis::cmd("KEYS").arg("replay:*").query(&mut redis.conn()).unwrap();
    assert!(left.is_empty(), "staging cleared: {left:?}");
    assert_eq!(read_all(&broker.brokers(), UPDATES).len(), updates_before + users.len(), "one update per user");
}
