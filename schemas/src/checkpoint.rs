//! Checkpoints (DESIGN §5): `checkpoints/step-N/` directories holding the model, the
//! optimiser moments and `state.json`, and the `latest` and `best` pointer files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::run_config::TrainConfig;
use crate::{Domain, Error, IoContext, Result, Role};

/// The directory under a run's `out` that holds its checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
pub const STATE: &str = "state.json";

/// What `state.json` holds (DESIGN §5).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub schema_version: u32,
    pub tool_version: String,
    pub mode: String,
    pub step: u64,
    pub tokens_seen: u64,
    pub adam_t: u64,
    pub schedule: ScheduleState,
    pub cursor: Option<Cursor>,
    pub config: TrainConfig,
    pub model_meta_role: Role,
    pub recent: Vec<serde_json::Value>,
    pub best_checkpoint: Option<String>,
    /// Each loader batch is processed as this many micro-batches (1 unless memory forced
    /// a fallback); kept so a resumed run sums gradients in the same order.
    #[serde(default = "one")]
    pub micro_splits: usize,
    /// The gradient noise scale's running averages (absent in older checkpoints).
    #[serde(default)]
    pub noise_scale: NoiseScaleState,
    /// The micro-batch `data.batch_size = "auto"` chose: a resumed run uses it without
    /// searching again.
    #[serde(default)]
    pub batch_choice: Option<BatchChoice>,
    /// Batches the last step accumulated under `optim.batch_schedule` (0: none yet); the
    /// noise-scale schedule never goes below it.
    #[serde(default)]
    pub grad_accum: usize,
    /// Training wall time so far, over every resume, evaluations excluded (for loss
    /// against time).
    #[serde(default)]
    pub elapsed_s: f64,
    /// Segment training: where the carried state stands (its tensors are the checkpoint's
    /// `carried.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<SegmentState>,
}

/// The recurrent state carried between segments, less its tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentState {
    /// Segments trained so far; a context starts at every multiple of context_len / seq_len.
    pub segment: u64,
    /// Per row, the absolute position (within the context) where its document began.
    pub starts: Vec<usize>,
    /// The carried states' positions (per block: `pos`, then each level's first summary).
    pub positions: Vec<usize>,
}

/// The micro-batch found by measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchChoice {
    pub rows: usize,
    pub grad_checkpointing: bool,
    /// Forward and backward tokens per second measured for it.
    pub tokens_per_s: f64,
}

/// Exponential moving averages of the two estimates behind the simple gradient noise
/// scale B_noise = tr(Σ) / |G|² (McCandlish et al., 2018, appendix A); both start at zero
/// with the same weights, so their ratio needs no bias correction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoiseScaleState {
    pub grad_sq: f64,
    pub trace: f64,
}

fn one() -> usize {
    1
}

/// What the schedule must remember across a resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// ReduceLROnPlateau's multiplier on the scheduled rate.
    pub plateau_mult: f64,
    pub best_val: Option<f64>,
    /// Evaluations since the last improvement (for the plateau).
    pub bad_evals: u32,
    /// Evaluations since the last improvement (for early stopping).
    pub evals_since_best: u32,
    /// Halvings applied by the NaN guard.
    pub nan_mult: f64,
}

impl Default for ScheduleState {
    fn default() -> Self {
        ScheduleState {
            plateau_mult: 1.0,
            best_val: None,
            bad_evals: 0,
            evals_since_best: 0,
            nan_mult: 1.0,
        }
    }
}

/// Where the stream stands after a batch: enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub batches: u64,
    pub credits: BTreeMap<Domain, f64>,
    pub streams: BTreeMap<Domain, StreamCursor>,
    /// Real tokens delivered per domain so far.
    pub tokens: BTreeMap<Domain, u64>,
    /// Segment training: each batch row's stream of documents (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<Lane>,
}

/// One batch row's stream of documents in segment training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lane {
    /// The document being read: (domain, row group, row, tokens already used).
    pub current: Option<(Domain, u32, u32, u32)>,
    /// The row's last token, which is the next row's first input.
    pub last: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamCursor {
    pub epoch: u64,
    /// Position in this epoch's row-group order of the next row group to read.
    pub next: usize,
    /// Shuffle buffer: (row group, row) references.
    pub buffer: Vec<(u32, u32)>,
    /// The document being packed: (row group, row, tokens already used).
    pub current: Option<(u32, u32, u32)>,
    pub rng: u64,
    pub exhausted: bool,
}

/// The checkpoint `which` (`latest`, `best`) names, if it is complete. For `latest`, when
/// the pointer is missing or names an incomplete directory (a kill mid-save), the newest
/// complete checkpoint instead: a resume never restarts from step 0 while one exists.
pub fn read_pointer(root: &Path, which: &str) -> Option<String> {
    let complete = |name: &str| root.join(name).join(STATE).exists();
    let named = std::fs::read_to_string(root.join(which))
        .ok()
        .map(|s| s.trim().to_string());
    if let Some(name) = named.filter(|n| complete(n)) {
        return Some(name);
    }
    if which != "latest" {
        return None;
    }
    let mut steps: Vec<String> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") && complete(n))
        .collect();
    steps.sort();
    steps.pop()
}

/// Read `dir/state.json`.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).at(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(&path, format!("not a valid state.json: {e}")))
}

/// Write `dir/state.json` (atomically: a kill never leaves half a state).
pub fn write_state(dir: &Path, state: &TrainState) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(state).expect("state serialises");
    json.push(b'\n');
    write_atomic(&dir.join(STATE), &json)
}

/// The config saved in the latest checkpoint under `out`, if there is one.
pub fn saved_config(out: &Path) -> Result<Option<TrainConfig>> {
    let root = out.join(CHECKPOINTS);
    read_pointer(&root, "latest")
        .map(|name| read_state(&root.join(name)).map(|st| st.config))
        .transpose()
}

/// Point `which` (`latest`, `best`) at the checkpoint directory `name`.
pub fn write_pointer(root: &Path, which: &str, name: &str) -> Result<()> {
    write_atomic(&root.join(which), name.as_bytes())
}
