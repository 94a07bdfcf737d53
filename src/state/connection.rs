//! How the Redis store reaches Redis: one server (a `ConnectionManager` that reconnects) or a
//! Redis Cluster (the redis crate's cluster client: slot map, MOVED/ASK, failover), plain or
//! over TLS. Both are one `Conn`, so every command and script runs the same way; only what
//! walks the key space (SCAN) needs to know which it is, and asks each primary in turn.

use crate::telemetry::redact_url;
use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Client, ClientTlsConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value};
use std::path::PathBuf;
use std::time::Duration;

use super::StateError;

/// Per-command answer and connect timeouts (the single-node client's defaults, made explicit
/// so that a Cluster behaves the same): a dropped network shows as an error in about a second,
/// and the pipeline's backoff retries.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// TLS files for a `rediss://` URL (PEM); none: verify the server against the system's roots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisTls {
    /// CA bundle that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that require them (`tls-auth-clients yes`).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTls {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    fn certificates(&self) -> Result<TlsCertificates, StateError> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .map_err(|e| StateError::Setup(format!("reading the Redis {what} {}: {e}", path.display())))
        };
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert, "client certificate (--redis-client-cert)")?,
                client_key: read(key, "client key (--redis-client-key)")?,
            }),
            (None, None) => None,
            _ => return Err(StateError::Setup("--redis-client-cert and --redis-client-key go together".into())),
        };
        let root_cert = self.ca_file.as_ref().map(|f| read(f, "CA file (--redis-ca-file)")).transpose()?;
        Ok(TlsCertificates { client_tls, root_cert })
    }
}

/// Errors after which a reconnect (or, on a Cluster, a refreshed slot map) may succeed.
pub(super) fn is_transient(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.is_cluster_error()
}

/// The seed URLs of `url`: one, or several separated by commas (a Cluster's seed nodes).
pub fn seeds(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

/// Whether the seeds are `rediss://` (all or none); refuses TLS files without it, and
/// installs rustls's crypto provider once.
fn check_tls(urls: &[&str], tls: &RedisTls) -> Result<bool, StateError> {
    let secure = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if secure != 0 && secure != urls.len() {
        return Err(StateError::Setup("mixing redis:// and rediss:// seed URLs".into()));
    }
    if secure == 0 && !tls.is_empty() {
        return Err(StateError::Setup(format!(
            "TLS files were given but the Redis URL {} is not rediss://: use rediss://host:port/",
            redact_url(urls.first().copied().unwrap_or_default())
        )));
    }
    if secure != 0 {
        // rustls needs a process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Ok(secure != 0)
}

/// The client for one server: plain, or TLS for `rediss://` (rustls, with `tls`'s files).
fn client(url: &str, tls: &RedisTls) -> Result<Client, StateError> {
    let secure = check_tls(&[url], tls)?;
    if !secure || tls.is_empty() {
        return Ok(Client::open(url)?);
    }
    Ok(Client::build_with_tls(url, tls.certificates()?)?)
}

/// A TLS failure on a `rediss://` URL, with the flag that fixes it.
fn tls_hint(url: &str, e: RedisError) -> StateError {
    let text = e.to_string();
    let tls =
        text.contains("certificate") || text.contains("TLS") || text.contains("tls") || text.contains("handshake");
    if url.starts_with("rediss://") && tls {
        StateError::Setup(format!(
            "TLS handshake with Redis at {} failed: {text} (check --redis-ca-file / PREFSTREAM_REDIS_CA_FILE for the CA \
             that signed the server's certificate, and --redis-client-cert/--redis-client-key if the server requires them)",
            redact_url(url)
        ))
    } else {
        e.into()
    }
}

/// One server or a Cluster, behind the same command interface.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects to `url`: a Cluster when `cluster` is set or `url` lists several seed nodes,
    /// otherwise one server. Fails if nothing answers.
    pub async fn open(url: &str, tls: &RedisTls, cluster: bool) -> Result<Self, StateError> {
        let urls = seeds(url);
        if urls.is_empty() {
            return Err(StateError::Setup("no Redis URL given (--redis-url)".into()));
        }
        if !cluster && urls.len() == 1 {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(CONNECT_TIMEOUT));
            let c = ConnectionManager::new_with_config(client(urls[0], tls)?, config).await;
            return Ok(Self::Single(c.map_err(|e| tls_hint(urls[0], e))?));
        }
        let secure = check_tls(&urls, tls)?;
        let mut builder = ClusterClientBuilder::new(urls.clone())
            .response_timeout(RESPONSE_TIMEOUT)
            .connection_timeout(CONNECT_TIMEOUT);
        if secure && !tls.is_empty() {
            builder = builder.certs(tls.certificates()?);
        }
        let c = builder.build()?.get_async_connection().await.map_err(|e| tls_hint(urls[0], e))?;
        Ok(Self::Cluster(c))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The Cluster's primaries that serve slots (`host`, `port`), from `CLUSTER NODES`; for one
    /// server, none (commands go to it).
    pub async fn primaries(&mut self) -> RedisResult<Vec<(String, u16)>> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        let text: String = ::redis::cmd("CLUSTER").arg("NODES").query_async(self).await?;
        Ok(parse_primaries(&text))
    }

    /// `cmd` on one node (`None`: the single server), e.g. one primary's SCAN.
    pub async fn on_node<T: ::redis::FromRedisValue>(
        &mut self,
        node: Option<&(String, u16)>,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, node) {
            (Self::Cluster(c), Some((host, port))) => {
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port });
                Ok(::redis::from_redis_value(c.route_command(cmd.clone(), routing).await?)?)
            }
            (c, _) => cmd.query_async(c).await,
        }
    }
}

impl Conn {
    /// `cmd` on the primary that owns `key`'s slot (the one server otherwise): for WAIT, which
    /// names no key but must reach the node that took the write.
    pub async fn on_primary_of<T: ::redis::FromRedisValue>(&mut self, key: &str, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Self::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                Ok(::redis::from_redis_value(c.route_command(cmd.clone(), routing).await?)?)
            }
            c => cmd.query_async(c).await,
        }
    }
}

/// Primaries with slots, from `CLUSTER NODES` lines: `<id> <ip:port@cport[,hostname]> <flags>
/// <master> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_primaries(text: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = f.get(2)?;
            let serving = flags.split(',').any(|x| x == "master") && !flags.contains("fail") && f.len() > 8;
            if !serving {
                return None;
            }
            let addr = f[1].split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .filter(|(host, _)| !host.is_empty())
        .collect();
    out.sort();
    out
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_the_masters_that_serve_slots() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host-b master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 1 1 connected
e5 127.0.0.1:7005@17005 master - 0 1 5 connected
f6 127.0.0.1:7006@17006 master - 0 1 6 connected 10923-16383
";
        let p = parse_primaries(nodes);
        assert_eq!(p, vec![("127.0.0.1".into(), 7001), ("127.0.0.1".into(), 7002), ("127.0.0.1".into(), 7006)]);
    }

    #[test]
    fn seeds_split_on_commas() {
        assert_eq!(seeds("redis://a:1/"), vec!["redis://a:1/"]);
        assert_eq!(seeds("redis://a:1, redis://b:2,"), vec!["redis://a:1", "redis://b:2"]);
        assert!(seeds(" ").is_empty());
    }

    #[test]
    fn tls_files_need_rediss_and_seeds_agree() {
        let files = RedisTls { ca_file: Some("ca.pem".into()), ..Default::default() };
        assert!(check_tls(&["redis://a:1/"], &files).is_err());
        assert!(check_tls(&["rediss://a:1/", "redis://b:2/"], &RedisTls::default()).is_err());
        assert!(!check_tls(&["redis://a:1/"], &RedisTls::default()).unwrap());
        assert!(check_tls(&["rediss://a:1/", "rediss://b:2/"], &files).unwrap());
    }
}
