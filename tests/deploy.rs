//! `deploy/`: the kustomize manifests render (`kubectl kustomize`, offline) to the objects an
//! operator expects, and every `PREFSTREAM_*` variable the manifests and `deploy/compose.yaml`
//! set is a flag of the command it configures, with the defaults the flags have.
//! The image (deploy/Containerfile) is built and checked by scripts/image.sh.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `PREFSTREAM_*` variable → its flag's default ("" when none), from `prefstream <cmd> --help`.
fn flags(cmd: &str) -> BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_prefstream")).args([cmd, "--help"]).output().unwrap();
    assert!(out.status.success(), "{cmd} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    for line in help.lines() {
        let Some(at) = line.find("[env: PREFSTREAM_") else { continue };
        let rest = &line[at + "[env: ".len()..];
        let name = &rest[..rest.find('=').unwrap()];
        let default = rest.split_once("[default: ").map_or("", |(_, d)| &d[..d.find(']').unwrap()]);
        flags.insert(name.to_string(), default.to_string());
    }
    assert!(flags.len() > 10, "{cmd} --help lists its env vars: {help}");
    flags
}

fn seconds(duration: &str) -> u64 {
    let n: u64 = duration.trim_end_matches('s').parse().unwrap_or_else(|_| panic!("{duration}: want N s"));
    n
}

/// Every document of a YAML stream as JSON, with `<<` merge keys applied.
fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let mut v = serde_yaml::Value::deserialize(doc).unwrap();
            v.apply_merge().unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e} (install kubectl: https://kubernetes.io/docs/tasks/tools/)"));
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("want a string: {v}"))
}

/// `labels` contains every pair of `selector`, which is not empty.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().unwrap();
    !sel.is_empty() && sel.iter().all(|(k, v)| labels[k] == *v)
}

/// The variables a container sets itself (`env`), and those it takes from ConfigMaps.
fn container_env(c: &Value) -> (BTreeMap<String, Value>, Vec<String>) {
    let env = c["env"]
        .as_array()
        .map_or(BTreeMap::new(), |e| e.iter().map(|v| (str_of(&v["name"]).to_string(), v.clone())).collect());
    let maps = c["envFrom"].as_array().map_or(Vec::new(), |e| {
        e.iter().filter_map(|v| v["configMapRef"]["name"].as_str().map(str::to_string)).collect()
    });
    (env, maps)
}

fn check_rendered(objects: &[Value], run: &BTreeMap<String, String>, check: &BTreeMap<String, String>) {
    let kinds: BTreeSet<&str> = objects.iter().map(|o| str_of(&o["kind"])).collect();
    for want in ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject"] {
        assert!(kinds.contains(want), "{want} in {kinds:?}");
    }
    let config = &one(objects, "ConfigMap")["data"];
    let setting = |name: &str, flags: &BTreeMap<String, String>| -> String {
        config[name].as_str().map_or_else(|| flags[name].clone(), str::to_string)
    };
    for name in config.as_object().unwrap().keys().filter(|k| k.starts_with("PREFSTREAM_")) {
        assert!(run.contains_key(name) || check.contains_key(name), "ConfigMap's {name} is no flag of run or check");
    }

    let deploy = one(objects, "Deployment");
    let pod = &deploy["spec"]["template"];
    let spec = &pod["spec"];
    assert!(selects(&deploy["spec"]["selector"]["matchLabels"], &pod["metadata"]["labels"]));
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    let shutdown = seconds(&setting("PREFSTREAM_SHUTDOWN_TIMEOUT", run));
    let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(grace > shutdown, "grace {grace}s must exceed the shutdown timeout {shutdown}s");

    let by_name = |list: &Value, name: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("container {name}"))
            .clone()
    };
    let main = by_name(&spec["containers"], "prefstream");
    assert_eq!(main["args"], serde_json::json!(["run"]));
    let init = by_name(&spec["initContainers"], "check");
    assert_eq!(init["args"], serde_json::json!(["check"]));
    for (c, flags) in [(&main, run), (&init, check)] {
        let (env, maps) = container_env(c);
        assert!(maps.contains(&str_of(&one(objects, "ConfigMap")["metadata"]["name"]).to_string()), "{maps:?}");
        for name in env.keys().filter(|k| k.starts_with("PREFSTREAM_")) {
            assert!(flags.contains_key(name), "{}: {name} is no flag", c["name"]);
        }
        let res = &c["resources"];
        assert!(res["requests"]["cpu"].is_string() && res["limits"]["memory"].is_string(), "{}: resources", c["name"]);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    }
    // Probes on the metrics port, which is where PREFSTREAM_HTTP listens, on every interface.
    let http = setting("PREFSTREAM_HTTP", run);
    assert!(http.starts_with("0.0.0.0:"), "PREFSTREAM_HTTP={http}: probes cannot reach 127.0.0.1");
    let port = main["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").expect("metrics port");
    assert_eq!(port["containerPort"].as_u64().unwrap().to_string(), http.rsplit(':').next().unwrap());
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")] {
        assert_eq!(main[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(main[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    let service = one(objects, "Service");
    assert!(selects(&service["spec"]["selector"], &pod["metadata"]["labels"]), "the Service selects the pods");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    let pdb = one(objects, "PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], &pod["metadata"]["labels"]), "the PDB selects the pods");

    // The lag trigger watches the group and topic the service uses, and never scales past the
    // partitions the init container creates.
    let scaled = one(objects, "ScaledObject");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], deploy["metadata"]["name"]);
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    let meta = &trigger["metadata"];
    assert_eq!(str_of(&meta["consumerGroup"]), setting("PREFSTREAM_GROUP", run));
    assert_eq!(str_of(&meta["topic"]), setting("PREFSTREAM_EVENTS_TOPIC", run));
    assert_eq!(str_of(&meta["bootstrapServers"]), setting("PREFSTREAM_BROKERS", run));
    let partitions: u64 = setting("PREFSTREAM_CREATE_TOPICS", check).parse().expect("PREFSTREAM_CREATE_TOPICS");
    let max = scaled["spec"]["maxReplicaCount"].as_u64().unwrap();
    assert!((1..=partitions).contains(&max), "maxReplicaCount {max} vs {partitions} partitions");
}

#[test]
fn kustomize_renders_what_an_operator_expects() {
    let (run, check) = (flags("run"), flags("check"));
    // The base keeps the flags' own names for the group and the topics.
    let base = kustomize("deploy/k8s/base");
    let config = &one(&base, "ConfigMap")["data"];
    for name in ["PREFSTREAM_GROUP", "PREFSTREAM_EVENTS_TOPIC", "PREFSTREAM_UPDATES_TOPIC", "PREFSTREAM_DLQ_TOPIC"] {
        assert_eq!(str_of(&config[name]), run[name], "{name} in the base");
    }
    check_rendered(&base, &run, &check);

    let example = kustomize("deploy/k8s/overlays/example");
    check_rendered(&example, &run, &check);
    assert!(example.iter().all(|o| o["metadata"]["namespace"] == "prefstream"), "one namespace");
    // Secrets come from a Secret by reference, for both containers and for KEDA.
    let spec = &one(&example, "Deployment")["spec"]["template"]["spec"];
    for c in spec["containers"].as_array().unwrap().iter().chain(spec["initContainers"].as_array().unwrap()) {
        let (env, _) = container_env(c);
        assert!(env["KAFKA_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"].is_string(), "{}", c["name"]);
        let options = str_of(&env["PREFSTREAM_KAFKA_OPTIONS"]["value"]);
        assert!(options.contains("sasl.password=$(KAFKA_PASSWORD)"), "{options}");
    }
    let auth = one(&example, "TriggerAuthentication");
    let scaled = one(&example, "ScaledObject");
    assert_eq!(scaled["spec"]["triggers"][0]["authenticationRef"]["name"], auth["metadata"]["name"]);
}

#[test]
fn compose_sets_only_real_flags() {
    let text = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    let doc = yaml_docs(&text).remove(0);
    let services = doc["services"].as_object().unwrap();
    let mut commands = BTreeSet::new();
    for (name, svc) in services.iter().filter(|(_, s)| str_of(&s["image"]).contains("prefstream")) {
        let cmd = str_of(&svc["command"][0]);
        let flags = flags(cmd);
        for var in svc["environment"].as_object().unwrap().keys().filter(|k| k.starts_with("PREFSTREAM_")) {
            assert!(flags.contains_key(var), "{name}: {var} is no flag of `prefstream {cmd}`");
        }
        commands.insert(cmd);
    }
    assert_eq!(commands, BTreeSet::from(["check", "run"]), "topics are created, then the service runs");
    assert!(services["topics"]["environment"]["PREFSTREAM_CREATE_TOPICS"].is_string());
    assert_eq!(services["prefstream"]["depends_on"]["topics"]["condition"], "service_completed_successfully");

    let svc = &services["prefstream"];
    let shutdown = seconds(
        svc["environment"]["PREFSTREAM_SHUTDOWN_TIMEOUT"]
            .as_str()
            .unwrap_or(&flags("run")["PREFSTREAM_SHUTDOWN_TIMEOUT"]),
    );
    assert!(seconds(str_of(&svc["stop_grace_period"])) > shutdown, "stop_grace_period above the shutdown timeout");
    let redis = services["redis"]["command"].as_array().unwrap().iter().map(str_of).collect::<Vec<_>>().join(" ");
    assert!(redis.contains("--appendonly yes") && redis.contains("--maxmemory-policy noeviction"), "{redis}");

    // Prometheus scrapes the port the service listens on, and loads the alert rules.
    let http = str_of(&svc["environment"]["PREFSTREAM_HTTP"]);
    let prom = yaml_docs(&std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap()).remove(0);
    let job = prom["scrape_configs"].as_array().unwrap().iter().find(|j| j["job_name"] == "prefstream").unwrap();
    let target = str_of(&job["static_configs"][0]["targets"][0]);
    assert_eq!(target, format!("prefstream:{}", http.rsplit(':').next().unwrap()));
    assert_eq!(prom["rule_files"][0], "alerts.yaml");
}
