//! End-to-end runs of `prefstream-train` at the quick preset: the whole chain produces a model
//! package that validates, and malformed input is reported with file and line.

use std::path::Path;
use std::process::Command;

fn train(run: &Path, args: &[&str]) -> std::process::Output {
    train_with_preset(run, &["--quick"].iter().chain(args).copied().collect::<Vec<_>>())
}

/// Without `--quick`: the steps read the run's `preset.json`.
fn train_with_preset(run: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_prefstream-train"))
        .args(["--run", run.to_str().unwrap()])
        .args(args)
        .output()
        .expect("runs prefstream-train")
}

#[test]
fn quick_chain_builds_a_complete_package() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let install = dir.path().join("pkg");
    let out = train(&run, &["all", "--studies", "--install", install.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["model.onnx", "judge.onnx", "tokenizer.json", "manifest.json"] {
        assert!(install.join(f).metadata().unwrap().len() > 0, "{f} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(install.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["template"], prefstream::prompt::TEMPLATE_ID);
    assert_eq!(manifest["special_tokens"]["answer_close"], "</answer>");
    for f in [
        "judge_curve.csv",
        "judge_curve.png",
        "sft_curve.csv",
        "sft_curve.png",
        "grpo_curve.png",
        "eval.json",
        "eval.md",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // Every generated event validates against the schema the service consumes.
    let events = std::fs::read_to_string(run.join("data/events.jsonl")).unwrap();
    for line in events.lines() {
        prefstream::event::parse_event(line.as_bytes()).unwrap();
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let methods: Vec<&str> = eval["rows"].as_array().unwrap().iter().map(|r| r["method"].as_str().unwrap()).collect();
    let key = "Teacher (sees key dimensions)";
    // Rejection sampling ran; it leaves a checkpoint only if some group had a best sample (the
    // quick policy's rarely differ), and the evaluation scores it exactly when it exists.
    let rft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("rft_stats.json")).unwrap()).unwrap();
    let prompts = rft["prompts"].as_u64().unwrap();
    assert!(prompts > 0 && rft["samples"].as_u64() == Some(4 * prompts), "{rft}");
    let with_rft = run.join("policy_rft.safetensors").exists();
    assert_eq!(with_rft, rft["kept"].as_u64().unwrap() > 0, "{rft}");
    let mut expected = vec!["Null", "Raw signals E", "Golden", key, key, key, "SFT", "SFT", "SFT"];
    if with_rft {
        expected.extend(["SFT+RFT"; 3]);
    }
    expected.extend(["SFT+GRPO"; 3]);
    assert_eq!(methods, expected);
    // The audit of what each description states: one row per scored policy/teacher and setting.
    let audit = eval["audit"].as_array().unwrap();
    assert_eq!(audit.len(), if with_rft { 12 } else { 9 });
    assert!(audit.iter().all(|a| a["right"].as_f64().unwrap() >= 0.0 && a["missed"].as_f64().unwrap() >= 0.0));
    for key in ["robustness", "efficiency"] {
        assert!(!eval[key].as_array().unwrap().is_empty(), "{key} study missing");
    }
    assert!(run.join("grpo_curve.csv").exists() && run.join("efficiency.png").exists());

    // The prompt-only teacher: SFT again from the saved copy warm-up, and its rule's own
    // descriptions appear in the evaluation as a ceiling.
    let preset_path = run.join("preset.json");
    let mut preset: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&preset_path).unwrap()).unwrap();
    preset["teacher_cap"] = 4.into();
    std::fs::write(&preset_path, preset.to_string()).unwrap();
    assert!(run.join("policy_copy.safetensors").exists());
    let out = train_with_preset(&run, &["sft", "--from-copy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = train_with_preset(&run, &["eval"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = String::from_utf8_lossy(&out.stdout);
    assert_eq!(md.matches("| Teacher rule (prompt only, 4 poles) |").count(), 3, "{md}");
    // eval.md adds the audit: three more rows for the rule
    let file = std::fs::read_to_string(run.join("eval.md")).unwrap();
    assert_eq!(file.matches("| Teacher rule (prompt only, 4 poles) |").count(), 6, "{file}");
    // The tally rule (labels, repeats marked) is scored the same way.
    preset["teacher_tally"] = true.into();
    std::fs::write(&preset_path, preset.to_string()).unwrap();
    let tally = train_with_preset(&run, &["eval"]);
    assert!(tally.status.success(), "{}", String::from_utf8_lossy(&tally.stderr));
    let tally = String::from_utf8_lossy(&tally.stdout);
    assert_eq!(tally.matches("| Teacher rule (tally, 4 poles) |").count(), 3, "{tally}");

    // Another run's judge: this run's own, named explicitly, reproduces the reference rows;
    // a directory without a judge is an error that names what is missing.
    let null_row = |md: &str| md.lines().find(|l| l.starts_with("| Null |")).map(String::from);
    // With --best-of 2 each policy also gets best-of-2 rows, in every setting.
    let again = train_with_preset(&run, &["eval", "--judge-run", run.to_str().unwrap(), "--best-of", "2"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let again = String::from_utf8_lossy(&again.stdout);
    assert_eq!(null_row(&again), null_row(&md));
    assert_eq!(again.matches("| SFT, best of 2 |").count(), 3, "{again}");
    let missing = train_with_preset(&run, &["eval", "--judge-run", dir.path().join("nowhere").to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nowhere"));
}

#[test]
fn malformed_training_input_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    assert!(train(&run, &["synth"]).status.success());
    let events = run.join("data/events.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&events).unwrap().lines().map(String::from).collect();
    lines[4] = r#"{"schema_version": 1, "event_id": "x""#.to_string();
    std::fs::write(&events, lines.join("\n")).unwrap();
    let out = train(&run, &["tokenizer"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("events.jsonl:5"), "{err}");
}

/// The chain on the pretrained base (the GGUF `scripts/setup.sh` fetches), at the quick preset:
/// LoRA SFT and GRPO adapters, the evaluation of both, and a runnable ChatML package.
#[test]
fn quick_chain_on_the_pretrained_base_builds_a_package() {
    let gguf = prefstream::train::base::default_gguf();
    assert!(gguf.exists(), "{} is missing: run scripts/setup.sh", gguf.display());
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = train(&run, &["all", "--base"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["base_sft/adapter.safetensors", "base_sft/adapter.json", "base_grpo/adapter.safetensors", "base_eval.md"]
    {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("base_eval.json")).unwrap()).unwrap();
    let methods: Vec<&str> = eval["rows"].as_array().unwrap().iter().map(|r| r["method"].as_str().unwrap()).collect();
    for m in ["Null", "Golden", "Base SFT", "Base SFT+GRPO"] {
        assert!(methods.contains(&m), "{m} not evaluated: {methods:?}");
    }
    let m = prefstream::engine::Manifest::load(&run.join("base_package")).unwrap();
    assert_eq!(m.template, prefstream::prompt::Template::ChatMl);
}
