//! `mmrec-recipe run`: the nightly pipeline end to end on the fixtures — interrupted once
//! and resumed, re-run with nothing changed (every stage skipped), re-run with a changed
//! fine-tuning setting (only what depends on it runs), gates, and the lock.

use std::path::Path;
use std::process::Output;

use mmrec_tests::{command, fixtures, terminate};
use serde_json::Value;

/// A fast pipeline config in `dir`; `finetune_steps` and `gate` vary between runs.
fn config(dir: &Path, finetune_steps: u32, gate: f64) -> std::path::PathBuf {
    let f = fixtures().canonicalize().unwrap();
    let corpus = |name: &str| format!("{:?}", f.join("corpora").join(name).display().to_string());
    let text = format!(
        r#"
[pipeline]
work = {work:?}
runs = {runs:?}
keep_runs = 2

[corpora]
text = [{text}]
code = [{code}]
mixed = [{mixed}]

[tokenizer]
path = {tok:?}

[model]
preset = "tiny"

[train]
device = "cpu"
set = ["data.seq_len=32", "data.batch_size=4", "run.eval_every=0", "run.ckpt_every=4", "run.log_every=1"]

[pretrain]
set = ["run.steps=12"]

[finetune]
set = ["run.steps={finetune_steps}", "optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_steps=2"]

[fusion]                     # two data-parallel ranks (mmrec-train launch)
procs = 2
set = ["run.steps=4", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1"]

[merges]
linear = ["--method", "linear"]

[eval]
seq_len = 32
batch_size = 4
max_batches = 2

[gates]
fused_vs_base = {gate}
"#,
        work = dir.join("work").display().to_string(),
        runs = dir.join("runs").display().to_string(),
        text = corpus("wikitext.jsonl"),
        code = corpus("python_stdlib.jsonl"),
        mixed = corpus("chat.jsonl"),
        tok = f.join("tokenizer.json").display().to_string(),
    );
    let path = dir.join(format!("nightly-{finetune_steps}-{gate}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn recipe(cfg: &Path) -> Output {
    command("mmrec-recipe").arg("run").arg(cfg).output().unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The run directories, oldest first.
fn runs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut r: Vec<_> = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    r.sort_by_key(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .rsplit_once('-')
            .unwrap()
            .1
            .parse::<u32>()
            .unwrap()
    });
    r
}

fn statuses(run: &Path) -> Vec<(String, String)> {
    json(&run.join("stages.json"))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_pipeline_resumes_after_a_signal_skips_what_did_not_change_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 6, 1.0);

    // Interrupt it during pretraining, once a checkpoint exists: SIGTERM reaches the
    // trainer, which saves and stops; the run exits 143 with no report.
    let mut child = command("mmrec-recipe").arg("run").arg(&cfg).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let pretrain = dir.path().join("work/pretrain");
    while !std::fs::read_dir(&pretrain)
        .map(|mut d| d.any(|e| e.unwrap().path().join("checkpoints/latest").exists()))
        .unwrap_or(false)
    {
        assert!(std::time::Instant::now() < deadline, "pretraining never checkpointed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    terminate(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "exit 128 + SIGTERM");
    let first = &runs(dir.path())[0];
    assert!(!first.join("report.json").exists(), "no report for an interrupted run");
    assert!(statuses(first).contains(&("pretrain".into(), "interrupted".into())));

    // Re-run: pretraining resumes from its checkpoint, everything else runs, report written.
    let o = recipe(&cfg);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second = runs(dir.path()).pop().unwrap();
    let log = std::fs::read_to_string(second.join("logs/pretrain.log")).unwrap();
    assert!(!log.contains("from step 0 "), "pretraining resumed: {log}");
    // `[fusion] procs = 2`: the fusion trained as two data-parallel ranks.
    let log = std::fs::read_to_string(second.join("logs/fusion.log")).unwrap();
    assert!(log.contains("rank 1 of 2"), "{log}");
    let report = json(&second.join("report.json"));
    for model in ["base", "control", "text", "code", "fused", "merged-linear"] {
        let loss = report["models"][model]["all"]["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{model}: {loss}");
    }
    assert!(
        report["tokens_trained"]["control"] == report["tokens_trained"]["text"],
        "{report}"
    );
    assert!(second.join("report.md").exists() && second.join("curves.png").exists());

    // Nothing changed: every stage skipped; the report compares with the previous run.
    let o = recipe(&cfg);
    assert!(o.status.success());
    let third = runs(dir.path()).pop().unwrap();
    assert!(
        statuses(&third).iter().all(|(_, s)| s == "skipped"),
        "{:?}",
        statuses(&third)
    );
    let report = json(&third.join("report.json"));
    assert_eq!(report["previous_run"], second.file_name().unwrap().to_str().unwrap());
    assert!(std::fs::read_to_string(third.join("report.md"))
        .unwrap()
        .contains("Δp +0.000"));

    // A changed fine-tuning setting re-runs what depends on it, and a gate that cannot hold
    // fails the run (exit 3) after its report.
    let changed = config(dir.path(), 7, -10.0);
    let o = recipe(&changed);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let fourth = runs(dir.path()).pop().unwrap();
    for (stage, status) in statuses(&fourth) {
        let upstream = [
            "split",
            "pretrain",
            "transfer-text",
            "transfer-code",
            "transfer-control",
            "eval-base",
        ]
        .contains(&stage.as_str());
        assert_eq!(status, if upstream { "skipped" } else { "ran" }, "{stage}");
    }
    assert_eq!(json(&fourth.join("report.json"))["gates"][0]["ok"], false);
    assert_eq!(runs(dir.path()).len(), 2, "keep_runs = 2");

    // A second run on the same directory while one holds the lock is refused.
    std::fs::write(dir.path().join("runs/.lock"), format!("{}\n", std::process::id())).unwrap();
    let o = recipe(&cfg);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("held by another run"));
}
