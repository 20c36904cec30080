//! The recipe end to end through the real binaries, on the fixtures: shards → pretrain a
//! base → transfer it into a text and a code expert → fine-tune each → fuse → train the
//! fusion layer → evaluate every model on the held-out split.

use std::path::Path;

use mmrec_schemas::safetensors::read_meta;
use mmrec_schemas::{FusionMethod, Role};
use mmrec_tests::{fixture_shards, run};

fn train(cmd: &str, out: &Path, init: Option<&Path>, steps: u64, extra: &[&str]) {
    let shards = fixture_shards("recipe", 1000, 16);
    let mut args: Vec<String> = vec![cmd.into()];
    if let Some(init) = init {
        args.extend(["--init".into(), init.display().to_string()]);
    }
    args.extend(
        [
            "--data",
            &shards.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--json",
            "--set",
            &format!("run.steps={steps}"),
            "--set",
            "data.seq_len=32",
            "--set",
            "data.batch_size=2",
            "--set",
            "run.eval_every=0",
            "--set",
            "optim.warmup_steps=1",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run("mmrec-train", &args);
    assert!(o.status.success(), "{cmd} failed");
    assert!(out.join("final.safetensors").exists(), "{cmd} wrote its model");
}

fn transfer(args: &[&str]) {
    assert!(run("mmrec-transfer", args).status.success(), "mmrec-transfer {args:?}");
}

#[test]
fn base_to_experts_to_fused_model_through_every_binary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |name: &str| d.join(name).display().to_string();
    train("pretrain", &d.join("base"), None, 4, &[]);
    for domain in ["text", "code"] {
        let init = d.join(format!("{domain}-init.safetensors"));
        transfer(&[
            &path("base/final.safetensors"),
            "--to",
            "expert",
            "--domain",
            domain,
            "--freeze",
            "embed.*",
            "--out",
            &init.display().to_string(),
        ]);
        let weights = format!("data.weights=\"{domain}=1\"");
        train("finetune", &d.join(domain), Some(&init), 3, &["--set", &weights]);
    }
    let fused = d.join("fused-init.safetensors");
    transfer(&[
        "fuse",
        "--text",
        &path("text/final.safetensors"),
        "--code",
        &path("code/final.safetensors"),
        "--method",
        "gated",
        "--out",
        &fused.display().to_string(),
    ]);
    train("fusion", &d.join("fused"), Some(&fused), 3, &[]);

    let meta = read_meta(&d.join("fused/final.safetensors")).unwrap();
    assert_eq!((meta.role, meta.fusion), (Role::Fused, Some(FusionMethod::Gated)));
    assert!(
        meta.tokenizer.is_some(),
        "the tokenizer hash travels through every stage"
    );
    let expert = read_meta(&d.join("code/final.safetensors")).unwrap();
    assert_eq!((expert.role, expert.domain.as_deref()), (Role::Expert, Some("code")));
    assert_eq!(expert.frozen, ["embed.*"]);

    // The trained experts merged into one model of the base's size: their lineage (through
    // transfer and fine-tuning) names the trained base.
    std::fs::create_dir(d.join("merged")).unwrap();
    transfer(&[
        "merge",
        "--base",
        &path("base/final.safetensors"),
        "--experts",
        &path("text/final.safetensors"),
        &path("code/final.safetensors"),
        "--method",
        "ties",
        "--density",
        "0.5",
        "--out",
        &path("merged/final.safetensors"),
    ]);
    assert_eq!(read_meta(&d.join("merged/final.safetensors")).unwrap().role, Role::Base);

    let shards = fixture_shards("recipe", 1000, 16).display().to_string();
    for model in ["base", "text", "code", "fused", "merged"] {
        let file = path(&format!("{model}/final.safetensors"));
        let args = [
            "eval",
            "--model",
            &file,
            "--data",
            &shards,
            "--seq-len",
            "32",
            "--max-batches",
            "2",
            "--json",
        ];
        let o = run("mmrec-train", &args);
        assert!(o.status.success(), "eval {model}");
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(report["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{report}");
        for domain in ["text", "code", "mixed"] {
            let loss = report["domains"][domain]["loss"].as_f64();
            assert!(
                loss.is_some_and(|l| l.is_finite() && l > 0.0),
                "{model} {domain}: {report}"
            );
        }
    }
}
