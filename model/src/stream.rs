//! Training in segments (truncated BPTT, DESIGN §1): each batch row is a stream of
//! documents that continues from one segment to the next, with the recurrent state carried
//! forward detached. Inside a segment, the `<|endoftext|>` separator starts a document:
//! at that position the scan forgets its state and the memory hides every chunk summary
//! that began before it.

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Tensor};

use crate::model::{BlockState, LevelState};

/// Where documents begin in a batch of streams.
#[derive(Clone, Debug)]
pub struct DocBounds {
    /// [B, T, 1], f32: 0 where the state resets (an `<|endoftext|>` input), 1 elsewhere.
    pub keep: Tensor,
    /// [B, 1, T, 1], f32: the absolute position at which each position's document began.
    pub starts: Tensor,
    /// The last attention mask made, by the entries' chunk starts and dtype: every block of
    /// a forward (and a checkpointed block's recompute) sees the same entries.
    mask: RefCell<Option<(Vec<f32>, DType, Tensor)>>,
}

impl DocBounds {
    /// The bounds of inputs `tokens` ([B × T], row-major) that begin at absolute position
    /// `p0`; `starts` holds each row's current document start (absolute) and is advanced.
    pub fn new(tokens: &[u32], t: usize, p0: usize, eot: u32, starts: &mut [usize], dev: &Device) -> Result<Self> {
        let b = starts.len();
        if tokens.len() != b * t {
            candle_core::bail!("document bounds: {} tokens for {b} rows of {t}", tokens.len());
        }
        let mut keep = Vec::with_capacity(b * t);
        let mut at = Vec::with_capacity(b * t);
        for (row, start) in tokens.chunks(t).zip(starts.iter_mut()) {
            for (i, &tok) in row.iter().enumerate() {
                if tok == eot {
                    *start = p0 + i;
                }
                keep.push(if tok == eot { 0f32 } else { 1.0 });
                at.push(*start as f32);
            }
        }
        Ok(DocBounds {
            keep: Tensor::from_vec(keep, (b, t, 1), dev)?,
            starts: Tensor::from_vec(at, (b, 1, t, 1), dev)?,
            mask: RefCell::new(None),
        })
    }

    /// [B, 1, T, E]: −∞ where an attention entry's chunk began (`chunk_start`, absolute;
    /// `f32::MAX` for entries always visible) before the position's document, else 0.
    pub fn attention_mask(&self, chunk_start: &[f32], dtype: DType) -> Result<Tensor> {
        if let Some((starts, dt, mask)) = self.mask.borrow().as_ref() {
            if starts == chunk_start && *dt == dtype {
                return Ok(mask.clone());
            }
        }
        let dev = self.starts.device();
        let began = Tensor::from_slice(chunk_start, (1, 1, 1, chunk_start.len()), dev)?;
        let before = began.broadcast_lt(&self.starts)?;
        let shape = before.shape().clone();
        let hidden = Tensor::full(f32::NEG_INFINITY, (), dev)?.broadcast_as(&shape)?;
        let seen = Tensor::zeros((), DType::F32, dev)?.broadcast_as(&shape)?;
        let mask = before.where_cond(&hidden, &seen)?.to_dtype(dtype)?;
        *self.mask.borrow_mut() = Some((chunk_start.to_vec(), dtype, mask.clone()));
        Ok(mask)
    }

    /// Rows `r0..r0 + n` (a micro-batch).
    pub fn rows(&self, r0: usize, n: usize) -> Result<Self> {
        Ok(DocBounds {
            keep: self.keep.narrow(0, r0, n)?,
            starts: self.starts.narrow(0, r0, n)?,
            mask: RefCell::new(None),
        })
    }
}

/// Each tensor of a state with `f` applied (detach, narrow to rows, move).
fn map_state(s: &BlockState, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<BlockState> {
    Ok(BlockState {
        pos: s.pos,
        h: f(&s.h)?,
        levels: s
            .levels
            .iter()
            .map(|l| {
                Ok(LevelState {
                    first: l.first,
                    summaries: f(&l.summaries)?,
                    partial: f(&l.partial)?,
                })
            })
            .collect::<Result<_>>()?,
    })
}

/// The states cut from the graph that made them: the next segment starts from their values.
pub fn detach(states: &[BlockState]) -> Result<Vec<BlockState>> {
    states.iter().map(|s| map_state(s, &|t| Ok(t.detach()))).collect()
}

/// Rows `r0..r0 + n` of every state (a micro-batch's share).
pub fn rows(states: &[BlockState], r0: usize, n: usize) -> Result<Vec<BlockState>> {
    states.iter().map(|s| map_state(s, &|t| t.narrow(0, r0, n))).collect()
}

/// Micro-batches' states joined back along the rows.
pub fn join_rows(parts: &[Vec<BlockState>]) -> Result<Vec<BlockState>> {
    let first = parts
        .first()
        .ok_or_else(|| candle_core::Error::Msg("no states to join".into()))?;
    let cat = |pick: &dyn Fn(&BlockState) -> Tensor, layer: usize| {
        Tensor::cat(&parts.iter().map(|p| pick(&p[layer])).collect::<Vec<_>>(), 0)
    };
    (0..first.len())
        .map(|i| {
            Ok(BlockState {
                pos: first[i].pos,
                h: cat(&|s| s.h.clone(), i)?,
                levels: (0..first[i].levels.len())
                    .map(|lvl| {
                        Ok(LevelState {
                            first: first[i].levels[lvl].first,
                            summaries: cat(&|s| s.levels[lvl].summaries.clone(), i)?,
                            partial: cat(&|s| s.levels[lvl].partial.clone(), i)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            })
        })
        .collect()
}

/// Tensors by name.
pub type Named = Vec<(String, Tensor)>;

/// The states as named f32 tensors, for a checkpoint (their positions: [`positions`]).
pub fn to_tensors(states: &[BlockState]) -> Result<Named> {
    let mut tensors = Vec::new();
    for (i, s) in states.iter().enumerate() {
        tensors.push((format!("blocks.{i}.h"), s.h.to_dtype(DType::F32)?));
        for (l, lv) in s.levels.iter().enumerate() {
            tensors.push((
                format!("blocks.{i}.levels.{l}.summaries"),
                lv.summaries.to_dtype(DType::F32)?,
            ));
            tensors.push((
                format!("blocks.{i}.levels.{l}.partial"),
                lv.partial.to_dtype(DType::F32)?,
            ));
        }
    }
    Ok(tensors)
}

/// The states' positions (each block's `pos`, then each level's `first`), in the order
/// [`from_tensors`] takes them.
pub fn positions(states: &[BlockState]) -> Vec<usize> {
    states
        .iter()
        .flat_map(|s| std::iter::once(s.pos).chain(s.levels.iter().map(|l| l.first)))
        .collect()
}

/// States back from [`to_tensors`]' output, in `like`'s dtypes (a fresh state of the model
/// for the same rows: the rows and widths must match).
pub fn from_tensors(
    like: &[BlockState],
    get: &dyn Fn(&str) -> Result<Tensor>,
    positions: &[usize],
) -> Result<Vec<BlockState>> {
    let mut next = positions.iter().copied();
    let mut pos = || {
        next.next()
            .ok_or_else(|| candle_core::Error::Msg("carried state: too few positions".into()))
    };
    let take = |name: &str, like: &Tensor| -> Result<Tensor> {
        let t = get(name)?;
        // Rows and width must match; the summaries' count grows with the stream.
        let (d, l) = (t.dims(), like.dims());
        if d.len() != l.len() || d.first() != l.first() || d.last() != l.last() {
            candle_core::bail!("carried state {name}: shape {d:?}, the model and batch need {l:?} (rows, …, width)");
        }
        t.to_dtype(like.dtype())
    };
    like.iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(BlockState {
                pos: pos()?,
                h: take(&format!("blocks.{i}.h"), &s.h)?,
                levels: s
                    .levels
                    .iter()
                    .enumerate()
                    .map(|(l, lv)| {
                        Ok(LevelState {
                            first: pos()?,
                            summaries: take(&format!("blocks.{i}.levels.{l}.summaries"), &lv.summaries)?,
                            partial: take(&format!("blocks.{i}.levels.{l}.partial"), &lv.partial)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            })
        })
        .collect()
}
