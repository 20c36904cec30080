//! The run config (`config.toml`, `--config`, `--set section.field=value`): what a training
//! run needs, read from TOML, checked, printed at start and saved in every checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, IoContext, Result};

/// Everything a run needs, as one plain struct: read from TOML, overridable field by field
/// with `--set section.field=value`, printed at start and saved in every checkpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub run: RunConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// `tiny`, `small` or `medium` (pretrain only; finetune and fusion take the shape from
    /// the `--init` file).
    pub preset: String,
    /// Seeds the initial weights (pretrain).
    pub seed: u64,
    pub dropout: f32,
    pub uboo_weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub dirs: Vec<PathBuf>,
    /// `text=0.4,code=0.4,mixed=0.2`
    pub weights: String,
    pub seq_len: usize,
    /// Rows per loader batch, or `"auto"`: the micro-batch with the best measured
    /// throughput that fits, found before training and kept in the checkpoint.
    pub batch_size: BatchSize,
    pub workers: usize,
    pub val_permille: u32,
    pub seed: u64,
    /// Segment training (0: off, rows are independent windows): each row is a stream of
    /// documents read in segments of `seq_len`, the recurrent state carried from one to
    /// the next (detached) for `context_len` tokens, then reset; reset too where a
    /// document begins. A multiple of `seq_len`.
    pub context_len: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub grad_accum: usize,
    pub embed_lr_mult: f64,
    /// Block i's rate is `layer_decay^(L-1-i)` times the base rate.
    pub layer_decay: f64,
    pub fusion_lr_mult: f64,
    pub plateau_factor: f64,
    pub plateau_patience: u32,
    pub plateau_threshold: f64,
    /// Evaluations without improvement before stopping; 0 never stops early.
    pub early_stop_patience: u32,
    /// How many batches a step accumulates: `fixed` (`grad_accum`), `noise-scale` (the
    /// global batch follows the gradient noise scale, growing from `grad_accum` batches),
    /// or `linear:START->END over N tokens` (global batch tokens, a fixed ramp).
    pub batch_schedule: BatchSchedule,
    /// How the learning rate follows the global batch against `grad_accum` batches.
    pub batch_lr_rule: LrRule,
    /// The largest global batch a schedule may reach, in tokens (0: 64 × the base batch).
    pub max_batch_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub out: PathBuf,
    pub steps: u64,
    /// Stop after this many training tokens (0: only `steps` counts).
    pub token_budget: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub ckpt_every: u64,
    pub keep_last: usize,
    pub log_every: u64,
    /// Data parallelism, a debug check: every this many steps the ranks compare a hash of
    /// their parameters and stop with an error if they differ (0: never).
    pub check_sync_every: u64,
    pub grad_checkpointing: bool,
    /// Memory (MB) a micro-batch's activations may take; 0: what the device has free at
    /// start. Over it, the micro-batch is halved and accumulation doubled.
    pub memory_limit_mb: u64,
    /// `f32`, or `bf16`: bf16 matmuls and activations over f32 master weights, moments,
    /// scan and reductions (DESIGN §6).
    pub precision: Precision,
    /// Fine-tune or fuse on shards of another tokenizer of the same size (normally refused).
    pub allow_tokenizer_mismatch: bool,
}

/// `data.batch_size`: a number of rows, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BatchSizeValue", into = "BatchSizeValue")]
pub enum BatchSize {
    Rows(usize),
    Auto,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum BatchSizeValue {
    Rows(usize),
    Word(String),
}

impl TryFrom<BatchSizeValue> for BatchSize {
    type Error = String;
    fn try_from(v: BatchSizeValue) -> std::result::Result<Self, String> {
        match v {
            BatchSizeValue::Rows(n) => Ok(BatchSize::Rows(n)),
            BatchSizeValue::Word(w) if w == "auto" => Ok(BatchSize::Auto),
            BatchSizeValue::Word(w) => Err(format!(
                "data.batch_size: {w:?} is neither a number of rows nor \"auto\""
            )),
        }
    }
}

impl From<BatchSize> for BatchSizeValue {
    fn from(b: BatchSize) -> Self {
        match b {
            BatchSize::Rows(n) => BatchSizeValue::Rows(n),
            BatchSize::Auto => BatchSizeValue::Word("auto".into()),
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Rows(n) => write!(f, "{n}"),
            BatchSize::Auto => f.write_str("auto"),
        }
    }
}

/// `optim.batch_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BatchSchedule {
    Fixed,
    NoiseScale,
    /// Global batch tokens from `start` to `end`, linear in the tokens seen over `over`.
    Linear {
        start: u64,
        end: u64,
        over: u64,
    },
}

impl TryFrom<String> for BatchSchedule {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        let bad = || {
            format!("optim.batch_schedule: {text:?} is not \"fixed\", \"noise-scale\" or \"linear:START->END over N tokens\"")
        };
        match text.trim() {
            "fixed" => return Ok(BatchSchedule::Fixed),
            "noise-scale" => return Ok(BatchSchedule::NoiseScale),
            _ => {}
        }
        let ramp = text.trim().strip_prefix("linear:").ok_or_else(bad)?;
        let (range, over) = ramp.split_once(" over ").ok_or_else(bad)?;
        let (start, end) = range
            .split_once("->")
            .or_else(|| range.split_once('→'))
            .ok_or_else(bad)?;
        let number = |s: &str| s.trim().replace('_', "").parse::<u64>().map_err(|_| bad());
        let over = over.trim().strip_suffix("tokens").unwrap_or(over);
        let (start, end, over) = (number(start)?, number(end)?, number(over)?);
        if start == 0 || end == 0 {
            return Err(format!(
                "optim.batch_schedule: {text:?}: a ramp's batches must be at least 1 token"
            ));
        }
        Ok(BatchSchedule::Linear { start, end, over })
    }
}

impl From<BatchSchedule> for String {
    fn from(s: BatchSchedule) -> Self {
        match s {
            BatchSchedule::Fixed => "fixed".into(),
            BatchSchedule::NoiseScale => "noise-scale".into(),
            BatchSchedule::Linear { start, end, over } => format!("linear:{start}->{end} over {over} tokens"),
        }
    }
}

/// `optim.batch_lr_rule`: the learning rate times 1, √r or r when the global batch is r
/// times `grad_accum` batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrRule {
    Constant,
    Sqrt,
    Linear,
}

/// The dtype the model computes in; weights and optimiser state are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "tiny".into(),
            seed: 0,
            dropout: 0.0,
            uboo_weight: 0.0,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dirs: vec![],
            weights: "text=0.4,code=0.4,mixed=0.2".into(),
            seq_len: 256,
            batch_size: BatchSize::Rows(8),
            workers: 2,
            val_permille: 20,
            seed: 0,
            context_len: 0,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            embed_lr_mult: 1.0,
            layer_decay: 1.0,
            fusion_lr_mult: 1.0,
            plateau_factor: 0.5,
            plateau_patience: 2,
            plateau_threshold: 1e-3,
            early_stop_patience: 0,
            batch_schedule: BatchSchedule::Fixed,
            batch_lr_rule: LrRule::Sqrt,
            max_batch_tokens: 0,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out: "runs/run".into(),
            steps: 500,
            token_budget: 0,
            eval_every: 100,
            eval_batches: 16,
            ckpt_every: 100,
            keep_last: 2,
            log_every: 10,
            check_sync_every: 0,
            grad_checkpointing: false,
            memory_limit_mb: 0,
            precision: Precision::F32,
            allow_tokenizer_mismatch: false,
        }
    }
}

impl TrainConfig {
    /// Read a TOML file (or defaults) and apply `section.field=value` overrides, each
    /// parsed as TOML (so `3e-4`, `true`, `"text"` and `["a", "b"]` all work).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        Self::load_onto(toml::Table::new(), path, overrides)
    }

    /// The config to resume with: the checkpoint's, with this invocation's file and
    /// overrides on top. Fields that decide what is being trained (the model, the data's
    /// shape and mix, the batch) must not change; steps, cadences, learning rates, the
    /// output directory and the precision may.
    pub fn for_resume(saved: &TrainConfig, path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let base = toml::Table::try_from(saved).map_err(|e| Error::Config(format!("the checkpoint's config: {e}")))?;
        let cfg = Self::load_onto(base, path, overrides)?;
        let fixed = |c: &TrainConfig| {
            [
                ("model", toml::to_string(&c.model).unwrap_or_default()),
                ("data.seq_len", c.data.seq_len.to_string()),
                ("data.batch_size", c.data.batch_size.to_string()),
                ("data.weights", c.data.weights.clone()),
                ("data.seed", c.data.seed.to_string()),
                ("data.val_permille", c.data.val_permille.to_string()),
                ("optim.grad_accum", c.optim.grad_accum.to_string()),
            ]
        };
        for ((field, was), (_, now)) in fixed(saved).into_iter().zip(fixed(&cfg)) {
            if was != now {
                return Err(Error::Config(format!("--resume cannot change {field} (the checkpoint has {}, this run asks for {}): start a new run, or fine-tune from the checkpoint's model", was.trim(), now.trim())));
            }
        }
        Ok(cfg)
    }

    fn load_onto(mut doc: toml::Table, path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        if let Some(p) = path {
            let text = std::fs::read_to_string(p).at(p)?;
            let file: toml::Table = text
                .parse()
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
            for (section, values) in file {
                match (doc.get_mut(&section).and_then(toml::Value::as_table_mut), values) {
                    (Some(table), toml::Value::Table(values)) => table.extend(values),
                    (_, values) => {
                        doc.insert(section, values);
                    }
                }
            }
        }
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("override {o:?} must look like section.field=value")))?;
            let (section, field) = key
                .trim()
                .split_once('.')
                .ok_or_else(|| Error::Config(format!("override key {key:?} must be section.field, e.g. optim.lr")))?;
            let parsed: toml::Value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            let table = doc
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table
                .as_table_mut()
                .ok_or_else(|| Error::Config(format!("{section} is not a section")))?
                .insert(field.to_string(), parsed);
        }
        let cfg: TrainConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.data.seq_len == 0 || self.data.batch_size == BatchSize::Rows(0) || self.optim.grad_accum == 0 {
            return bad("data.seq_len, data.batch_size and optim.grad_accum must be at least 1");
        }
        if self.optim.batch_schedule == BatchSchedule::NoiseScale && self.optim.grad_accum < 2 {
            return bad("optim.batch_schedule = \"noise-scale\" needs optim.grad_accum >= 2: the estimate compares the accumulated batches' gradients with their mean");
        }
        if !(self.optim.lr > 0.0 && self.optim.min_lr >= 0.0 && self.optim.min_lr <= self.optim.lr) {
            return bad("need optim.lr > 0 and 0 <= optim.min_lr <= optim.lr");
        }
        let context = self.data.context_len;
        if context > 0 && (context % self.data.seq_len != 0) {
            return bad(&format!(
                "data.context_len {context} must be a multiple of data.seq_len {}",
                self.data.seq_len
            ));
        }
        if context > 0 && (self.data.batch_size == BatchSize::Auto || self.optim.batch_schedule != BatchSchedule::Fixed)
        {
            return bad("segment training (data.context_len) keeps one row per stream: it needs a fixed data.batch_size and optim.batch_schedule = \"fixed\"");
        }
        if self.run.steps == 0 && self.run.token_budget == 0 {
            return bad("set run.steps or run.token_budget");
        }
        if self.data.val_permille > 1000 {
            return bad(&format!(
                "data.val_permille {} is over 1000 (it is a share in per mille)",
                self.data.val_permille
            ));
        }
        if !(self.optim.plateau_factor > 0.0 && self.optim.plateau_factor <= 1.0) {
            return bad(&format!(
                "optim.plateau_factor {} must be in (0, 1]",
                self.optim.plateau_factor
            ));
        }
        if self.optim.grad_clip.is_nan() || self.optim.grad_clip < 0.0 {
            return bad(&format!(
                "optim.grad_clip {} must be ≥ 0 (0 turns clipping off)",
                self.optim.grad_clip
            ));
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return bad(&format!("model.dropout {} must be in [0, 1)", self.model.dropout));
        }
        if !(self.optim.eps > 0.0 && (0.0..1.0).contains(&self.optim.beta1) && (0.0..1.0).contains(&self.optim.beta2)) {
            return bad("need optim.eps > 0 and optim.beta1, optim.beta2 in [0, 1)");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }
}
