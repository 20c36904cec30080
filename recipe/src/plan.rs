//! The stages of the recipe, each a command of one of the tools with a content key: the
//! hashes of its input files, its arguments, the tool's version and its upstream stages'
//! keys. A stage whose key has a finished output is skipped; a changed key re-runs it and,
//! through the keys, everything downstream (as Make or DVC, by content, not time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{PipelineConfig, StageSettings};
use crate::{Error, Result};

/// One argument of a stage's command.
#[derive(Debug, Clone)]
pub enum Arg {
    Lit(String),
    /// An input file: its content goes into the key.
    File(PathBuf),
    /// A path inside an upstream stage's output: that stage's key goes into this one's.
    Out(String, &'static str),
    /// A path inside this stage's own output directory.
    Own(&'static str),
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    /// `mmrec-data`, `mmrec-train` or `mmrec-transfer`.
    pub tool: &'static str,
    pub args: Vec<Arg>,
    /// Write the command's stdout to this file of the output (evaluations' JSON).
    pub stdout: Option<&'static str>,
    /// A training run (its `metrics.jsonl` is in its output; it resumes from checkpoints).
    pub trains: bool,
    /// Whatever else decides the output and goes into the key (the split's parts).
    pub salt: String,
}

impl Stage {
    pub fn deps(&self) -> impl Iterator<Item = &str> {
        self.args.iter().filter_map(|a| match a {
            Arg::Out(s, _) => Some(s.as_str()),
            _ => None,
        })
    }
}

fn lit(s: impl Into<String>) -> Arg {
    Arg::Lit(s.into())
}

/// The models the report compares, each with the stage whose output holds it: the base,
/// the control, both experts, the fused model, then each configured merge.
pub fn models(cfg: &PipelineConfig) -> Vec<(String, String)> {
    let fixed = [
        ("base", "pretrain"),
        ("control", "control"),
        ("text", "finetune-text"),
        ("code", "finetune-code"),
        ("fused", "fusion"),
    ];
    let fixed = fixed.iter().map(|(m, s)| (m.to_string(), s.to_string()));
    let merged = cfg
        .merges
        .keys()
        .map(|name| (format!("merged-{name}"), format!("merge-{name}")));
    fixed.chain(merged).collect()
}

/// The stages in dependency order.
pub fn stages(cfg: &PipelineConfig) -> Vec<Stage> {
    let mut out = data_stages(cfg);
    out.extend(model_stages(cfg));
    out.extend(merge_stages(cfg));
    out.extend(eval_stages(cfg));
    out
}

fn shards() -> Arg {
    Arg::Out("split".into(), "shards")
}

fn model_file(stage: &str) -> Arg {
    Arg::Out(stage.into(), "final.safetensors")
}

/// The tokenizer (trained, unless a file is reused) and the split into shards.
fn data_stages(cfg: &PipelineConfig) -> Vec<Stage> {
    let mut out = Vec::new();
    let tokenizer = match (&cfg.tokenizer.path, cfg.tokenizer.vocab_size) {
        (Some(path), _) => Arg::File(path.clone()),
        (None, vocab) => {
            let mut args = vec![lit("tokenizer"), lit("train"), lit("--vocab-size")];
            args.push(lit(vocab.unwrap_or(8192).to_string()));
            args.extend([lit("--out"), Arg::Own("tokenizer.json")]);
            args.extend(corpora(cfg).into_iter().map(|(_, p)| Arg::File(p)));
            out.push(plain("tokenizer", "mmrec-data", args));
            Arg::Out("tokenizer".into(), "tokenizer.json")
        }
    };
    let mut split = vec![lit("split")];
    for (flag, path) in corpora(cfg) {
        split.extend([lit(flag), Arg::File(path)]);
    }
    split.extend([lit("--tokenizer"), tokenizer, lit("--out"), Arg::Own("shards")]);
    if cfg.split.near_dup {
        split.push(lit("--near-dup"));
    }
    let mut split = plain("split", "mmrec-data", split);
    if cfg.pipeline.executor == crate::config::Executor::Slurm && cfg.slurm.split_parts > 1 {
        // Parts merged are deduplicated per part first: not the same bytes as one pass.
        split.salt = format!("parts={}", cfg.slurm.split_parts);
    }
    out.push(split);
    out
}

/// The base, both experts (transfer, fine-tune), the control, and the fused model.
fn model_stages(cfg: &PipelineConfig) -> Vec<Stage> {
    let preset = lit(format!("model.preset=\"{}\"", cfg.model.preset));
    let mut out = vec![training(
        "pretrain",
        vec![lit("pretrain"), lit("--set"), preset],
        cfg,
        &cfg.pretrain,
    )];
    for d in ["text", "code"] {
        out.push(transfer(&format!("transfer-{d}"), d, cfg));
        let init = Arg::Out(format!("transfer-{d}"), "init.safetensors");
        let weights = lit(format!("data.weights=\"{d}=1\""));
        let args = vec![lit("finetune"), lit("--init"), init, lit("--set"), weights];
        out.push(training(&format!("finetune-{d}"), args, cfg, &cfg.finetune));
    }
    // The fair comparison: the base continued on its own mixture (the pretraining's
    // `data.weights`, when it sets them) for the same extra tokens, with the same tensors
    // frozen as the experts.
    out.push(transfer("transfer-control", "mixture", cfg));
    let init = Arg::Out("transfer-control".into(), "init.safetensors");
    let mut args = vec![lit("finetune"), lit("--init"), init];
    for mixture in cfg.pretrain.set.iter().filter(|s| s.starts_with("data.weights=")) {
        args.extend([lit("--set"), lit(mixture.clone())]);
    }
    out.push(training("control", args, cfg, &cfg.finetune));
    let mut fuse = vec![lit("fuse"), lit("--text"), model_file("finetune-text")];
    fuse.extend([
        lit("--code"),
        model_file("finetune-code"),
        lit("--method"),
        lit(clap::ValueEnum::to_possible_value(&cfg.model.fusion)
            .expect("every fusion method has a name")
            .get_name()
            .to_string()),
    ]);
    fuse.extend([lit("--sync"), lit("--out"), Arg::Own("init.safetensors")]);
    out.push(plain("fuse", "mmrec-transfer", fuse));
    let args = vec![
        lit("fusion"),
        lit("--init"),
        Arg::Out("fuse".into(), "init.safetensors"),
    ];
    out.push(training("fusion", args, cfg, &cfg.fusion));
    out
}

/// The base copied into the starting point of a continued run on `domain`, with the
/// configured tensors frozen.
fn transfer(name: &str, domain: &str, cfg: &PipelineConfig) -> Stage {
    let mut args = vec![
        model_file("pretrain"),
        lit("--to"),
        lit("expert"),
        lit("--domain"),
        lit(domain),
    ];
    for pattern in &cfg.model.freeze {
        args.extend([lit("--freeze"), lit(pattern.clone())]);
    }
    args.extend([lit("--sync"), lit("--out"), Arg::Own("init.safetensors")]);
    plain(name, "mmrec-transfer", args)
}

/// One model of the base's size from both experts per configured merge.
fn merge_stages(cfg: &PipelineConfig) -> Vec<Stage> {
    cfg.merges
        .iter()
        .map(|(name, method)| {
            let mut args = vec![lit("merge"), lit("--base"), model_file("pretrain"), lit("--experts")];
            args.extend([model_file("finetune-text"), model_file("finetune-code")]);
            args.extend(method.iter().map(|a| lit(a.clone())));
            args.extend([lit("--out"), Arg::Own("final.safetensors")]);
            plain(&format!("merge-{name}"), "mmrec-transfer", args)
        })
        .collect()
}

/// Every model on the held-out split, its JSON kept as the stage's output.
fn eval_stages(cfg: &PipelineConfig) -> Vec<Stage> {
    let e = &cfg.eval;
    models(cfg)
        .into_iter()
        .map(|(model, stage)| {
            let mut args = vec![lit("eval"), lit("--model"), model_file(&stage), lit("--data"), shards()];
            for (flag, v) in [
                ("--seq-len", e.seq_len),
                ("--batch-size", e.batch_size),
                ("--max-batches", e.max_batches),
            ] {
                args.extend([lit(flag), lit(v.to_string())]);
            }
            args.push(lit("--json"));
            Stage {
                stdout: Some("eval.json"),
                ..plain(&format!("eval-{model}"), "mmrec-train", args)
            }
        })
        .collect()
}

fn corpora(cfg: &PipelineConfig) -> Vec<(&'static str, PathBuf)> {
    let c = &cfg.corpora;
    let tagged = |flag, v: &Vec<PathBuf>| v.iter().map(move |p| (flag, p.clone())).collect::<Vec<_>>();
    [
        tagged("--text", &c.text),
        tagged("--code", &c.code),
        tagged("--mixed", &c.mixed),
    ]
    .concat()
}

fn plain(name: &str, tool: &'static str, args: Vec<Arg>) -> Stage {
    Stage {
        name: name.into(),
        tool,
        args,
        stdout: None,
        trains: false,
        salt: String::new(),
    }
}

/// A `mmrec-train` stage: its command, the shards, the shared then its own overrides,
/// the device; `--resume` so an interrupted stage continues from its checkpoint.
fn training(name: &str, mut args: Vec<Arg>, cfg: &PipelineConfig, own: &StageSettings) -> Stage {
    args.extend([lit("--data"), shards(), lit("--out"), Arg::Own(".")]);
    for set in cfg.train.set.iter().chain(&own.set) {
        args.extend([lit("--set"), lit(set.clone())]);
    }
    let device = own.device.as_ref().or(cfg.train.device.as_ref());
    args.extend([
        lit("--device"),
        lit(device.map_or("auto", |d| d.as_str())),
        lit("--resume"),
    ]);
    let procs = own.procs.or(cfg.train.procs).map_or(1, |n| n.get());
    if procs > 1 {
        let launch = [lit("launch"), lit("--procs"), lit(procs.to_string()), lit("--")];
        args.splice(0..0, launch);
    }
    Stage {
        trains: true,
        ..plain(name, "mmrec-train", args)
    }
}

/// Every stage's content key, from its inputs' hashes, its arguments, its tool's version
/// and its upstream stages' keys (`versions`: tool → version line).
pub fn keys(stages: &[Stage], versions: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut keys = BTreeMap::new();
    for s in stages {
        let mut parts = vec![
            serde_json::json!(s.name),
            serde_json::json!(versions.get(s.tool)),
            serde_json::json!(s.salt),
        ];
        for a in &s.args {
            parts.push(match a {
                Arg::Lit(v) => serde_json::json!(v),
                Arg::File(p) => {
                    let (sha, _) = mmrec_schemas::atomic::file_sha256(p).map_err(|e| Error::Input {
                        path: p.clone(),
                        message: e.to_string(),
                    })?;
                    serde_json::json!({"file": sha})
                }
                Arg::Out(stage, rel) => serde_json::json!({"from": keys.get(stage), "path": rel}),
                Arg::Own(rel) => serde_json::json!({"own": rel}),
            });
        }
        let text = serde_json::to_string(&parts).expect("JSON values serialise");
        keys.insert(s.name.clone(), mmrec_schemas::atomic::sha256_hex(text.as_bytes()));
    }
    Ok(keys)
}

/// Where a stage's output for `key` lives.
pub fn output_dir(work: &Path, stage: &str, key: &str) -> PathBuf {
    work.join(stage).join(&key[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pretrain: &[&str]) -> PipelineConfig {
        let mut cfg: PipelineConfig = toml::from_str(
            r#"
            [pipeline]
            work = "w"
            runs = "r"
            [corpora]
            text = ["t.jsonl"]
            code = ["c.jsonl"]
            [tokenizer]
            vocab_size = 512
            [model]
            preset = "tiny"
            "#,
        )
        .expect("the test config parses");
        cfg.pretrain.set = pretrain.iter().map(|s| s.to_string()).collect();
        cfg
    }

    fn literals(stage: &Stage) -> Vec<String> {
        let lits = stage.args.iter().filter_map(|a| match a {
            Arg::Lit(v) => Some(v.clone()),
            _ => None,
        });
        lits.collect()
    }

    #[test]
    fn the_control_continues_on_the_base_mixture() {
        let cfg = config(&["run.steps=5", "data.weights=\"text=0.5,code=0.5\""]);
        let all = stages(&cfg);
        let control = all.iter().find(|s| s.name == "control").expect("a control stage");
        let args = literals(control);
        assert!(
            args.contains(&"data.weights=\"text=0.5,code=0.5\"".to_string()),
            "{args:?}"
        );
        assert!(
            !args.contains(&"run.steps=5".to_string()),
            "only the mixture is taken: {args:?}"
        );
        let text = all.iter().find(|s| s.name == "finetune-text").expect("a text expert");
        assert!(!literals(text).iter().any(|a| a.contains("code=0.5")));
        // The experts and the control start from the base with the embedding frozen.
        for name in ["transfer-text", "transfer-code", "transfer-control"] {
            let t = all.iter().find(|s| s.name == name).expect("a transfer stage");
            assert!(literals(t).windows(2).any(|w| w == ["--freeze", "embed.*"]), "{name}");
        }
        assert!(control.deps().any(|d| d == "transfer-control"));
        // Without weights in [pretrain] the control reads the trainer's default mixture.
        let plain = stages(&config(&[]));
        let control = plain.iter().find(|s| s.name == "control").expect("a control stage");
        assert!(!literals(control).iter().any(|a| a.starts_with("data.weights")));
    }

    #[test]
    fn a_stage_with_several_procs_runs_under_launch() {
        let mut cfg = config(&[]);
        cfg.train.procs = std::num::NonZeroUsize::new(2);
        cfg.fusion.procs = std::num::NonZeroUsize::new(1);
        let all = stages(&cfg);
        let args = |name: &str| literals(all.iter().find(|s| s.name == name).expect("the stage"));
        assert_eq!(args("pretrain")[..5], ["launch", "--procs", "2", "--", "pretrain"]);
        assert_eq!(args("fusion")[0], "fusion", "its own setting wins");
    }

    #[test]
    fn the_fuse_stage_uses_the_configured_fusion_method() {
        let fuse_method = |cfg: &PipelineConfig| {
            let all = stages(cfg);
            let fuse = all.iter().find(|s| s.name == "fuse").expect("a fuse stage");
            let args = literals(fuse);
            let at = args.iter().position(|a| a == "--method").expect("--method");
            args[at + 1].clone()
        };
        let mut cfg = config(&[]);
        assert_eq!(fuse_method(&cfg), "gated", "the default");
        cfg.model.fusion = mmrec_schemas::FusionMethod::Mixture;
        assert_eq!(fuse_method(&cfg), "mixture");
    }
}
