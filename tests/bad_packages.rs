//! Broken model packages (issue 29, item 5): each is refused at start-up with an error that
//! names the file at fault and how to get a good package; never a panic, never a half-started
//! service. Runs the real binary on copies of the shipped package (`onnx/`).

use std::path::Path;
use std::process::Command;

/// A copy of the shipped package with `damage` applied to it.
fn broken(root: &Path, name: &str, damage: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir("onnx").unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    damage(&dir);
    dir
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// `prefstream ARGS` with `env`; returns its stderr, asserting it failed cleanly (exit 1, no panic).
fn fails_cleanly(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_prefstream"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .env_remove("PREFSTREAM_MODEL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "an error exit, not a crash or success: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Runs `prefstream ARGS --model DIR`: it fails cleanly and names how to get a good package.
fn refused(dir: &Path, args: &[&str]) -> String {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.extend(["--model".as_ref(), dir.as_os_str()]);
    let stderr = fails_cleanly(&all, &[]);
    assert!(stderr.contains("scripts/base-package.sh") && stderr.contains("--model onnx"), "no fix named: {stderr}");
    stderr
}

/// What a case does to its copy of the package.
type Damage = Box<dyn FnOnce(&Path)>;

#[test]
fn broken_packages_are_refused_with_the_file_and_the_fix() {
    let root = tempfile::tempdir().unwrap();
    let infer = ["infer", "--greedy", "--events", "examples/events.jsonl"];
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated-model",
            Box::new(|d| {
                let bytes = std::fs::read(d.join("model.onnx")).unwrap();
                std::fs::write(d.join("model.onnx"), &bytes[..bytes.len() / 2]).unwrap();
            }),
            "model.onnx",
        ),
        ("empty-model", Box::new(|d| std::fs::write(d.join("model.onnx"), b"").unwrap()), "model.onnx"),
        (
            "manifest-names-a-missing-model",
            Box::new(|d| edit_manifest(d, |m| m["model"] = "policy.onnx".into())),
            "policy.onnx does not exist",
        ),
        (
            "special-token-not-in-tokenizer",
            Box::new(|d| edit_manifest(d, |m| m["special_tokens"]["eos"] = "<|im_end|>".into())),
            "lacks the special token <|im_end|>",
        ),
        ("no-tokenizer", Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()), "tokenizer.json"),
        ("garbage-tokenizer", Box::new(|d| std::fs::write(d.join("tokenizer.json"), "{]").unwrap()), "tokenizer.json"),
        ("no-manifest", Box::new(|d| std::fs::remove_file(d.join("manifest.json")).unwrap()), "manifest.json"),
        (
            "truncated-manifest",
            Box::new(|d| std::fs::write(d.join("manifest.json"), "{\"model\": ").unwrap()),
            "manifest.json",
        ),
    ];
    for (name, damage, names) in cases {
        let dir = broken(root.path(), name, damage);
        let stderr = refused(&dir, &infer);
        assert!(stderr.contains(names), "{name}: the error should name {names:?}: {stderr}");
    }
}

/// `run` loads the package before it touches Kafka or Redis, so a bad package stops it at once
/// (no consumer joins the group, nothing is read) rather than after it started taking events.
#[test]
fn run_refuses_a_broken_package_before_taking_events() {
    let root = tempfile::tempdir().unwrap();
    let dir = broken(root.path(), "truncated", |d| std::fs::write(d.join("model.onnx"), b"onnx?").unwrap());
    // Unreachable broker and Redis: reaching either first would fail differently (or hang).
    let stderr =
        refused(&dir, &["run", "--brokers", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/", "--http", "off"]);
    assert!(stderr.contains("model.onnx"), "{stderr}");
}

/// No ONNX Runtime library where `ORT_DYLIB_PATH` points: the error names the fix.
#[test]
fn a_missing_onnx_runtime_names_the_fix() {
    let args = ["infer", "--greedy", "--model", "onnx", "--events", "examples/events.jsonl"].map(std::ffi::OsStr::new);
    let stderr = fails_cleanly(&args, &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]);
    assert!(stderr.contains("scripts/setup.sh") && stderr.contains("ORT_DYLIB_PATH"), "{stderr}");
}
