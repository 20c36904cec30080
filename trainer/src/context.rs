//! Loss against position in a document: each held-out document streamed through the model
//! in segments with the state carried from one to the next (DESIGN §1), so a position's
//! loss reflects everything before it in its document, at a memory cost that does not grow
//! with the length read.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::generate::NetState;
use crate::train::{Net, Result};

/// Bucket edges, in tokens of context before the predicted token.
pub const BUCKET_EDGES: [usize; 6] = [0, 512, 2048, 8192, 32_768, 131_072];

/// Mean loss of the predicted tokens whose context lies in `[from, to)`.
#[derive(Debug, Clone, Serialize)]
pub struct PositionLoss {
    pub from: usize,
    /// None for the last, open bucket.
    pub to: Option<usize>,
    pub tokens: u64,
    pub loss: Option<f64>,
}

/// Summed loss and count per power-of-two position bin (bin k: context in [2^k, 2^(k+1)),
/// bin 0 also holds context 0).
#[derive(Debug, Clone, Default)]
pub struct PositionCurve {
    sums: Vec<(f64, u64)>,
}

impl PositionCurve {
    fn add(&mut self, context: usize, nll: f64) {
        let bin = (usize::BITS - context.max(1).leading_zeros() - 1) as usize;
        if self.sums.len() <= bin {
            self.sums.resize(bin + 1, (0.0, 0));
        }
        self.sums[bin].0 += nll;
        self.sums[bin].1 += 1;
    }

    /// (middle of the bin in tokens, mean loss) for every bin with tokens.
    pub fn points(&self) -> Vec<(f64, f64)> {
        self.sums
            .iter()
            .enumerate()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(k, (s, n))| ((1u64 << k) as f64 * 1.5, s / *n as f64))
            .collect()
    }
}

/// (context, loss) pairs gathered into [`BUCKET_EDGES`].
pub fn buckets(raw: &[(usize, f64)]) -> Vec<PositionLoss> {
    BUCKET_EDGES
        .iter()
        .enumerate()
        .map(|(i, &from)| {
            let to = BUCKET_EDGES.get(i + 1).copied();
            let inside: Vec<f64> = raw
                .iter()
                .filter(|(c, _)| *c >= from && to.is_none_or(|t| *c < t))
                .map(|(_, l)| *l)
                .collect();
            PositionLoss {
                from,
                to,
                tokens: inside.len() as u64,
                loss: (!inside.is_empty()).then(|| inside.iter().sum::<f64>() / inside.len() as f64),
            }
        })
        .collect()
}

/// Every predicted token's (context length, loss) over `docs`, each read up to
/// `context_len` tokens in segments of `segment` with the state carried.
pub fn position_losses(
    net: &Net,
    docs: &[Vec<u32>],
    context_len: usize,
    segment: usize,
    dev: &Device,
) -> Result<Vec<(usize, f64)>> {
    let mut out = Vec::new();
    for doc in docs {
        let n = doc.len().min(context_len + 1);
        let mut state: Option<NetState> = None;
        for start in (0..n.saturating_sub(1)).step_by(segment.max(1)) {
            let end = (start + segment).min(n - 1);
            let inp = Tensor::from_slice(&doc[start..end], (1, end - start), dev)?;
            let tgt = Tensor::from_slice(&doc[start + 1..end + 1], (1, end - start), dev)?;
            let (logits, s) = net.logits_from(&inp, state.as_ref())?;
            state = Some(s);
            let mask = Tensor::ones((1, end - start), DType::F32, dev)?;
            let nll = mmrec_model::model::token_nll(&logits, &tgt, &mask)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            // The token at index i + 1 is predicted from i + 1 tokens of context, the
            // end-of-text separator included.
            out.extend(nll.into_iter().enumerate().map(|(i, l)| (start + i, l)));
        }
    }
    Ok(out)
}

/// The fine curve of (context, loss) pairs.
pub fn curve(raw: &[(usize, f64)]) -> PositionCurve {
    let mut c = PositionCurve::default();
    for &(context, nll) in raw {
        c.add(context, nll);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_bins_split_positions_at_their_edges() {
        let raw = vec![(0, 1.0), (511, 3.0), (512, 5.0), (9000, 7.0)];
        let c = curve(&raw);
        let b = buckets(&raw);
        assert_eq!((b[0].tokens, b[0].loss), (2, Some(2.0)));
        assert_eq!((b[1].tokens, b[1].loss), (1, Some(5.0)));
        assert_eq!((b[2].tokens, b[2].loss), (0, None));
        assert_eq!((b[3].tokens, b[3].loss), (1, Some(7.0)));
        // Bins: context 0 joins bin 0; 511 → bin 8; 512 → bin 9; 9000 → bin 13.
        let p = c.points();
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [1.0, 3.0, 5.0, 7.0]);
        assert_eq!(p[1].0, 256.0 * 1.5);
    }
}
