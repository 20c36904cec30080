//! Segment training (truncated BPTT, `data.context_len`): the loader's rows are streams of
//! documents, each batch the next segment of `seq_len` tokens of every row; the recurrent
//! state after a segment starts the next one, detached, until `context_len` tokens, when
//! it starts fresh. Where `<|endoftext|>` begins a document, the model resets that row's
//! state at that position (see `mmrec_model::stream`).

use std::path::Path;

use candle_core::{Device, Tensor};
use mmrec_loader::Batch;
use mmrec_model::model::BlockState;
use mmrec_model::stream::{self, DocBounds};
use mmrec_schemas::checkpoint::SegmentState;

use crate::train::{Error, Net, Result};

/// The state carried into the next segment.
#[derive(Clone, Default)]
pub struct Carried {
    pub meta: SegmentState,
    /// None before the first segment.
    pub states: Option<Vec<BlockState>>,
}

/// What one segment starts from: the rows' states and where their documents begin.
pub struct SegmentStart {
    pub states: Vec<BlockState>,
    pub docs: DocBounds,
    /// The rows' document starts after this segment.
    pub starts: Vec<usize>,
}

/// The carried states file inside a checkpoint directory.
pub const CARRIED: &str = "carried.safetensors";

pub struct Segments {
    /// Segments per context: the state starts fresh at every multiple.
    pub per_context: u64,
    pub eot: u32,
}

impl Segments {
    /// The start of `carried`'s next segment, `batch` ([rows, seq + 1] tokens): fresh at a
    /// context's first segment, else the carried states.
    pub fn begin(&self, carried: &Carried, net: &Net, batch: &Batch, seq: usize, dev: &Device) -> Result<SegmentStart> {
        let rows = batch.tokens.len() / (seq + 1);
        let within = (carried.meta.segment % self.per_context) as usize;
        let (states, mut starts) = match (&carried.states, within) {
            (Some(states), w) if w > 0 => (states.clone(), carried.meta.starts.clone()),
            _ => (fresh_states(net, rows, dev)?, vec![0; rows]),
        };
        let inputs: Vec<u32> = batch
            .tokens
            .chunks(seq + 1)
            .flat_map(|row| row[..seq].iter().copied())
            .collect();
        // Positions count from the context's start (a state restored after a non-finite
        // step starts fresh mid-context, at 0).
        let p0 = states.first().map_or(0, |s| s.pos);
        let docs = DocBounds::new(&inputs, seq, p0, self.eot, &mut starts, dev)?;
        Ok(SegmentStart { states, docs, starts })
    }
}

/// Zero states for `rows` rows in the dtype `net` computes in.
fn fresh_states(net: &Net, rows: usize, dev: &Device) -> Result<Vec<BlockState>> {
    match net {
        Net::Single(m) => Ok(m.initial_state(rows, dev)?),
        Net::Fused(_) => Err(Error::Config(
            "segment training (data.context_len) trains a single model, not a fused one".into(),
        )),
    }
}

impl Carried {
    /// After a segment that started from `start` and ended in `states`.
    pub fn advanced(&self, start: SegmentStart, states: Vec<BlockState>) -> Result<Carried> {
        let states = stream::detach(&states)?;
        let positions = stream::positions(&states);
        Ok(Carried {
            meta: SegmentState {
                segment: self.meta.segment + 1,
                starts: start.starts,
                positions,
            },
            states: Some(states),
        })
    }

    /// Write the states into checkpoint directory `dir` (its metadata goes into the state).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let Some(states) = &self.states else { return Ok(()) };
        let tensors = stream::to_tensors(states)?;
        let path = dir.join(CARRIED);
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, &path).map_err(|source| Error::During {
            during: "writing the carried states",
            source,
        })
    }

    /// The carried state of the checkpoint in `dir` (None in its state: nothing carried).
    pub fn load(meta: Option<SegmentState>, dir: &Path, net: &Net, rows: usize, dev: &Device) -> Result<Carried> {
        let Some(meta) = meta else {
            return Ok(Carried::default());
        };
        let path = dir.join(CARRIED);
        if !path.exists() {
            return Ok(Carried { meta, states: None });
        }
        let map = candle_core::safetensors::load(&path, dev)?;
        let like = fresh_states(net, rows, dev)?;
        let get = |name: &str| {
            map.get(name).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: no tensor {name} (another model or batch size?)",
                    path.display()
                ))
            })
        };
        let states = stream::from_tensors(&like, &get, &meta.positions)?;
        Ok(Carried {
            meta,
            states: Some(states),
        })
    }
}
