//! `mmrec-transfer` on real model files.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mmrec_model::io::{load_fused, load_model, save, varmap_tensors};
use mmrec_model::{initialise, MMRecModel};
use mmrec_schemas::{ModelConfig, ModelMeta, Role};
use mmrec_tests::command;

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 97,
        d_model: 32,
        n_layers: 3,
        n_heads: 2,
        n_slots: 4,
        chunk_sizes: vec![8, 32],
        memory_window: 8,
        dropout: 0.0,
        uboo_weight: 0.0,
    }
}

/// A base model file with the given tensors changed (None removes a tensor).
fn base_file(dir: &Path, name: &str, edit: &[(&str, Option<Tensor>)]) -> PathBuf {
    let vm = VarMap::new();
    MMRecModel::new(&cfg(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    initialise(&vm, &cfg()).unwrap();
    let mut tensors = varmap_tensors(&vm);
    for (n, t) in edit {
        tensors.retain(|(x, _)| x != n);
        if let Some(t) = t {
            tensors.push((n.to_string(), t.clone()));
        }
    }
    let path = dir.join(name);
    save(
        &path,
        &tensors,
        &ModelMeta {
            role: Role::Base,
            domain: None,
            config: cfg(),
            frozen: vec![],
            lineage: serde_json::json!({}),
            fusion: None,
            tokenizer: None,
        },
    )
    .unwrap();
    path
}

fn transfer(args: &[&str]) -> Output {
    command("mmrec-transfer").args(args).output().unwrap()
}

fn logits_of(path: &Path) -> Tensor {
    let (m, _) = load_model(path, &Device::Cpu).unwrap();
    let toks = Tensor::from_vec(
        (0..2 * 70).map(|i| (i * 13 % 97) as u32).collect::<Vec<_>>(),
        (2, 70),
        &Device::Cpu,
    )
    .unwrap();
    m.forward(&toks, None, false).unwrap().0
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_freshly_transferred_expert_gives_bit_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let out = dir.path().join("code.safetensors");
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        out.to_str().unwrap(),
        "--freeze",
        "blocks.{0-1}.*",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(same(&logits_of(&base), &logits_of(&out)));
    let meta = mmrec_schemas::safetensors::read_meta(&out).unwrap();
    assert_eq!(
        (meta.role, meta.domain.as_deref(), meta.frozen),
        (Role::Expert, Some("code"), vec!["blocks.{0-1}.*".to_string()])
    );
    let sha = mmrec_schemas::atomic::sha256_hex(&std::fs::read(&base).unwrap());
    assert_eq!(
        meta.lineage["sources"][0]["sha256"], sha,
        "lineage records the source's sha256"
    );
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("blocks.{0..1}.ffn.up.weight") && report.contains("trainable params:"),
        "{report}"
    );
}

#[test]
fn layer_maps_copy_skip_and_repeat_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let out = dir.path().join("e.safetensors");
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "text",
        "--out",
        out.to_str().unwrap(),
        "--map",
        "blocks.{i} <- blocks.{2*i}",
        "--n-layers",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let row = |t: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["target"] == t)
            .unwrap()
            .clone()
    };
    assert_eq!(row("blocks.1.ffn.up.weight")["source"], "blocks.2.ffn.up.weight");
    assert_eq!(row("blocks.1.ffn.up.weight")["status"], "mapped");
    let skipped = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "skipped")
        .count();
    assert_eq!(skipped, 23, "source block 1's 23 tensors are left out, and reported");
    let src = candle_core::safetensors::load(&base, &Device::Cpu).unwrap();
    let dst = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(same(&src["blocks.2.in_proj.weight"], &dst["blocks.1.in_proj.weight"]));
    assert_eq!(mmrec_schemas::safetensors::read_meta(&out).unwrap().config.n_layers, 2);
    // A map past the source's blocks is refused.
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "text",
        "--out",
        out.to_str().unwrap(),
        "--layers",
        "0-3",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_fused_model_with_its_gate_forced_to_one_expert_reproduces_that_expert() {
    // Gated mixes hidden states (the expert's logits come out); mixture mixes
    // distributions (its log-probabilities come out).
    for method in ["gated", "mixture"] {
        gate_forced_to_the_text_expert(method);
    }
}

fn gate_forced_to_the_text_expert(method: &str) {
    let dir = tempfile::tempdir().unwrap();
    let text = base_file(dir.path(), "text.safetensors", &[]);
    let code = base_file(dir.path(), "code.safetensors", &[]);
    let fused = dir.path().join("fused.safetensors");
    let o = transfer(&[
        "fuse",
        "--text",
        text.to_str().unwrap(),
        "--code",
        code.to_str().unwrap(),
        "--method",
        method,
        "--embed",
        "text",
        "--out",
        fused.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Force the router to the text expert.
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&fused, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    for (n, t) in tensors.iter_mut() {
        if n == "fusion.router.bias" {
            *t = Tensor::new(&[200f32, -200.0], &Device::Cpu).unwrap();
        }
    }
    let meta = mmrec_schemas::safetensors::read_meta(&fused).unwrap();
    save(&fused, &tensors, &meta).unwrap();
    let (model, _) = load_fused(&fused, &Device::Cpu).unwrap();
    let toks = Tensor::from_vec(
        (0..2 * 70).map(|i| (i * 13 % 97) as u32).collect::<Vec<_>>(),
        (2, 70),
        &Device::Cpu,
    )
    .unwrap();
    let (got, weights) = model.forward(&toks, false).unwrap();
    assert_eq!(
        weights
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .min_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        1.0
    );
    let want = match method {
        "mixture" => candle_nn::ops::log_softmax(&logits_of(&text), 2).unwrap(),
        _ => logits_of(&text),
    };
    assert!(same(&got, &want), "{method}");
}

#[test]
fn concat_fusion_starts_as_the_average_of_identical_experts() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let fused = dir.path().join("fused.safetensors");
    assert!(transfer(&[
        "fuse",
        "--text",
        base.to_str().unwrap(),
        "--code",
        base.to_str().unwrap(),
        "--out",
        fused.to_str().unwrap()
    ])
    .status
    .success());
    let (model, meta) = load_fused(&fused, &Device::Cpu).unwrap();
    assert_eq!(meta.frozen, ["embed.*", "experts.*"]);
    let toks = Tensor::from_vec(
        (0..70).map(|i| (i * 13 % 97) as u32).collect::<Vec<_>>(),
        (1, 70),
        &Device::Cpu,
    )
    .unwrap();
    let want = load_model(&base, &Device::Cpu)
        .unwrap()
        .0
        .forward(&toks, None, false)
        .unwrap()
        .0;
    let got = model.forward(&toks, false).unwrap().0;
    let diff = (want - got)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn mismatches_have_distinct_exit_codes_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let run = |src: &Path, extra: &[&str]| {
        let mut a = vec![
            src.to_str().unwrap(),
            "--to",
            "expert",
            "--domain",
            "code",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        transfer(&a)
    };
    let wrong = base_file(
        dir.path(),
        "shape.safetensors",
        &[(
            "blocks.1.ffn.up.bias",
            Some(Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap()),
        )],
    );
    assert_eq!(run(&wrong, &[]).status.code(), Some(3));
    let missing = base_file(dir.path(), "missing.safetensors", &[("blocks.2.norm2.weight", None)]);
    let o = run(&missing, &[]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("blocks.2.norm2.weight"));
    let extra = base_file(
        dir.path(),
        "extra.safetensors",
        &[(
            "blocks.0.surprise",
            Some(Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()),
        )],
    );
    assert_eq!(run(&extra, &[]).status.code(), Some(5));
    let nan = base_file(
        dir.path(),
        "nan.safetensors",
        &[("norm.weight", Some(Tensor::new(&[f32::NAN; 32], &Device::Cpu).unwrap()))],
    );
    assert_eq!(run(&nan, &[]).status.code(), Some(6));
    assert!(!out.exists(), "nothing written on any refusal");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "a refused write removes its temporary file: {leftovers:?}"
    );
    // With an explicit policy, the missing tensor is created and reported.
    let o = run(
        &missing,
        &["--allow-partial", "--init", "blocks.*.norm2.weight=ones", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["target"] == "blocks.2.norm2.weight" && r["status"] == "initialised"));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        t["blocks.2.norm2.weight"]
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        32.0
    );
}

#[test]
fn freeze_patterns_must_match_and_dry_runs_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let out = dir.path().join("out.safetensors");
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        out.to_str().unwrap(),
        "--freeze",
        "blocks.{7-9}.*",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("matches no tensor"));
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(o.status.success());
    assert!(!out.exists());
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
        "--sync",
    ]);
    assert_eq!(o.status.code(), Some(2), "--sync with --dry-run is a usage error");
    // --sync adds only the flush: the same bytes as the default atomic write.
    let synced = dir.path().join("synced.safetensors");
    assert!(transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());
    assert!(transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        synced.to_str().unwrap(),
        "--sync"
    ])
    .status
    .success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&synced).unwrap());
}

#[test]
fn narrowing_conversions_report_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = vec![1f32; 32];
    big[3] = 1e6;
    big[9] = -7e4;
    let base = base_file(
        dir.path(),
        "base.safetensors",
        &[("norm.weight", Some(Tensor::new(big.as_slice(), &Device::Cpu).unwrap()))],
    );
    let out = dir.path().join("half.safetensors");
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        "code",
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
        "--json",
    ]);
    assert!(o.status.success());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["overflows"]["norm.weight"], 2);
    let h = mmrec_schemas::safetensors::read_header(&out).unwrap();
    assert_eq!(
        h.tensors["blocks.0.ffn.up.weight"].dtype,
        mmrec_schemas::safetensors::Dtype::F16
    );
}

#[test]
fn forged_or_truncated_files_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let bytes = std::fs::read(&base).unwrap();
    let out = dir.path().join("out.safetensors");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() - 100].to_vec(), "outside"),
        (
            "huge-header",
            {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "runs past the end",
        ),
        ("tiny", bytes[..5].to_vec(), "too short"),
    ];
    for (name, data, msg) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, data).unwrap();
        let o = transfer(&[
            p.to_str().unwrap(),
            "--to",
            "expert",
            "--domain",
            "x",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{name}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(msg),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!out.exists());
    }
    // Through the binary: `inspect` refuses a file with bytes appended.
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0u8; 16]);
    let p = dir.path().join("padded.safetensors");
    std::fs::write(&p, padded).unwrap();
    let o = transfer(&["inspect", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("16 trailing bytes"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    // `mmrec-transfer inspect model | head -3`: the closed pipe must not cause a panic.
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let mut child = command("mmrec-transfer")
        .args(["inspect", base.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// An expert of `base` (through `mmrec-transfer --to expert`, so its lineage names the
/// base), then "fine-tuned": every tensor shifted by seeded noise, the metadata kept.
fn fine_tuned_expert(dir: &Path, base: &Path, domain: &str, seed: u64) -> PathBuf {
    let out = dir.join(format!("{domain}.safetensors"));
    let o = transfer(&[
        base.to_str().unwrap(),
        "--to",
        "expert",
        "--domain",
        domain,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = mmrec_schemas::safetensors::read_meta(&out).unwrap();
    let mut rng = mmrec_schemas::rng::SplitMix(seed);
    let tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&out, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let noise: Vec<f32> = (0..t.elem_count()).map(|_| 0.01 * rng.normal() as f32).collect();
            let shifted = (&t + Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap()).unwrap();
            (n, shifted)
        })
        .collect();
    save(&out, &tensors, &meta).unwrap();
    out
}

fn tensors_of(path: &Path) -> std::collections::HashMap<String, Vec<u32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            )
        })
        .collect()
}

fn merge(base: &Path, experts: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["merge", "--base", base.to_str().unwrap(), "--experts"];
    args.extend(experts.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    transfer(&args)
}

#[test]
fn merging_reproduces_an_expert_or_the_base_and_writes_a_usable_base_with_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let text = fine_tuned_expert(dir.path(), &base, "text", 1);
    let code = fine_tuned_expert(dir.path(), &base, "code", 2);
    let first = dir.path().join("first.safetensors");
    let o = merge(
        &base,
        &[&text, &code],
        &first,
        &["--method", "linear", "--weights", "1,0"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        tensors_of(&first),
        tensors_of(&text),
        "linear (1, 0) is the first expert bit for bit"
    );
    let zero = dir.path().join("zero.safetensors");
    let o = merge(
        &base,
        &[&text, &code],
        &zero,
        &["--method", "task-arithmetic", "--lambda", "0"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        tensors_of(&zero),
        tensors_of(&base),
        "task arithmetic with λ = 0 is the base"
    );
    // Every method gives a normal base-role model file that loads and runs.
    for method in ["linear", "task-arithmetic", "ties", "dare"] {
        let out = dir.path().join(format!("{method}.safetensors"));
        let o = merge(&base, &[&text, &code], &out, &["--method", method, "--density", "0.5"]);
        assert!(o.status.success(), "{method}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(logits_of(&out).dims(), [2, 70, 97]);
        let meta = mmrec_schemas::safetensors::read_meta(&out).unwrap();
        assert_eq!((meta.role, meta.lineage["method"].as_str()), (Role::Base, Some(method)));
        let sha = |p: &Path| mmrec_schemas::atomic::sha256_hex(&std::fs::read(p).unwrap());
        let sources: Vec<&str> = (0..3)
            .map(|i| meta.lineage["sources"][i]["sha256"].as_str().unwrap())
            .collect();
        assert_eq!(sources, [sha(&base), sha(&text), sha(&code)]);
    }
    // DARE: the same seed gives the same file, another seed another model.
    let again = dir.path().join("dare-again.safetensors");
    let other = dir.path().join("dare-other.safetensors");
    merge(
        &base,
        &[&text, &code],
        &again,
        &["--method", "dare", "--density", "0.5"],
    );
    merge(
        &base,
        &[&text, &code],
        &other,
        &["--method", "dare", "--density", "0.5", "--seed", "9"],
    );
    let dare = dir.path().join("dare.safetensors");
    assert_eq!(std::fs::read(&dare).unwrap(), std::fs::read(&again).unwrap());
    assert_ne!(tensors_of(&dare), tensors_of(&other));
}

#[test]
fn merging_refuses_experts_of_another_base_or_shape_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_file(dir.path(), "base.safetensors", &[]);
    let text = fine_tuned_expert(dir.path(), &base, "text", 1);
    let other_base = base_file(
        dir.path(),
        "other.safetensors",
        &[(
            "embed.weight",
            Some(Tensor::ones((97, 32), DType::F32, &Device::Cpu).unwrap()),
        )],
    );
    let stranger = fine_tuned_expert(dir.path(), &other_base, "code", 2);
    let out = dir.path().join("merged.safetensors");
    let o = merge(&base, &[&text, &stranger], &out, &["--method", "ties"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("does not descend from") && err.contains("code.safetensors"),
        "{err}"
    );
    assert!(!out.exists());
    let o = merge(&base, &[&text, &stranger], &out, &["--method", "ties", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A tensor of another shape is refused even with --force.
    let odd = base_file(
        dir.path(),
        "odd.safetensors",
        &[(
            "blocks.0.ffn.up.bias",
            Some(Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap()),
        )],
    );
    let o = merge(
        &base,
        &[&text, &odd],
        &dir.path().join("x.safetensors"),
        &["--method", "linear", "--force"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && err.contains("blocks.0.ffn.up.bias"),
        "{err}"
    );
    let o = merge(
        &base,
        &[&text],
        &dir.path().join("y.safetensors"),
        &["--method", "dare", "--density", "0"],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--density must be in (0, 1]"));
}
