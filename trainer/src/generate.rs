//! Text generation (DESIGN §1: evaluation can run token by token in O(1) per token): the
//! prompt goes through the parallel scan once, then each new token costs one step of every
//! block with the carried state (scan state, memory summaries, running chunk sums), never
//! a pass over the text so far.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor};
use mmrec_model::model::{BlockState, FusedState};
use mmrec_schemas::rng::{splitmix, SplitMix};

use crate::train::{Net, Result};

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f64,
    pub seed: u64,
}

/// A single or fused model's recurrent state between calls.
pub enum NetState {
    Single(Vec<BlockState>),
    Fused(FusedState),
}

impl Net {
    /// Logits for `tokens` [B, T] continuing from `state` (None: a fresh sequence), and the
    /// state after them.
    pub fn logits_from(&self, tokens: &Tensor, state: Option<&NetState>) -> candle_core::Result<(Tensor, NetState)> {
        match (self, state) {
            (Net::Single(m), None | Some(NetState::Single(_))) => {
                let s = match state {
                    Some(NetState::Single(s)) => Some(s.as_slice()),
                    _ => None,
                };
                let (logits, s, _) = m.forward(tokens, s, false)?;
                Ok((logits, NetState::Single(s)))
            }
            (Net::Fused(m), None | Some(NetState::Fused(_))) => {
                let s = match state {
                    Some(NetState::Fused(s)) => Some(s),
                    _ => None,
                };
                let (logits, _, s) = m.forward_from(tokens, s, false)?;
                Ok((logits, NetState::Fused(s)))
            }
            _ => candle_core::bail!("a state of another kind of model"),
        }
    }
}

/// What a generation produced and how long each phase took.
#[derive(Debug, Clone)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// The prompt's parallel pass and the first token's logits.
    pub prompt_secs: f64,
    /// Every later token, one step each.
    pub decode_secs: f64,
}

/// Up to `max_tokens` tokens after `prompt` (not empty), each handed to `on_token` as soon
/// as it is drawn (which may break off); stops after `stop` when given. Deterministic for
/// a seed.
pub fn generate(
    net: &Net,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &Sampling,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generated> {
    if prompt.is_empty() {
        return Err(crate::train::Error::Config(
            "generation needs a prompt of at least one token".into(),
        ));
    }
    let dev = match net {
        Net::Single(m) => m.embed.embeddings().device().clone(),
        Net::Fused(m) => m.embed.embeddings().device().clone(),
    };
    let mut rng = SplitMix(splitmix(sampling.seed));
    let started = Instant::now();
    let input = Tensor::from_slice(prompt, (1, prompt.len()), &dev)?;
    let (logits, mut state) = net.logits_from(&input, None)?;
    let mut last = last_logits(&logits)?;
    let prompt_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut tokens = Vec::with_capacity(max_tokens);
    while tokens.len() < max_tokens {
        let next = sample(&last, sampling, &mut rng);
        tokens.push(next);
        if on_token(next).is_break() || Some(next) == stop || tokens.len() == max_tokens {
            break;
        }
        let (logits, s) = net.logits_from(&Tensor::from_slice(&[next], (1, 1), &dev)?, Some(&state))?;
        state = s;
        last = last_logits(&logits)?;
    }
    Ok(Generated {
        tokens,
        prompt_tokens: prompt.len(),
        prompt_secs,
        decode_secs: started.elapsed().as_secs_f64(),
    })
}

/// The last position's logits of row 0, as f32 on the host.
fn last_logits(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    let t = logits.dim(1)?;
    logits.i((0, t - 1))?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// One token from `logits` under `s`: greedy at temperature 0, else a draw from the
/// softmax at that temperature over the top-k, then top-p, most likely tokens.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.temperature <= 0.0 || s.top_k == 1 {
        return order[0] as u32;
    }
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / s.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // The nucleus: the shortest prefix (most likely first) holding `top_p` of the mass.
    let mut kept = 0.0;
    let mut n = 0;
    while n < weights.len() && (n == 0 || kept < s.top_p * total) {
        kept += weights[n];
        n += 1;
    }
    let mut u = rng.uniform() * kept;
    for (&i, &w) in order.iter().zip(&weights[..n]) {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    order[n - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 1,
        }
    }

    #[test]
    fn greedy_top_1_and_a_tiny_nucleus_pick_the_most_likely_token() {
        let logits = [0.1, 2.5, -1.0, 2.4];
        let mut rng = SplitMix(3);
        for s in [sampling(0.0, 0, 1.0), sampling(1.5, 1, 1.0), sampling(1.0, 0, 1e-9)] {
            assert!((0..50).all(|_| sample(&logits, &s, &mut rng) == 1), "{s:?}");
        }
    }

    #[test]
    fn draws_follow_the_softmax_and_top_k_cuts_the_tail() {
        // Probabilities ¼ and ¾ at temperature 1.
        let logits = [0.0, 3f32.ln()];
        let mut rng = SplitMix(5);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &sampling(1.0, 0, 1.0), &mut rng) == 1)
            .count();
        assert!((ones as f64 / n as f64 - 0.75).abs() < 0.015, "{ones}");
        let wide = [5.0, 4.9, 4.8, -3.0, -3.0];
        assert!((0..2000).all(|_| sample(&wide, &sampling(3.0, 3, 1.0), &mut rng) < 3));
        // top-p 0.5 of (0.5+, …): only the first token reaches it.
        let skewed = [3.0, 1.0, 1.0];
        assert!((0..2000).all(|_| sample(&skewed, &sampling(1.0, 0, 0.5), &mut rng) == 0));
    }
}
