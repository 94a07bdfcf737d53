//! Real dependencies for integration and end-to-end tests: redis-server and the tansu broker as
//! child processes on free ports, the `prefstream` binary as a child process, a Kafka producer
//! and a reader, and the ledger check that every event is accounted for exactly once. Each
//! process can run at a `Place`: loopback by default, or a host address inside a network
//! namespace (`netns`).
#![allow(dead_code)] // each test binary uses a different part

pub mod netns;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prefstream::event::Event;
use prefstream::pipeline::Update;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where a child process runs: the address it binds and the command prefix that puts it there
/// (`ip netns exec NAME`, or nothing for the test's own namespace).
#[derive(Debug, Clone)]
pub struct Place {
    pub host: String,
    pub prefix: Vec<String>,
}

impl Default for Place {
    fn default() -> Self {
        Self { host: "127.0.0.1".into(), prefix: Vec::new() }
    }
}

impl Place {
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self.prefix.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        }
    }
}

fn wait_for_port(host: &str, port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect((host, port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited early ({status}) on port {port}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on port {port} within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A redis-server child. `persistent` servers write an AOF with `appendfsync always` into their
/// own directory, so a SIGKILL and restart loses nothing (as production must run it).
pub struct RedisServer {
    pub port: u16,
    place: Place,
    dir: tempfile::TempDir,
    persistent: bool,
    /// TLS settings (`--tls-cert-file …`): the server then listens on a TLS port only.
    tls: Option<Vec<String>>,
    /// More arguments (a Cluster node's).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::launch(false, None)
    }

    pub fn start_persistent() -> Self {
        Self::launch(true, None)
    }

    /// A persistent server at `place`.
    pub fn start_at(place: Place) -> Self {
        let mut s = Self::new(true, None, place);
        s.spawn();
        s
    }

    /// A TLS-only server (`--port 0 --tls-port`), with `tls` its certificate settings.
    #[allow(dead_code)] // not every test binary that shares this module starts one
    pub fn start_tls(tls: Vec<String>) -> Self {
        Self::launch(false, Some(tls))
    }

    fn launch(persistent: bool, tls: Option<Vec<String>>) -> Self {
        let mut s = Self::new(persistent, tls, Place::default());
        s.spawn();
        s
    }

    fn new(persistent: bool, tls: Option<Vec<String>>, place: Place) -> Self {
        Self {
            port: free_port(),
            place,
            dir: tempfile::tempdir().unwrap(),
            persistent,
            tls,
            extra: vec![],
            child: None,
        }
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        // Protected mode refuses clients from other hosts when no password is set.
        let mut args = vec!["--bind", &self.place.host, "--protected-mode", "no", "--save", ""];
        match &self.tls {
            None => args.extend(["--port", &port]),
            Some(tls) => {
                args.extend(["--port", "0", "--tls-port", &port]);
                args.extend(tls.iter().map(String::as_str));
            }
        }
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            args.extend(["--appendonly", "no"]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        let mut child = self
            .place
            .command("redis-server")
            .args(&args)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): run scripts/redis.sh or `apt-get install -y redis-server`")
            });
        wait_for_port(&self.place.host, self.port, &mut child, "redis-server");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://{}:{}/", self.place.host, self.port)
    }

    /// SIGKILL (no clean shutdown).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.place.host, self.port)
    }
}

/// A Redis Cluster of `redis-server --cluster-enabled yes` processes on loopback (AOF, fsync
/// always), made with `redis-cli --cluster create`: `primaries` primaries with `replicas`
/// replicas each. A node that stops answering is failed over after 2 s.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// redis-cli's TLS flags for a TLS-only cluster (empty: plain).
    cli_tls: Vec<String>,
}

impl RedisCluster {
    pub fn start(primaries: usize, replicas: usize) -> Self {
        Self::launch(primaries, replicas, None)
    }

    /// A TLS-only cluster (client port and cluster bus) with `pki`'s server certificate.
    pub fn start_tls(primaries: usize, pki: &Pki) -> Self {
        Self::launch(primaries, 0, Some(pki))
    }

    fn launch(primaries: usize, replicas: usize, pki: Option<&Pki>) -> Self {
        let tls = pki.map(|p| [p.server_args("no"), vec!["--tls-cluster".into(), "yes".into()]].concat());
        let cli_tls: Vec<String> = pki
            .map(|p| vec!["--tls".into(), "--cacert".into(), p.path("ca.pem").display().to_string()])
            .unwrap_or_default();
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| {
                let mut s = RedisServer::new(true, tls.clone(), Place::default());
                s.extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ]
                .map(String::from)
                .to_vec();
                s.spawn();
                s
            })
            .collect();
        let out = Command::new("redis-cli")
            .args(&cli_tls)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(RedisServer::addr))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian package redis-tools, installed with redis-server)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let c = Self { nodes, cli_tls };
        c.wait_ok(Duration::from_secs(30));
        c
    }

    /// Seed URLs of every node, comma-separated (`--redis-url`).
    pub fn url(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    /// A cluster connection (follows MOVED/ASK).
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        let urls: Vec<String> = self.nodes.iter().filter(|n| n.child.is_some()).map(RedisServer::url).collect();
        redis::cluster::ClusterClient::new(urls).unwrap().get_connection().unwrap()
    }

    /// `redis-cli` against node `i`.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(&self.cli_tls)
            .args(["-p", &self.nodes[i].port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees on the slots.
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.child.is_some())
                .all(|(i, _)| self.cli(i, &["cluster", "info"]).contains("cluster_state:ok"));
            let check = Command::new("redis-cli")
                .args(&self.cli_tls)
                .args(["--cluster", "check", &self.running_addr()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("[OK] All 16384 slots covered"))
                .unwrap_or(false);
            if ok && check {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok within {timeout:?}: {}",
                self.cli(0, &["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn running_addr(&self) -> String {
        self.nodes.iter().find(|n| n.child.is_some()).expect("a running node").addr()
    }

    /// Indices of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<usize> {
        let nodes = self.cli(self.nodes.iter().position(|n| n.child.is_some()).unwrap(), &["cluster", "nodes"]);
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.child.is_some()
                    && nodes
                        .lines()
                        .any(|l| l.contains(&format!(":{}@", n.port)) && l.contains("master") && !l.contains("fail"))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        self.cli(i, &["cluster", "myid"]).trim().to_string()
    }

    /// Moves `slots` slots from node `from` to node `to` with `redis-cli --cluster reshard`.
    pub fn reshard(&self, from: usize, to: usize, slots: usize) {
        let out = Command::new("redis-cli")
            .args(&self.cli_tls)
            .args(["--cluster", "reshard", &self.nodes[from].addr()])
            .args(["--cluster-from", &self.id(from), "--cluster-to", &self.id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "reshard: {}", String::from_utf8_lossy(&out.stdout));
    }

    /// Every key on every running node matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .flat_map(|i| {
                self.cli(i, &["--scan", "--pattern", pattern]).lines().map(str::to_string).collect::<Vec<_>>()
            })
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys.dedup(); // a replica holds its primary's keys
        keys
    }
}

/// Certificates made here with openssl: a CA, a server certificate it signed for 127.0.0.1, a
/// client certificate it signed, and an unrelated CA.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).current_dir(dir.path()).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, cert, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=prefstream test {ca}"));
            ssl(&[&["req", "-x509"], &ec[..], &["-keyout", &key, "-out", &cert, "-days", "2", "-subj", &subj]].concat());
        }
        std::fs::write(dir.path().join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        std::fs::write(dir.path().join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            let (key, csr, cert, ext) =
                (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"), format!("{who}.ext"));
            ssl(&[&["req"], &ec[..], &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={who}")]].concat());
            ssl(&[
                "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-out", &cert, "-days", "2",
                "-extfile", &ext,
            ]);
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// redis-server's TLS settings with this CA's server certificate; `auth_clients` is
    /// `tls-auth-clients` (`yes`: a client certificate is required).
    pub fn server_args(&self, auth_clients: &str) -> Vec<String> {
        let p = |f: &str| self.path(f).display().to_string();
        ["--tls-auth-clients", auth_clients, "--tls-cert-file", &p("server.pem"), "--tls-key-file", &p("server.key")]
            .into_iter()
            .chain(["--tls-ca-cert-file", &p("ca.pem")])
            .map(String::from)
            .collect()
    }
}

/// What the ledger check reads Redis through: one server or a Cluster.
pub trait LedgerRedis {
    fn ledger_conn(&self) -> Box<dyn redis::ConnectionLike>;
}

impl LedgerRedis for RedisServer {
    fn ledger_conn(&self) -> Box<dyn redis::ConnectionLike> {
        Box::new(self.conn())
    }
}

impl LedgerRedis for RedisCluster {
    fn ledger_conn(&self) -> Box<dyn redis::ConnectionLike> {
        Box::new(self.conn())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tansu binary: `$TANSU_BIN`, `scripts/tansu.sh`'s install location, or `PATH`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let tools = std::env::var("PREFSTREAM_TOOLS").unwrap_or_else(|_| format!("{home}/.cache/prefstream/tools"));
    let p = Path::new(&tools).join("bin/tansu");
    if p.exists() {
        return p;
    }
    PathBuf::from("tansu")
}

/// A tansu broker (a Kafka-protocol broker in its own process, memory storage).
pub struct Tansu {
    pub port: u16,
    host: String,
    child: Option<Child>,
}

impl Tansu {
    pub fn start() -> Self {
        Self::start_at(Place::default())
    }

    pub fn start_at(place: Place) -> Self {
        let port = free_port();
        let url = format!("tcp://{}:{port}", place.host);
        let mut child = place
            .command(tansu_bin())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu ({e}): run `scripts/tansu.sh install` first"));
        wait_for_port(&place.host, port, &mut child, "tansu");
        Self { port, host: place.host, child: Some(child) }
    }

    pub fn brokers(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(tansu_bin())
            .args(["topic", "create", "--broker", &format!("tcp://{}", self.brokers())])
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {name}: {status}");
    }

    /// The three topics of the service.
    pub fn create_service_topics(&self, partitions: u32) {
        self.create_topic(EVENTS, partitions);
        self.create_topic(UPDATES, partitions);
        self.create_topic(DLQ, 1);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A tansu broker with the service's topics (4 partitions) and a persistent redis-server.
pub fn stack() -> (Tansu, RedisServer) {
    let (broker, redis) = (Tansu::start(), RedisServer::start_persistent());
    broker.create_service_topics(4);
    (broker, redis)
}

pub const EVENTS: &str = "prefstream.events";
pub const UPDATES: &str = "prefstream.updates";
pub const DLQ: &str = "prefstream.events.dlq";

/// A `prefstream run` child process; its log goes to a file that is printed if the test fails.
pub struct Service {
    child: Option<Child>,
    pub log: PathBuf,
    pub http_port: u16,
    http_host: String,
}

impl Service {
    pub fn start(brokers: &str, redis_url: &str, name: &str, extra: &[&str]) -> Self {
        Self::start_at(Place::default(), brokers, redis_url, name, extra)
    }

    /// At `place`: its HTTP endpoint binds `place.host`.
    pub fn start_at(place: Place, brokers: &str, redis_url: &str, name: &str, extra: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("prefstream-e2e-{name}-{}.log", std::process::id()));
        let http_port = free_port();
        let file = std::fs::File::create(&log).unwrap();
        let child = place
            .command(env!("CARGO_BIN_EXE_prefstream"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["run", "--brokers", brokers, "--redis-url", redis_url, "--group", "prefstream-e2e"])
            .args(["--http", &format!("{}:{http_port}", place.host), "--log-format", "text"])
            .args(["--greedy", "--max-batch", "16", "--commit-interval", "200ms", "--recover-interval", "3s"])
            // A killed member must leave the group quickly (librdkafka's default is 45 s).
            .args(["-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child: Some(child), log, http_port, http_host: place.host }
    }

    /// The process id (`ip netns exec` execs the binary, so this is the service itself).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running (not exited, not a zombie waiting for `wait`).
    pub fn alive(&self) -> bool {
        let Some(c) = self.child.as_ref() else { return false };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
        // The state follows the parenthesised command name.
        stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    }

    /// Resident memory in bytes (`VmRSS`), 0 once it has exited.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn get(&self, path: &str) -> String {
        http_get_at(&self.http_host, self.http_port, path)
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        self.get("/readyz").contains("200 OK")
    }

    pub fn kill9(&mut self) {
        kill(&mut self.child);
    }

    /// SIGTERM and wait: the service must drain and exit 0.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("service did not exit within 60 s of SIGTERM; log: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// One sample's value from `/metrics` (`name` with its labels, as exposed).
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics(), name)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- service log {} ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A minimal HTTP GET (the tests avoid an HTTP client dependency).
pub fn http_get(port: u16, path: &str) -> String {
    http_get_at("127.0.0.1", port, path)
}

pub fn http_get_at(host: &str, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect((host, port)) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A sample's value in a Prometheus text exposition (`name` with its labels, e.g.
/// `prefstream_retries_total{component="redis"}`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "4000000")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

/// Produces (key, payload) records, one record per batch, and waits until all are acknowledged.
///
/// One per batch because tansu 0.6 serves no records to a fetch that starts inside a record
/// batch: a consumer resuming from a committed offset (after a kill, a rebalance, or a replay's
/// checkpoint) in the middle of a batch would wait forever. Kafka itself has no such limit.
pub fn produce(brokers: &str, topic: &str, records: &[(Option<&[u8]>, &[u8])]) {
    let p = producer(brokers);
    for (key, payload) in records {
        loop {
            let mut r = BaseRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(k) = key {
                r = r.key(k);
            }
            match p.send(r) {
                Ok(()) => break,
                Err((e, _)) => {
                    assert!(
                        matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)),
                        "produce: {e}"
                    );
                    p.poll(Duration::from_millis(10));
                }
            }
        }
        // (`flush` would do, but sleeps ~100 ms per call.)
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.in_flight_count() > 0 {
            assert!(Instant::now() < deadline, "record not acknowledged within 60 s");
            p.poll(Duration::from_millis(1));
        }
    }
    p.flush(Duration::from_secs(60)).expect("all records acknowledged");
}

pub fn produce_events(brokers: &str, events: &[Event]) {
    let payloads: Vec<(String, String)> = events.iter().map(|e| (e.user_id.clone(), e.to_json())).collect();
    let records: Vec<(Option<&[u8]>, &[u8])> =
        payloads.iter().map(|(k, v)| (Some(k.as_bytes()), v.as_bytes())).collect();
    produce(brokers, EVENTS, &records);
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Every message currently in `topic` (all partitions, from the beginning; no consumer group).
/// Reads until the topic has been quiet for a second: tansu 0.6's high watermark counts record
/// batches, not records, so watermarks cannot tell where the end is.
pub fn read_all(brokers: &str, topic: &str) -> Vec<Read> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", free_port()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(1) {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Read { key: m.key().map(<[u8]>::to_vec), payload: m.payload().map(<[u8]>::to_vec), headers });
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

pub fn updates(brokers: &str) -> Vec<Update> {
    read_all(brokers, UPDATES)
        .into_iter()
        .filter_map(|r| r.payload)
        .map(|p| serde_json::from_slice(&p).expect("updates follow the schema"))
        .collect()
}

/// One end-to-end test at a time per test binary: each starts its own broker, Redis and
/// services, and two cores hold one such stack well.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Full windows of 4 in `events`: the versions the service must publish.
pub fn windows(events: &[Event]) -> usize {
    let mut per_user = HashMap::<&str, usize>::new();
    for e in events {
        *per_user.entry(&e.user_id).or_default() += 1;
    }
    per_user.values().map(|n| n / 4).sum()
}

/// Produces `events` in chunks of `chunk`, `every` apart, on a thread: arrivals that keep
/// windows completing (and in flight) while a test breaks something.
pub fn produce_paced(brokers: &str, events: &[Event], chunk: usize, every: Duration) -> std::thread::JoinHandle<()> {
    let (brokers, events) = (brokers.to_string(), events.to_vec());
    std::thread::spawn(move || {
        for c in events.chunks(chunk) {
            produce_events(&brokers, c);
            std::thread::sleep(every);
        }
    })
}

/// Synthetic events: `users` users with `per_user` events each, in per-user time order.
pub fn synth_events(users: usize, per_user: usize, seed: u64) -> Vec<Event> {
    use prefstream::train::synth::{generate, SynthConfig};
    let world = generate(&SynthConfig {
        seed,
        users,
        test_users: 0,
        signals_per_user: per_user,
        test_pairs_per_user: 1,
        ..SynthConfig::default()
    });
    world.events
}

/// Waits until `count(updates)` reaches `want` distinct (user, version) pairs.
pub fn wait_for_versions(brokers: &str, want: usize, timeout: Duration, service_logs: &[&Service]) -> Vec<Update> {
    let deadline = Instant::now() + timeout;
    loop {
        let u = updates(brokers);
        let distinct: BTreeSet<(String, u64)> = u.iter().map(|u| (u.user_id.clone(), u.version)).collect();
        if distinct.len() >= want {
            return u;
        }
        let exited = service_logs.iter().any(|s| !s.alive());
        if exited || Instant::now() > deadline {
            for s in service_logs {
                eprintln!("---- {} ----\n{}", s.log.display(), s.log_text());
            }
            let why = if exited { "a service exited" } else { "timed out" };
            panic!("{why}: only {} of {want} versions published within {timeout:?}: {distinct:?}", distinct.len());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The delivery guarantees, checked from the outside: for every user, versions 1..=⌊n/4⌋ were
/// published exactly once each in content (a re-publication repeats the same window), their
/// windows are disjoint, and windows plus the pending partial window in Redis hold every
/// event id exactly once; nothing is in flight or parked; Redis has the last version.
pub fn check_ledger(events: &[Event], updates: &[Update], redis: &mut dyn redis::ConnectionLike, window: usize) {
    let mut ids_by_user: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in events {
        ids_by_user.entry(&e.user_id).or_default().insert(&e.event_id);
    }
    let mut by_version: BTreeMap<(&str, u64), &Update> = BTreeMap::new();
    for u in updates {
        if let Some(prev) = by_version.insert((&u.user_id, u.version), u) {
            assert_eq!(
                (&prev.event_ids, &prev.description),
                (&u.event_ids, &u.description),
                "user {} version {} was applied twice with different windows",
                u.user_id,
                u.version
            );
        }
    }
    for (user, ids) in &ids_by_user {
        let n = ids.len() / window;
        let versions: Vec<u64> = by_version.keys().filter(|(u, _)| u == user).map(|(_, v)| *v).collect();
        assert_eq!(versions, (1..=n as u64).collect::<Vec<_>>(), "versions of {user}");
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for v in 1..=n as u64 {
            let u = by_version[&(*user, v)];
            assert_eq!(u.event_ids.len(), window, "{user} v{v}");
            assert_eq!(u.previous_version, v - 1);
            for id in &u.event_ids {
                assert!(seen.insert(id.clone()), "{user}: event {id} in two windows");
            }
        }
        let pending: Vec<String> =
            redis::cmd("LRANGE").arg(format!("pref:{{{user}}}:pending")).arg(0).arg(-1).query(redis).unwrap();
        for p in pending {
            let e: Event = serde_json::from_str(&p).unwrap();
            assert!(seen.insert(e.event_id.clone()), "{user}: pending event {} also in a window", e.event_id);
        }
        let expected: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, expected, "{user}: events lost or invented");
        let version: Option<u64> =
            redis::cmd("HGET").arg(format!("pref:{{{user}}}:desc")).arg("version").query(redis).unwrap();
        assert_eq!(version.unwrap_or(0), n as u64, "{user}: stored version");
        for suffix in ["inflight", "parked"] {
            let len: usize = redis::cmd("HLEN").arg(format!("pref:{{{user}}}:{suffix}")).query(redis).unwrap();
            assert_eq!(len, 0, "{user}: {suffix} windows left");
        }
    }
}

/// `check_ledger` once the service has caught up: a restarted consumer may still be reading the
/// tail (the partial windows) after every version is out. Retries for up to `timeout`, then
/// reports the last failure.
pub fn check_ledger_eventually(brokers: &str, events: &[Event], redis: &dyn LedgerRedis, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let u = updates(brokers);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_ledger(events, &u, redis.ledger_conn().as_mut(), 4);
        }))
        .is_ok();
        if ok {
            return;
        }
        if Instant::now() > deadline {
            check_ledger(events, &u, redis.ledger_conn().as_mut(), 4); // panics with the reason
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
