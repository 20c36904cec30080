//! The pipeline's one TOML file (`pipelines/nightly.toml` is the documented example).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub pipeline: Section,
    pub corpora: Corpora,
    pub tokenizer: TokenizerConfig,
    #[serde(default)]
    pub split: SplitConfig,
    pub model: ModelConfig,
    /// `--set` overrides every training stage gets (before its own).
    #[serde(default)]
    pub train: StageSettings,
    #[serde(default)]
    pub pretrain: StageSettings,
    /// Each expert's fine-tuning, and the control's (the base continued on the mixture with
    /// the same settings: the same extra tokens and schedule).
    #[serde(default)]
    pub finetune: StageSettings,
    #[serde(default)]
    pub fusion: StageSettings,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub slurm: crate::slurm::SlurmConfig,
    /// Weight-space merges of the two experts, name → `mmrec-transfer merge` arguments
    /// (`ties-d0.5 = ["--method", "ties", "--density", "0.5"]`), each evaluated beside
    /// the fused model.
    #[serde(default)]
    pub merges: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// Stage outputs, one directory per stage and content key, shared by every run.
    pub work: PathBuf,
    /// One directory per run: `<date>-<n>/` with logs, links to outputs and the report.
    pub runs: PathBuf,
    /// Runs kept (older run directories are removed after a run; stage outputs stay).
    #[serde(default = "seven")]
    pub keep_runs: usize,
    #[serde(default)]
    pub executor: Executor,
}

fn seven() -> usize {
    7
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// Each stage as a child process, one after the other.
    #[default]
    Local,
    /// The stages as an sbatch chain (`[slurm]`).
    Slurm,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corpora {
    #[serde(default)]
    pub text: Vec<PathBuf>,
    #[serde(default)]
    pub code: Vec<PathBuf>,
    #[serde(default)]
    pub mixed: Vec<PathBuf>,
}

/// Reuse a tokenizer file, or train one of `vocab_size` on the corpora.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    pub path: Option<PathBuf>,
    pub vocab_size: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    #[serde(default)]
    pub near_dup: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub preset: String,
    /// Tensors (glob patterns) the experts and the control do not update. By default the
    /// embedding, which is also the tied head: the fused model shares one embedding, and an
    /// expert that moved its own would run inside the fused model on one it never saw.
    #[serde(default = "shared_embedding")]
    pub freeze: Vec<String>,
    /// How the fused model combines the experts (`mmrec-transfer fuse --method`): `gated`
    /// mixes their hidden states, `mixture` their next-token distributions, `concat`
    /// projects both.
    #[serde(default = "gated")]
    pub fusion: mmrec_schemas::FusionMethod,
}

fn shared_embedding() -> Vec<String> {
    vec!["embed.*".into()]
}

fn gated() -> mmrec_schemas::FusionMethod {
    mmrec_schemas::FusionMethod::Gated
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSettings {
    /// `--device` of the stage (default: auto).
    pub device: Option<String>,
    /// Data-parallel ranks of the stage (`mmrec-train launch --procs N`; default 1): one per
    /// GPU. Each rank keeps `data.batch_size`, so the global batch grows with it.
    pub procs: Option<std::num::NonZeroUsize>,
    /// `mmrec-train --set` overrides, `section.field=value`.
    #[serde(default)]
    pub set: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub seq_len: usize,
    pub batch_size: usize,
    /// At most this many batches per domain (0: the whole held-out split).
    pub max_batches: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            seq_len: 256,
            batch_size: 8,
            max_batches: 0,
        }
    }
}

/// Conditions that fail the run (exit 3) after its report is written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// The fused model's loss may exceed the base's by at most this (nats) on any domain.
    pub fused_vs_base: Option<f64>,
    /// The fused model's loss may exceed the control's by at most this on any domain.
    pub fused_vs_control: Option<f64>,
    /// Each expert's loss on its own domain may exceed the control's by at most this.
    pub expert_vs_control: Option<f64>,
}

impl PipelineConfig {
    /// Read and check `path`; relative paths in it are taken from the current directory,
    /// as the tools' own arguments are.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: PipelineConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
        match (&self.tokenizer.path, self.tokenizer.vocab_size) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return bad("[tokenizer] needs exactly one of path (reuse) or vocab_size (train)".into()),
        }
        if self.corpora.text.is_empty() || self.corpora.code.is_empty() {
            return bad("[corpora] needs text and code inputs (the two experts' domains)".into());
        }
        for p in self
            .corpora
            .text
            .iter()
            .chain(&self.corpora.code)
            .chain(&self.corpora.mixed)
        {
            if !p.is_file() {
                return bad(format!("corpus {} does not exist", p.display()));
            }
        }
        for set in [&self.train, &self.pretrain, &self.finetune, &self.fusion]
            .iter()
            .flat_map(|s| &s.set)
        {
            if !set.contains('=') || !set.split('=').next().is_some_and(|k| k.contains('.')) {
                return bad(format!("override {set:?} must look like section.field=value"));
            }
        }
        Ok(())
    }
}
