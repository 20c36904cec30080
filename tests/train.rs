//! `mmrec-train` behaviour on real shards built from the fixtures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mmrec_model::io::{save, varmap_tensors};
use mmrec_model::{initialise, MMRecModel};
use mmrec_schemas::model_file::glob_match;
use mmrec_schemas::{ModelConfig, ModelMeta, Role};
use mmrec_tests::{command, fixture_shards, terminate};
use mmrec_trainer::train::{loss_and_grads, BatchSchedule, BatchSize, Net, TrainConfig};

/// Shards of the fixture corpora, built once per test binary.
fn shards() -> PathBuf {
    fixture_shards("train", 1000, 16)
}

/// Small, fast settings every test starts from.
fn base_args(out: &Path, steps: u64) -> Vec<String> {
    [
        "--data".into(),
        shards().to_string_lossy().into_owned(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
        "--json".into(),
        "--set".into(),
        format!("run.steps={steps}"),
        "--set".into(),
        "data.seq_len=32".into(),
        "--set".into(),
        "data.batch_size=2".into(),
        "--set".into(),
        "run.eval_every=0".into(),
        "--set".into(),
        "run.log_every=1".into(),
        "--set".into(),
        "optim.warmup_steps=3".into(),
    ]
    .into()
}

fn mmrec_train(cmd: &str, args: &[String]) -> Output {
    let out = command("mmrec-train").arg(cmd).args(args).output().unwrap();
    if !out.status.success() {
        eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// step → loss, the last record of each step winning (a resumed run rewrites steps the
/// killed one had logged after its last checkpoint).
fn losses(out: &Path) -> BTreeMap<u64, f64> {
    step_field(out, "loss")
}

/// A field of every training step's record in `out/metrics.jsonl`, by step.
fn step_field(out: &Path, field: &str) -> BTreeMap<u64, f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get(field).is_some_and(|v| !v.is_null()))
        .map(|r| (r["step"].as_u64().unwrap(), r[field].as_f64().unwrap()))
        .collect()
}

/// Start `pretrain` with `args` (writing to `out`), SIGKILL it once its checkpoint at
/// `step` is in place, and check that it had not finished all `steps`.
fn pretrain_killed_at_checkpoint(args: &[String], out: &Path, step: u64, steps: usize) {
    let mut child = command("mmrec-train")
        .arg("pretrain")
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = out.join("checkpoints/latest");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&latest)
        .map(|s| s.trim() != format!("step-{step:08}"))
        .unwrap_or(true)
    {
        assert!(std::time::Instant::now() < deadline, "no checkpoint at step {step}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(losses(out).len() < steps, "the run was killed before finishing");
}

#[test]
fn a_run_killed_with_sigkill_and_resumed_matches_an_uninterrupted_one_step_for_step() {
    let (straight, killed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = base_args(straight.path(), 16);
    args.extend(["--set".into(), "run.ckpt_every=8".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());

    let mut args = base_args(killed.path(), 16);
    args.extend(["--set".into(), "run.ckpt_every=8".into()]);
    pretrain_killed_at_checkpoint(&args, killed.path(), 8, 16);

    let mut resume = args.clone();
    resume.push("--resume".into());
    assert!(mmrec_train("pretrain", &resume).status.success());
    let (a, b) = (losses(straight.path()), losses(killed.path()));
    assert_eq!(a.len(), 16);
    assert_eq!(a, b, "identical losses at every step");
}

#[test]
fn sigterm_saves_a_checkpoint_writes_no_final_model_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let args = base_args(dir.path(), 100_000);
    let child = command("mmrec-train")
        .arg("pretrain")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count() < 3)
        .unwrap_or(true)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    terminate(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "a script must not take an interrupted run for a finished one"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert!(
        !dir.path().join("final.safetensors").exists(),
        "no final model for a partial run"
    );
    let latest = std::fs::read_to_string(dir.path().join("checkpoints/latest")).unwrap();
    let steps = losses(dir.path()).len();
    assert_eq!(
        latest.trim(),
        format!("step-{steps:08}"),
        "the checkpoint is at the last step taken"
    );
}

#[test]
fn finetuning_never_changes_frozen_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = mmrec_schemas::read_manifest(&shards()).unwrap().tokenizer.vocab_size;
    let cfg = mmrec_model::preset("tiny", vocab).unwrap();
    let vm = VarMap::new();
    MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    initialise(&vm, &cfg).unwrap();
    let frozen = vec!["embed.*".to_string(), "blocks.{0-0}.*".to_string()];
    let init = dir.path().join("expert.safetensors");
    save(
        &init,
        &varmap_tensors(&vm),
        &ModelMeta {
            role: Role::Expert,
            domain: Some("code".into()),
            config: cfg,
            frozen: frozen.clone(),
            lineage: serde_json::Value::Null,
            fusion: None,
            tokenizer: None,
        },
    )
    .unwrap();
    let out = dir.path().join("run");
    let mut args = base_args(&out, 5);
    args.extend([
        "--init".into(),
        init.to_string_lossy().into_owned(),
        "--set".into(),
        "optim.lr=1e-2".into(),
    ]);
    let o = mmrec_train("finetune", &args);
    assert!(o.status.success());
    // The printed config says where the model's shape comes from.
    assert!(String::from_utf8_lossy(&o.stderr).contains("from the init file: d_model"));
    let before = candle_core::safetensors::load(&init, &Device::Cpu).unwrap();
    let after = candle_core::safetensors::load(out.join("final.safetensors"), &Device::Cpu).unwrap();
    let (mut same, mut changed) = (0, 0);
    for (name, t) in &before {
        let diff = (t - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if frozen.iter().any(|p| glob_match(p, name)) {
            assert_eq!(diff, 0.0, "frozen {name} changed");
            same += 1;
        } else if diff > 0.0 {
            changed += 1;
        }
    }
    assert!(same > 10 && changed > 10, "{same} frozen, {changed} trained");
    let meta = mmrec_schemas::safetensors::read_meta(&out.join("final.safetensors")).unwrap();
    assert_eq!(
        (meta.role, meta.domain.as_deref(), meta.frozen),
        (Role::Expert, Some("code"), frozen)
    );
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for dropout in [0.0, 0.3] {
        checkpointing_matches(dropout);
    }
}

/// With dropout, the recomputed blocks must draw the masks the first pass drew.
fn checkpointing_matches(dropout: f32) {
    mmrec_model::model::set_dropout_seed(99);
    let cfg = ModelConfig {
        vocab_size: 40,
        d_model: 16,
        n_layers: 3,
        n_heads: 2,
        n_slots: 3,
        chunk_sizes: vec![4, 8],
        memory_window: 2,
        dropout,
        uboo_weight: 0.1,
    };
    let vm = VarMap::new();
    let model = MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
    initialise(&vm, &cfg).unwrap();
    let toks: Vec<u32> = (0..2 * 25).map(|i| (i * 7 + 3) % 40).collect();
    let all = Tensor::from_vec(toks, (2, 25), &Device::Cpu).unwrap();
    let (inp, tgt) = (all.narrow(1, 0, 24).unwrap(), all.narrow(1, 1, 24).unwrap());
    let mask = Tensor::ones((2, 24), DType::F64, &Device::Cpu).unwrap();
    let net = Net::Single(model);
    let (l1, g1, _) = loss_and_grads(&net, &vm, (&inp, &tgt, &mask), false, None).unwrap();
    let (l2, g2, _) = loss_and_grads(&net, &vm, (&inp, &tgt, &mask), true, None).unwrap();
    // A loss still tied to its graph would keep every activation of the micro-batch alive
    // until the whole step ends (micro-batching would then save no memory).
    assert!(!l1.track_op() && !l2.track_op(), "the returned loss must be detached");
    let (l1, l2) = (l1.to_scalar::<f64>().unwrap(), l2.to_scalar::<f64>().unwrap());
    assert!((l1 - l2).abs() < 1e-12, "{l1} vs {l2}");
    assert_eq!(g1.keys().collect::<Vec<_>>(), g2.keys().collect::<Vec<_>>());
    for (name, a) in &g1 {
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1e-30);
        let diff = (a - &g2[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff <= 1e-10 * scale, "{name}: {diff} (scale {scale})");
    }
}

#[test]
fn a_diverging_run_is_caught_by_the_nan_guard() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 12);
    // A learning rate that blows the weights up within a few steps.
    args.extend([
        "--set".into(),
        "optim.lr=1e6".into(),
        "--set".into(),
        "optim.min_lr=1e5".into(),
        "--set".into(),
        "optim.grad_clip=0".into(),
        "--set".into(),
        "run.ckpt_every=2".into(),
    ]);
    assert!(mmrec_train("pretrain", &args).status.success());
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(
        log.contains("non-finite loss or gradient: step skipped, learning rate halved"),
        "{log}"
    );
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving_and_keeps_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 200);
    // A rate too small to move the validation loss: every evaluation after the first is
    // "no improvement".
    args.extend([
        "--set".into(),
        "optim.lr=1e-12".into(),
        "--set".into(),
        "optim.min_lr=1e-12".into(),
        "--set".into(),
        "run.eval_every=2".into(),
        "--set".into(),
        "run.eval_batches=2".into(),
        "--set".into(),
        "optim.early_stop_patience=2".into(),
    ]);
    let out = mmrec_train("pretrain", &args);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped early"));
    assert_eq!(
        losses(dir.path()).len(),
        6,
        "evaluations at 2 (best), 4 and 6 (no improvement): stop at 6"
    );
    let best = std::fs::read_to_string(dir.path().join("checkpoints/best")).unwrap();
    assert_eq!(best.trim(), "step-00000002");
    assert!(dir.path().join("checkpoints/step-00000002/model.safetensors").exists());
}

#[test]
fn config_errors_name_the_field() {
    let err = TrainConfig::load(None, &["optim.learning_rate=1".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("learning_rate"), "{err}");
    let cfg = TrainConfig::load(
        None,
        &[
            "optim.lr=1e-4".into(),
            "optim.min_lr=1e-5".into(),
            "data.weights=\"code=1\"".into(),
        ],
    )
    .unwrap();
    assert_eq!((cfg.optim.lr, cfg.data.weights.as_str()), (1e-4, "code=1"));
    assert!(
        TrainConfig::load(None, &["optim.min_lr=1".into()]).is_err(),
        "min_lr above lr is refused"
    );
    for (bad, field) in [
        ("data.val_permille=2000", "val_permille"),
        ("optim.plateau_factor=0", "plateau_factor"),
        ("optim.grad_clip=-1", "grad_clip"),
        ("model.dropout=1.5", "dropout"),
        ("data.batch_size=\"many\"", "batch_size"),
        ("optim.batch_schedule=\"doubling\"", "batch_schedule"),
        (
            "optim.batch_schedule=\"linear:0->64 over 100 tokens\"",
            "batch_schedule",
        ),
        ("optim.batch_schedule=\"noise-scale\"", "grad_accum"),
        ("optim.batch_lr_rule=\"cubic\"", "batch_lr_rule"),
    ] {
        let err = TrainConfig::load(None, &[bad.into()]).unwrap_err().to_string();
        assert!(err.contains(field), "{bad}: {err}");
    }
    let cfg = TrainConfig::load(
        None,
        &[
            "data.batch_size=\"auto\"".into(),
            "optim.batch_schedule=\"linear:32_768→262144 over 50000000 tokens\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.data.batch_size, BatchSize::Auto);
    let ramp = BatchSchedule::Linear {
        start: 32_768,
        end: 262_144,
        over: 50_000_000,
    };
    assert_eq!(cfg.optim.batch_schedule, ramp);
    // Written back as it was read: a checkpoint's config reloads to the same schedule.
    let saved = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(saved.path(), cfg.to_toml()).unwrap();
    assert_eq!(TrainConfig::load(Some(saved.path()), &[]).unwrap(), cfg);
    assert_eq!(
        TrainConfig::default().data.weights,
        "text=0.4,code=0.4,mixed=0.2",
        "the default the README documents"
    );
}

#[test]
fn a_model_file_whose_config_is_invalid_is_refused_with_a_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mmrec_model::preset("tiny", 64).unwrap();
    let vm = VarMap::new();
    MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let path = dir.path().join("bad.safetensors");
    let meta = ModelMeta {
        role: Role::Base,
        domain: None,
        config: ModelConfig { n_heads: 0, ..cfg },
        frozen: vec![],
        lineage: serde_json::json!({}),
        fusion: None,
        tokenizer: None,
    };
    save(&path, &varmap_tensors(&vm), &meta).unwrap();
    let out = mmrec_train(
        "eval",
        &[
            "--model".into(),
            path.to_string_lossy().into(),
            "--data".into(),
            shards().to_string_lossy().into(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("n_heads"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn resume_follows_out_and_lets_set_extend_the_run_but_not_change_the_model() {
    let (first, moved) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = base_args(first.path(), 6);
    args.extend(["--set".into(), "run.ckpt_every=3".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());
    let before = std::fs::read(first.path().join("metrics.jsonl")).unwrap();
    // A copy of the finished run, resumed with more steps, works in the copy only.
    let copy = moved.path().join("run");
    std::process::Command::new("cp")
        .args(["-r", first.path().to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    let mut resume = base_args(&copy, 10);
    resume.extend(["--set".into(), "run.ckpt_every=3".into(), "--resume".into()]);
    let out = mmrec_train("pretrain", &resume);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stderr).contains("from step 6"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<u64> = std::fs::read_to_string(copy.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .map(|_| 0)
        })
        .collect();
    assert_eq!(steps.len(), 10, "steps 1-10, each logged once");
    assert_eq!(
        std::fs::read(first.path().join("metrics.jsonl")).unwrap(),
        before,
        "the original run is untouched"
    );
    // What is being trained cannot change on resume.
    let mut changed = base_args(&copy, 12);
    changed.extend(["--set".into(), "data.seq_len=64".into(), "--resume".into()]);
    let out = mmrec_train("pretrain", &changed);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("data.seq_len"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_kill_during_a_checkpoint_swap_resumes_from_the_newest_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 6);
    args.extend(["--set".into(), "run.ckpt_every=3".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());
    // As a kill between the two renames of a re-save leaves it: `latest` names a step
    // that is not there, beside a half-written temporary directory.
    let root = dir.path().join("checkpoints");
    std::fs::remove_dir_all(root.join("step-00000006")).unwrap();
    std::fs::create_dir_all(root.join(".tmp-step-00000006-99999")).unwrap();
    args.push("--resume".into());
    let out = mmrec_train("pretrain", &args);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from step 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !root.join(".tmp-step-00000006-99999").exists(),
        "stale temporary checkpoints are removed"
    );
    assert_eq!(losses(dir.path()).len(), 6);
}

#[test]
fn fusion_training_changes_only_the_fusion_layer() {
    for method in [mmrec_schemas::FusionMethod::Gated, mmrec_schemas::FusionMethod::Mixture] {
        fusion_training_changes_only(method);
    }
}

fn fusion_training_changes_only(method: mmrec_schemas::FusionMethod) {
    let dir = tempfile::tempdir().unwrap();
    let vocab = mmrec_schemas::read_manifest(&shards()).unwrap().tokenizer.vocab_size;
    let cfg = mmrec_model::preset("tiny", vocab).unwrap();
    let vm = VarMap::new();
    mmrec_model::FusedModel::new(&cfg, method, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    initialise(&vm, &cfg).unwrap();
    let init = dir.path().join("fused.safetensors");
    save(
        &init,
        &varmap_tensors(&vm),
        &ModelMeta {
            role: Role::Fused,
            domain: None,
            config: cfg,
            frozen: vec!["embed.*".into(), "experts.*".into()],
            lineage: serde_json::Value::Null,
            fusion: Some(method),
            tokenizer: None,
        },
    )
    .unwrap();
    let out = dir.path().join("run");
    let mut args = base_args(&out, 4);
    args.extend([
        "--init".into(),
        init.to_string_lossy().into_owned(),
        "--set".into(),
        "optim.lr=1e-2".into(),
    ]);
    assert!(mmrec_train("fusion", &args).status.success());
    let before = candle_core::safetensors::load(&init, &Device::Cpu).unwrap();
    let after = candle_core::safetensors::load(out.join("final.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &before {
        let diff = (t - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            diff > 0.0,
            name.starts_with("fusion."),
            "{method:?}: {name} changed by {diff}"
        );
    }
}

#[test]
fn a_micro_batch_over_the_memory_limit_is_halved_with_the_same_effective_batch() {
    let (full, halved) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = base_args(dir, 4);
        args.extend(["--set".into(), "data.batch_size=4".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        assert!(mmrec_train("pretrain", &args).status.success());
    };
    run(full.path(), &[]);
    // Four rows of 32 tokens need about 11 MB of activations by the estimate; 6 MB fits two.
    run(halved.path(), &["--set", "run.memory_limit_mb=6"]);
    let log = std::fs::read_to_string(halved.path().join("metrics.jsonl")).unwrap();
    assert!(
        log.contains("2 micro-batches of 2 rows per batch (same effective batch)"),
        "{log}"
    );
    let (a, b) = (losses(full.path()), losses(halved.path()));
    assert_eq!(a.len(), 4);
    for (step, la) in &a {
        // Same data and the same gradient, summed in another order.
        assert!((la - b[step]).abs() < 1e-4, "step {step}: {la} vs {}", b[step]);
    }
}

#[test]
fn models_record_their_tokenizer_and_refuse_shards_of_another() {
    let dir = tempfile::tempdir().unwrap();
    assert!(mmrec_train("pretrain", &base_args(dir.path(), 2)).status.success());
    let (sha, vocab) = mmrec_trainer::train::data_tokenizer(&[shards()]).unwrap();
    let trained = dir.path().join("final.safetensors");
    assert_eq!(
        mmrec_schemas::safetensors::read_meta(&trained)
            .unwrap()
            .tokenizer
            .as_deref(),
        Some(sha.as_str())
    );
    // The same weights claiming another tokenizer of the same size, then another size.
    let cfg = mmrec_model::preset("tiny", vocab).unwrap();
    let vm = VarMap::new();
    MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let write = |name: &str, config: ModelConfig| {
        let p = dir.path().join(name);
        save(
            &p,
            &varmap_tensors(&vm),
            &ModelMeta {
                role: Role::Base,
                domain: None,
                config,
                frozen: vec![],
                lineage: serde_json::Value::Null,
                fusion: None,
                tokenizer: Some("0".repeat(64)),
            },
        )
        .unwrap();
        p.to_string_lossy().into_owned()
    };
    let other = write("other-tokenizer.safetensors", cfg.clone());
    let eval = |model: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "--model",
            model,
            "--data",
            &shards().to_string_lossy(),
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-batches",
            "1",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        mmrec_train("eval", &args)
    };
    let out = eval(&other, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was trained with tokenizer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eval(&other, &["--allow-tokenizer-mismatch"]).status.success());
    let mut finetune = base_args(&dir.path().join("ft"), 1);
    finetune.extend(["--init".into(), other.clone()]);
    assert!(
        !mmrec_train("finetune", &finetune).status.success(),
        "fine-tuning on another tokenizer's shards is refused"
    );
    // Another vocabulary size is refused even when asked to go on: the ids would not fit.
    let vm_big = VarMap::new();
    let big_cfg = ModelConfig {
        vocab_size: vocab + 10,
        ..cfg
    };
    MMRecModel::new(&big_cfg, VarBuilder::from_varmap(&vm_big, DType::F32, &Device::Cpu)).unwrap();
    let big = dir.path().join("big.safetensors");
    save(
        &big,
        &varmap_tensors(&vm_big),
        &ModelMeta {
            role: Role::Base,
            domain: None,
            config: big_cfg,
            frozen: vec![],
            lineage: serde_json::Value::Null,
            fusion: None,
            tokenizer: Some(sha),
        },
    )
    .unwrap();
    let out = eval(big.to_str().unwrap(), &["--allow-tokenizer-mismatch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("has a vocabulary of {}", vocab + 10)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runs_with_dropout_repeat_and_resume_exactly() {
    let (first, second, killed) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let args = |dir: &Path| {
        let mut a = base_args(dir, 16);
        a.extend([
            "--set".into(),
            "model.dropout=0.2".into(),
            "--set".into(),
            "run.ckpt_every=4".into(),
        ]);
        a
    };
    assert!(mmrec_train("pretrain", &args(first.path())).status.success());
    assert!(mmrec_train("pretrain", &args(second.path())).status.success());
    assert_eq!(
        losses(first.path()),
        losses(second.path()),
        "two runs with dropout give the same losses"
    );
    pretrain_killed_at_checkpoint(&args(killed.path()), killed.path(), 4, 16);
    let mut resume = args(killed.path());
    resume.push("--resume".into());
    assert!(mmrec_train("pretrain", &resume).status.success());
    assert_eq!(
        losses(first.path()),
        losses(killed.path()),
        "a resumed run with dropout retraces the uninterrupted one"
    );
}

#[test]
fn generate_streams_a_continuation_that_repeats_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    assert!(mmrec_train("pretrain", &base_args(dir.path(), 2)).status.success());
    let model = dir.path().join("final.safetensors");
    let tokenizer = mmrec_tests::fixtures().join("tokenizer.json");
    let generate = |seed: &str, tok: &Path| {
        command("mmrec-train")
            .args(["generate", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--tokenizer")
            .arg(tok)
            .args(["--prompt", "def parse(line):", "--max-tokens", "24", "--seed", seed])
            .output()
            .unwrap()
    };
    let a = generate("1", &tokenizer);
    let (out, err) = (String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&a.stderr));
    assert!(a.status.success(), "{err}");
    assert!(
        out.starts_with("def parse(line):") && out.len() > "def parse(line):".len(),
        "{out}"
    );
    assert!(err.contains("tokens generated at") && err.contains("tokens/s"), "{err}");
    assert_eq!(a.stdout, generate("1", &tokenizer).stdout);
    assert_ne!(a.stdout, generate("2", &tokenizer).stdout);
    // The model records its tokenizer's sha256: another tokenizer file is refused.
    let other = dir.path().join("other-tokenizer.json");
    std::fs::write(
        &other,
        std::fs::read_to_string(&tokenizer).unwrap().replacen('{', "{ ", 1),
    )
    .unwrap();
    let refused = generate("1", &other);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another tokenizer"));
}

#[test]
fn plot_draws_runs_into_a_png_and_names_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 6);
    args.extend(["--set".into(), "run.eval_every=3".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());
    let png = dir.path().join("loss.png");
    let o = command("mmrec-train")
        .arg("plot")
        .arg(dir.path())
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    // Against tokens and wall time: every training and validation record carries both.
    for (axis, field) in [("tokens", "tokens_seen"), ("time", "elapsed_s")] {
        let records = records_with(dir.path(), "step");
        let with_loss = records
            .iter()
            .filter(|r| r.get("loss").is_some() || r.get("val").is_some());
        assert!(with_loss.clone().count() >= 8 && with_loss.into_iter().all(|r| r[field].is_number()));
        let png = dir.path().join(format!("loss-{axis}.png"));
        let o = command("mmrec-train")
            .args(["plot", "--x", axis, "--out"])
            .arg(&png)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    }
    let missing = command("mmrec-train")
        .args(["plot", "/nonexistent/run"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/run"));
}

#[test]
fn eval_at_length_reports_loss_per_position_bucket_and_draws_it() {
    let dir = tempfile::tempdir().unwrap();
    assert!(mmrec_train("pretrain", &base_args(dir.path(), 2)).status.success());
    let png = dir.path().join("position.png");
    let o = command("mmrec-train")
        .args(["eval", "--device", "cpu", "--model"])
        .arg(dir.path().join("final.safetensors"))
        .arg("--data")
        .arg(shards())
        .args(["--context-len", "700", "--seq-len", "64", "--json", "--plot"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all = report["by_position"]["all"].as_array().unwrap();
    assert_eq!((all[0]["from"].as_u64(), all[0]["to"].as_u64()), (Some(0), Some(512)));
    assert!(all[0]["tokens"].as_u64() > Some(0) && all[0]["loss"].as_f64().is_some_and(f64::is_finite));
    // Nothing past the context limit of 700 tokens.
    assert!(all[2..].iter().all(|b| b["tokens"].as_u64() == Some(0)));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
}

#[test]
fn accumulated_steps_log_the_gradient_noise_scale() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 8);
    args.extend(["--set".into(), "optim.grad_accum=2".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let scales: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["noise_scale"].as_f64())
        .collect();
    assert!(
        !scales.is_empty() && scales.iter().all(|b| b.is_finite() && *b > 0.0),
        "{log}"
    );
    // One micro-batch per step says nothing about the noise: no estimate is logged.
    let single = tempfile::tempdir().unwrap();
    assert!(mmrec_train("pretrain", &base_args(single.path(), 3)).status.success());
    assert!(!std::fs::read_to_string(single.path().join("metrics.jsonl"))
        .unwrap()
        .contains("noise_scale"));
}

/// Every record of a run's metrics that has `field`, as JSON.
fn records_with(out: &Path, field: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get(field).is_some())
        .collect()
}

#[test]
fn an_auto_batch_size_is_measured_once_logged_and_kept_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 3);
    // A small memory budget bounds the climb (and is what a real device's memory does).
    args.extend(["--set", "data.batch_size=\"auto\"", "--set", "run.memory_limit_mb=40"].map(String::from));
    args.extend(["--set", "run.ckpt_every=3"].map(String::from));
    assert!(mmrec_train("pretrain", &args).status.success());
    let searches = records_with(dir.path(), "batch_search");
    assert_eq!(searches.len(), 1);
    let trials = searches[0]["batch_search"].as_array().unwrap();
    let fastest = trials
        .iter()
        .filter_map(|t| t["tokens_per_s"].as_f64())
        .fold(0.0, f64::max);
    let choice = &searches[0]["batch_choice"];
    assert!(
        fastest > 0.0 && choice["tokens_per_s"].as_f64().unwrap() * 1.03 >= fastest,
        "{choice}"
    );
    // The climb without checkpointing went up in size and stopped for a reason: its last
    // size did not fit, or neither of the last two was 3% faster than the best before them.
    let plain: Vec<_> = trials.iter().filter(|t| t["grad_checkpointing"] == false).collect();
    let rows: Vec<u64> = plain.iter().map(|t| t["rows"].as_u64().unwrap()).collect();
    assert!(rows.windows(2).all(|w| w[0] < w[1]), "{rows:?}");
    let speed = |t: &serde_json::Value| t["tokens_per_s"].as_f64();
    let misfit = speed(plain.last().unwrap()).is_none();
    let stalled = plain.len() >= 3 && {
        let n = plain.len();
        let before = plain[..n - 2].iter().filter_map(|t| speed(t)).fold(0.0, f64::max);
        plain[n - 2..]
            .iter()
            .all(|t| speed(t).is_some_and(|s| s <= before * 1.03))
    };
    assert!(misfit || stalled, "{trials:?}");
    assert!(
        plain.last().unwrap()["tokens_per_s"].is_null() || plain.len() >= 3,
        "{trials:?}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("checkpoints/step-00000003/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(&state["batch_choice"], choice);

    // Resumed and extended: no second search, the same micro-batch.
    let mut more = args.clone();
    more.extend(["--set", "run.steps=5", "--resume"].map(String::from));
    assert!(mmrec_train("pretrain", &more).status.success());
    assert_eq!(records_with(dir.path(), "batch_search").len(), 1);
    let steps = records_with(dir.path(), "loss");
    let per_step = steps[0]["tokens_seen"].as_u64().unwrap();
    assert!(per_step >= 32 * choice["rows"].as_u64().unwrap(), "{}", steps[0]);
    assert_eq!(steps.last().unwrap()["step"], 5);
    assert_eq!(steps.last().unwrap()["tokens_seen"].as_u64().unwrap(), 5 * per_step);
}

#[test]
fn a_noise_scale_batch_grows_within_its_bound_and_resumes_exactly() {
    let schedule = [
        "--set",
        "optim.grad_accum=2",
        "--set",
        "optim.batch_schedule=\"noise-scale\"",
        "--set",
        "optim.max_batch_tokens=512",
        "--set",
        "run.ckpt_every=6",
    ]
    .map(String::from);
    let (straight, killed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = base_args(straight.path(), 12);
    args.extend(schedule.clone());
    assert!(mmrec_train("pretrain", &args).status.success());
    let accum: Vec<u64> = records_with(straight.path(), "grad_accum")
        .iter()
        .map(|r| r["grad_accum"].as_u64().unwrap())
        .collect();
    assert_eq!(accum.len(), 12);
    // 2 rows × 32 tokens a batch: at least the base 2, at most 512 / 64 = 8, never shrinking.
    assert!(accum.windows(2).all(|w| w[0] <= w[1]), "{accum:?}");
    assert!(accum[0] == 2 && accum[11] > 2 && accum[11] <= 8, "{accum:?}");

    let mut args = base_args(killed.path(), 12);
    args.extend(schedule);
    pretrain_killed_at_checkpoint(&args, killed.path(), 6, 12);
    args.push("--resume".into());
    assert!(mmrec_train("pretrain", &args).status.success());
    assert_eq!(
        losses(straight.path()),
        losses(killed.path()),
        "identical losses at every step"
    );
}

#[test]
fn a_linear_ramp_sets_the_global_batch_from_the_tokens_seen() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(dir.path(), 8);
    args.extend(["--set", "optim.batch_schedule=\"linear:64->256 over 600 tokens\""].map(String::from));
    assert!(mmrec_train("pretrain", &args).status.success());
    let steps = records_with(dir.path(), "batch_tokens");
    let tokens: Vec<u64> = steps.iter().map(|r| r["batch_tokens"].as_u64().unwrap()).collect();
    // 64 tokens a batch: 1 batch at the start, 4 once 600 tokens are seen.
    assert_eq!(tokens.first(), Some(&64));
    assert_eq!(tokens.last(), Some(&256), "{tokens:?}");
    assert!(tokens.windows(2).all(|w| w[0] <= w[1]), "{tokens:?}");
    // optim.batch_lr_rule defaults to sqrt: against the same run with a constant rate,
    // each step's rate is √(batches) times higher.
    let constant = tempfile::tempdir().unwrap();
    let mut args = base_args(constant.path(), 8);
    args.extend(["--set", "optim.batch_schedule=\"linear:64->256 over 600 tokens\""].map(String::from));
    args.extend(["--set", "optim.batch_lr_rule=\"constant\""].map(String::from));
    assert!(mmrec_train("pretrain", &args).status.success());
    for (sqrt, flat) in steps.iter().zip(records_with(constant.path(), "batch_tokens")) {
        let ratio = sqrt["lr"].as_f64().unwrap() / flat["lr"].as_f64().unwrap();
        let want = (sqrt["batch_tokens"].as_f64().unwrap() / 64.0).sqrt();
        assert!((ratio - want).abs() < 1e-9, "step {}: {ratio} vs {want}", sqrt["step"]);
    }
}

#[test]
fn bench_writes_the_suite_json_and_its_charts() {
    let dir = tempfile::tempdir().unwrap();
    let o = command("mmrec-train")
        .args([
            "bench",
            "--device",
            "cpu",
            "--presets",
            "tiny",
            "--seq-lens",
            "16,32",
            "--batch",
            "2",
        ])
        .args([
            "--scaling-tokens",
            "64",
            "--vocab",
            "256",
            "--repeats",
            "2",
            "--memory-mb",
            "8",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("benchmark_results.json")).unwrap()).unwrap();
    assert_eq!(r["schema_version"], 1);
    assert!(r["machine"]["cpu"].is_string() && r["machine"]["candle"] == "0.11.1");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "one per sequence length");
    let generation = r["generation"].as_array().unwrap();
    let batches: Vec<u64> = generation.iter().map(|g| g["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 32], "decoding at batch 1 and 32");
    assert!(generation
        .iter()
        .all(|g| g["decode_tokens_per_s"].as_f64().unwrap() > 0.0));
    for run in runs {
        let layers = run["layers"].as_object().unwrap();
        for name in ["embedding", "block.0", "block.1", "head_and_loss"] {
            let t = &layers[name];
            let (lo, mid, hi) = (
                t["min_ms"].as_f64().unwrap(),
                t["median_ms"].as_f64().unwrap(),
                t["max_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < lo && lo <= mid && mid <= hi, "{name}: {t}");
        }
        assert!(run["train_step_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(r["hem"].as_array().unwrap().len(), 2);
    let scaling = r["scaling"].as_array().unwrap();
    assert!(scaling.iter().any(|s| s["varies"] == "seq_len") && scaling.iter().any(|s| s["varies"] == "batch"));
    let plan = &r["memory_plan"][0];
    assert!(plan["without_checkpointing"][0].as_u64().unwrap() >= 1, "{plan}");
    for png in ["hem.png", "scaling.png"] {
        assert_eq!(&std::fs::read(dir.path().join(png)).unwrap()[..4], b"\x89PNG", "{png}");
    }
    // The charts again from the JSON alone (a results file read back).
    let again = dir.path().join("again");
    let o = command("mmrec-train")
        .args(["bench", "--charts-from"])
        .arg(dir.path().join("benchmark_results.json"))
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(again.join("scaling.png").exists() && again.join("hem.png").exists());
}

/// Segment training: rows of 32-token segments, 4 rows, the state carried for 128 tokens.
fn segment_args(out: &Path, steps: u64, context: usize) -> Vec<String> {
    let mut args = base_args(out, steps);
    for set in [
        format!("data.context_len={context}"),
        "data.batch_size=4".into(),
        "optim.grad_accum=2".into(),
        "run.ckpt_every=5".into(),
    ] {
        args.extend(["--set".into(), set]);
    }
    args
}

#[test]
fn segment_training_carries_its_state_through_a_kill_and_resumes_exactly() {
    let (straight, killed, windows) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    assert!(mmrec_train("pretrain", &segment_args(straight.path(), 12, 128))
        .status
        .success());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(straight.path().join("checkpoints/step-00000012/state.json")).unwrap(),
    )
    .unwrap();
    // 12 steps of 2 segments; the starts of 4 rows; the state's file beside the weights.
    assert_eq!(state["segments"]["segment"], 24);
    assert_eq!(state["segments"]["starts"].as_array().unwrap().len(), 4);
    assert!(straight
        .path()
        .join("checkpoints/step-00000012/carried.safetensors")
        .exists());

    let args = segment_args(killed.path(), 12, 128);
    pretrain_killed_at_checkpoint(&args, killed.path(), 5, 12);
    let mut resume = args.clone();
    resume.push("--resume".into());
    assert!(mmrec_train("pretrain", &resume).status.success());
    assert_eq!(
        losses(straight.path()),
        losses(killed.path()),
        "identical losses at every step"
    );

    // A context of one segment reads the same streams without carrying: other losses.
    assert!(mmrec_train("pretrain", &segment_args(windows.path(), 12, 32))
        .status
        .success());
    let (carried, fresh) = (losses(straight.path()), losses(windows.path()));
    assert_eq!(carried.len(), fresh.len());
    assert_ne!(carried[&12], fresh[&12], "a carried state changes what the model sees");
}

#[test]
fn segment_training_refuses_what_would_break_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    for (set, says) in [
        ("data.context_len=48", "multiple of data.seq_len"),
        ("data.batch_size=\"auto\"", "fixed data.batch_size"),
    ] {
        let mut args = segment_args(dir.path(), 2, 64);
        args.extend(["--set".into(), set.into()]);
        let o = mmrec_train("pretrain", &args);
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{set}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn two_ranks_train_like_one_process_with_their_rows_together() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Evaluations too: the ranks take rank 0's figure.
    let evals = ["--set", "run.eval_every=3", "--set", "run.eval_batches=2"].map(String::from);
    let mut args = base_args(one.path(), 6);
    args.extend(["--set".into(), "data.batch_size=4".into()]);
    args.extend(evals.clone());
    assert!(mmrec_train("pretrain", &args).status.success());

    // Two ranks of 2 rows each read the same 4-row global batches.
    let mut args = vec!["--procs".to_string(), "2".into(), "--".into(), "pretrain".into()];
    args.extend(base_args(two.path(), 6));
    args.extend(evals);
    // And the ranks compare their parameters' hash every 2 steps.
    args.extend(["--set".into(), "run.check_sync_every=2".into()]);
    let o = mmrec_train("launch", &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // Each rank says where it stands (a CPU build reduces over TCP).
    assert!(
        err.contains("rank 0 of 2, Tcp") && err.contains("rank 1 of 2, Tcp"),
        "{err}"
    );
    let (a, b) = (losses(one.path()), losses(two.path()));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "rank 0 alone writes the metrics, once per step");
    for (step, la) in &a {
        assert!((la - b[step]).abs() < 1e-4, "step {step}: {la} against {}", b[step]);
    }
    // Rank 0 counts every rank's tokens.
    assert_eq!(
        step_field(one.path(), "tokens_seen"),
        step_field(two.path(), "tokens_seen")
    );
    assert!(two.path().join("final.safetensors").exists());
}

/// `pretrain` on the fixtures as rank `rank` of `world`, meeting the others at
/// 127.0.0.1:`port` (0: any port, for a rank that should fail before it meets them).
fn rank_pretrain(out: &Path, steps: u64, rank: usize, world: usize, port: u16) -> std::process::Command {
    let mut c = command("mmrec-train");
    c.arg("pretrain")
        .args(base_args(out, steps))
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    c
}

#[test]
fn ranks_that_split_their_batches_differently_keep_identical_weights() {
    // Rank 1 alone must split its 4 rows into micro-batches (its memory limit), as after an
    // out-of-memory halving: every rank still divides the summed gradients alike, which the
    // parameter hash compared at every step checks.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rank = |r: usize, extra: &[&str]| {
        rank_pretrain(dir.path(), 4, r, 2, port)
            .args(["--set", "data.batch_size=4", "--set", "run.check_sync_every=1"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (r0, r1) = (rank(0, &[]), rank(1, &["--set", "run.memory_limit_mb=6"]));
    let (o0, o1) = (r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap());
    let said = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(
        o0.status.success() && o1.status.success(),
        "{}\n{}",
        said(&o0),
        said(&o1)
    );
    assert!(said(&o1).contains("2 micro-batches of 2 rows"), "{}", said(&o1));
    assert!(!said(&o0).contains("micro-batches of"), "{}", said(&o0));
    assert_eq!(losses(dir.path()).len(), 4);
}

#[test]
fn a_measured_batch_size_is_refused_with_data_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let o = rank_pretrain(dir.path(), 2, 0, 2, 0)
        .args(["--set", "data.batch_size=\"auto\""])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"auto\" with data parallelism"), "{err}");
}

#[test]
fn a_rank_that_fails_or_never_comes_ends_the_job_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // Every rank refuses its config: launch exits with a rank's status and says which.
    let mut args = vec!["--procs".to_string(), "2".into(), "--".into(), "pretrain".into()];
    args.extend(base_args(dir.path(), 2));
    args.extend(["--set".into(), "data.seq_len=0".into()]);
    let o = mmrec_train("launch", &args);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("failed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Rank 0 of two, alone: an error naming the missing rank after the timeout, not a hang.
    let started = std::time::Instant::now();
    let o = rank_pretrain(dir.path(), 2, 0, 2, 0)
        .env("MMREC_DIST_TIMEOUT_S", "2")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ranks [1] never came"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn a_backend_this_build_or_device_cannot_serve_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, says) in [("bogus", "expected tcp or nccl"), ("nccl", "nccl")] {
        // One rank asked for NCCL on the CPU: a CPU build has no NCCL, a CUDA one needs a GPU.
        let o = rank_pretrain(dir.path(), 2, 0, 1, 0)
            .args(["--device", "cpu"])
            .env("MMREC_DIST_BACKEND", backend)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(!o.status.success());
        assert!(err.contains(says), "{backend}: {err}");
    }
}

#[test]
fn a_data_parallel_run_stopped_by_a_signal_resumes_exactly_and_on_another_world_size() {
    let (straight, stopped) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let launch = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--procs".to_string(), "2".into(), "--".into(), "pretrain".into()];
        args.extend(base_args(out, 120));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    assert!(mmrec_train("launch", &launch(straight.path(), &[])).status.success());

    // SIGTERM to the launcher: both ranks stop after the same step, rank 0 checkpoints.
    let mut child = command("mmrec-train")
        .arg("launch")
        .args(launch(stopped.path(), &[]))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = stopped.path().join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 10 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    terminate(&child);
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert!(losses(stopped.path()).len() < 120, "stopped part-way");
    assert!(mmrec_train("launch", &launch(stopped.path(), &["--resume"]))
        .status
        .success());
    assert_eq!(
        losses(straight.path()),
        losses(stopped.path()),
        "identical losses at every step"
    );

    // One process goes on from the two ranks' checkpoint: the same rows per rank, so a
    // global batch of 2 rows instead of 4, continuing the same data stream.
    let mut args = base_args(stopped.path(), 130);
    args.push("--resume".into());
    assert!(mmrec_train("pretrain", &args).status.success());
    assert_eq!(losses(stopped.path()).len(), 130);
}

#[test]
fn segment_training_splits_its_rows_and_their_states_into_micro_batches() {
    let (full, halved) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(mmrec_train("pretrain", &segment_args(full.path(), 6, 128))
        .status
        .success());
    // Four rows over a 6 MB limit: two micro-batches of two rows, each with its rows' states.
    let mut args = segment_args(halved.path(), 6, 128);
    args.extend(["--set".into(), "run.memory_limit_mb=6".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());
    let log = std::fs::read_to_string(halved.path().join("metrics.jsonl")).unwrap();
    assert!(log.contains("2 micro-batches of 2 rows"), "{log}");
    let (a, b) = (losses(full.path()), losses(halved.path()));
    assert_eq!(a.len(), 6);
    for (step, la) in &a {
        assert!((la - b[step]).abs() < 1e-4, "step {step}: {la} vs {}", b[step]);
    }
    // Gradient checkpointing recomputes each block from the carried states: the same losses.
    let recomputed = tempfile::tempdir().unwrap();
    let mut args = segment_args(recomputed.path(), 6, 128);
    args.extend(["--set".into(), "run.grad_checkpointing=true".into()]);
    assert!(mmrec_train("pretrain", &args).status.success());
    let c = losses(recomputed.path());
    for (step, la) in &a {
        assert!(
            (la - c[step]).abs() < 1e-4,
            "step {step}: {la} vs {} with checkpointing",
            c[step]
        );
    }
}
