//! Three test hosts in network namespaces (`ip netns`, veth pairs; root needed): `svc` for the
//! service, `kafka` for the broker, `redis` for redis-server. Each server host answers on one
//! address held on its loopback, reached from `svc` over a link of its own and from the test's
//! namespace over another, so a partition between the service and one server (iptables DROP
//! inside `svc`: packets vanish, nothing is refused, ARP still answers) leaves the test able to
//! produce, read and inspect. The namespaces are deleted on drop; drop every process started in
//! them first (declare the `Net` before them).

use std::process::Command;

use super::Place;

/// A server host of the topology.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Peer {
    Kafka,
    Redis,
}

impl Peer {
    fn host(self) -> &'static str {
        match self {
            Peer::Kafka => "kafka",
            Peer::Redis => "redis",
        }
    }
}

pub struct Net {
    tag: String,
    /// The `10.X` prefix of every address, so two runs at once do not share addresses.
    net: u8,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{} failed ({}): {} — network namespaces need root, iproute2 and iptables (scripts/setup.sh installs them)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Net {
    pub fn create() -> Self {
        let pid = std::process::id();
        let net = Self { tag: format!("ps{}", pid % 100_000), net: 100 + (pid % 100) as u8 };
        net.delete(); // a namespace left by a killed earlier run of the same pid
        let n = net.net;
        for host in ["svc", "kafka", "redis"] {
            let ns = net.ns(host);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        for peer in [Peer::Kafka, Peer::Redis] {
            sh(&["ip", "-n", &net.ns(peer.host()), "addr", "add", &format!("{}/32", net.addr(peer)), "dev", "lo"]);
        }
        // (link subnet, the end that routes to the server, the server's host)
        let links =
            [(1, "svc", Peer::Kafka), (2, "svc", Peer::Redis), (3, "root", Peer::Kafka), (4, "root", Peer::Redis)];
        for (subnet, a, peer) in links {
            let b = peer.host();
            let (ea, eb) = (format!("{}{subnet}a", net.tag), format!("{}{subnet}b", net.tag));
            sh(&["ip", "link", "add", &ea, "type", "veth", "peer", "name", &eb]);
            for (end, host, last) in [(&ea, a, 1), (&eb, b, 2)] {
                if host != "root" {
                    sh(&["ip", "link", "set", end, "netns", &net.ns(host)]);
                }
                let ip = |rest: &[&str]| {
                    let mut v = vec!["ip".to_string()];
                    v.extend(net.ns_args(host));
                    v.extend(rest.iter().map(|s| s.to_string()));
                    sh(&v.iter().map(String::as_str).collect::<Vec<_>>());
                };
                ip(&["addr", "add", &format!("10.{n}.{subnet}.{last}/30"), "dev", end]);
                ip(&["link", "set", end, "up"]);
                if last == 1 {
                    ip(&["route", "add", &net.addr(peer), "via", &format!("10.{n}.{subnet}.2")]);
                }
            }
        }
        // The service's HTTP endpoint, reached from the test's namespace.
        let (ea, eb) = (format!("{}5a", net.tag), format!("{}5b", net.tag));
        sh(&["ip", "link", "add", &ea, "type", "veth", "peer", "name", &eb]);
        sh(&["ip", "link", "set", &eb, "netns", &net.ns("svc")]);
        sh(&["ip", "addr", "add", &format!("10.{n}.5.1/30"), "dev", &ea]);
        sh(&["ip", "link", "set", &ea, "up"]);
        sh(&["ip", "-n", &net.ns("svc"), "addr", "add", &format!("10.{n}.5.2/30"), "dev", &eb]);
        sh(&["ip", "-n", &net.ns("svc"), "link", "set", &eb, "up"]);
        net
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn ns_args(&self, host: &str) -> Vec<String> {
        if host == "root" {
            Vec::new()
        } else {
            vec!["-n".into(), self.ns(host)]
        }
    }

    /// The server's address (on its loopback).
    pub fn addr(&self, peer: Peer) -> String {
        let last = if peer == Peer::Kafka { 10 } else { 20 };
        format!("10.{}.0.{last}", self.net)
    }

    fn place(&self, host: &str, addr: String) -> Place {
        Place { host: addr, prefix: vec!["ip".into(), "netns".into(), "exec".into(), self.ns(host)] }
    }

    pub fn service(&self) -> Place {
        self.place("svc", format!("10.{}.5.2", self.net))
    }

    pub fn server(&self, peer: Peer) -> Place {
        self.place(peer.host(), self.addr(peer))
    }

    fn rules(&self, action: &str, peer: Peer) {
        let (svc, addr) = (self.ns("svc"), self.addr(peer));
        for (chain, dir) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
            sh(&["ip", "netns", "exec", &svc, "iptables", action, chain, dir, &addr, "-j", "DROP"]);
        }
    }

    /// Drops every packet between the service and `peer`, both ways.
    pub fn cut(&self, peer: Peer) {
        self.rules("-I", peer);
    }

    pub fn heal(&self, peer: Peer) {
        self.rules("-D", peer);
    }

    fn delete(&self) {
        for host in ["svc", "kafka", "redis"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(host)]).output();
        }
        // The root ends of veths go with their peers; this catches a half-made topology.
        for link in 1..=5 {
            let _ = Command::new("ip").args(["link", "del", &format!("{}{link}a", self.tag)]).output();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.delete();
    }
}
