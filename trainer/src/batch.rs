//! Dynamic batch (issue 18): the micro-batch found by measurement (`data.batch_size =
//! "auto"`), and the gradient accumulation that follows a batch schedule (the gradient
//! noise scale, or a fixed ramp) with the learning rate adjusted by a named rule.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mmrec_schemas::checkpoint::{BatchChoice, NoiseScaleState};
use mmrec_schemas::run_config::{BatchSchedule, LrRule, Precision};
use serde::Serialize;

use crate::train::{activation_bytes, is_out_of_memory, loss_and_grads, Net, Result};

/// The largest micro-batch the search tries.
const MAX_ROWS: usize = 4096;
/// What a micro-batch may take of the memory there is: the rest is the safety margin
/// (allocator fragmentation, the evaluation's batches, the optimiser's temporaries).
const MEMORY_SHARE: f64 = 0.85;
/// Larger micro-batches must beat the best so far by this much to count as faster.
const FASTER: f64 = 1.03;

/// Micro-batch sizes to try: powers of two and the steps between (1, 2, 3, 4, 6, 8, 12, …).
pub fn candidates() -> impl Iterator<Item = usize> {
    std::iter::once(1)
        .chain((1..).flat_map(|k| [1usize << k, 3usize << (k - 1)]))
        .take_while(|&rows| rows <= MAX_ROWS)
}

/// One micro-batch size the search tried.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Trial {
    pub rows: usize,
    pub grad_checkpointing: bool,
    /// Forward and backward tokens per second; none when it did not fit.
    pub tokens_per_s: Option<f64>,
    /// GPU: the allocator's peak during the trial; CPU: the activation estimate.
    pub memory_mb: u64,
    pub outcome: String,
}

/// What the search needs: the model as it will train, where, and how much memory a
/// micro-batch may use.
pub struct Search<'a> {
    pub net: &'a Net,
    pub vm: &'a VarMap,
    pub dev: &'a Device,
    pub precision: Precision,
    pub seq_len: usize,
    /// Bytes a micro-batch may use: `run.memory_limit_mb`, else the device's (GPU: total,
    /// CPU: available) memory.
    pub memory: u64,
}

impl Search<'_> {
    /// Try micro-batches upward, without and with gradient checkpointing, timing a few
    /// forward+backward passes of each on random tokens; keep the fastest that fits (the
    /// smallest within 3% of it: same speed, more headroom). A size stops the climb when
    /// it does not fit or when two sizes in a row were not faster. `report` sees each
    /// trial as it ends.
    pub fn run(&self, report: &mut dyn FnMut(&Trial)) -> Result<(BatchChoice, Vec<Trial>)> {
        let mut trials = Vec::new();
        for checkpointing in [false, true] {
            let (mut best, mut slower) = (0.0f64, 0);
            for rows in candidates() {
                let trial = self.try_rows(rows, checkpointing)?;
                report(&trial);
                let speed = trial.tokens_per_s;
                trials.push(trial);
                let Some(speed) = speed else { break };
                if speed > best * FASTER {
                    (best, slower) = (speed, 0);
                } else {
                    slower += 1;
                    if slower == 2 {
                        break;
                    }
                }
            }
        }
        let choice = choose(&trials).ok_or_else(|| {
            crate::train::Error::Config(format!(
                "data.batch_size = \"auto\": not even one row of {} tokens fits in {} MB",
                self.seq_len,
                self.memory / 1_000_000
            ))
        })?;
        Ok((choice, trials))
    }

    fn try_rows(&self, rows: usize, checkpointing: bool) -> Result<Trial> {
        let estimate = activation_bytes(self.net.config(), rows, self.seq_len, checkpointing);
        let budget = (self.memory as f64 * MEMORY_SHARE) as u64;
        let trial = |tokens_per_s, memory: u64, outcome| Trial {
            rows,
            grad_checkpointing: checkpointing,
            tokens_per_s,
            memory_mb: memory / 1_000_000,
            outcome: String::from(outcome),
        };
        // On the CPU the estimate decides: a failed host allocation is not an error one
        // can recover from. On the GPU the allocator reports failure, and its peak is real.
        let gpu = self.dev.is_cuda();
        if !gpu && estimate > budget {
            return Ok(trial(None, estimate, "over the memory budget (estimate)"));
        }
        match self.time_rows(rows, checkpointing) {
            Ok((speed, peak)) => {
                let used = peak.unwrap_or(estimate);
                Ok(if used > budget {
                    trial(None, used, "over the memory budget")
                } else {
                    trial(Some(speed), used, "fits")
                })
            }
            Err(crate::train::Error::Candle(e)) if is_out_of_memory(&e) => {
                mmrec_model::device::release_cached_memory(self.dev)?;
                Ok(trial(None, estimate, "out of memory"))
            }
            Err(e) => Err(e),
        }
    }

    /// Tokens per second of forward+backward at `rows` (one warm-up pass, then the median
    /// of two or three), and the GPU allocator's peak.
    fn time_rows(&self, rows: usize, checkpointing: bool) -> Result<(f64, Option<u64>)> {
        let n = rows * (self.seq_len + 1);
        let vocab = self.net.config().vocab_size as u32;
        // Tokens from a fixed linear congruence: the timing does not depend on the values.
        let ids: Vec<u32> = (0..n as u64)
            .map(|i| ((i * 2_654_435_761) % vocab as u64) as u32)
            .collect();
        let all = Tensor::from_vec(ids, (rows, self.seq_len + 1), self.dev)?;
        let (inp, tgt) = (all.narrow(1, 0, self.seq_len)?, all.narrow(1, 1, self.seq_len)?);
        let mask = Tensor::ones((rows, self.seq_len), DType::F32, self.dev)?;
        let net = self.net.in_precision(self.vm, self.precision, self.dev)?;
        let pass = || -> Result<()> {
            loss_and_grads(&net, self.vm, (&inp, &tgt, &mask), checkpointing, None)?;
            Ok(())
        };
        mmrec_model::device::reset_peak_memory(self.dev)?;
        let repeats = if self.dev.is_cuda() { 3 } else { 2 };
        let t = crate::suite::time(self.dev, 1, repeats, pass)?;
        let peak = mmrec_model::device::peak_memory(self.dev)?;
        Ok(((rows * self.seq_len) as f64 / (t.median_ms / 1e3).max(1e-12), peak))
    }
}

/// The fastest trial that fitted, or the smallest within 3% of it.
pub fn choose(trials: &[Trial]) -> Option<BatchChoice> {
    let best = trials.iter().filter_map(|t| t.tokens_per_s).fold(0.0f64, f64::max);
    trials
        .iter()
        .filter(|t| t.tokens_per_s.is_some_and(|s| s * FASTER >= best))
        .min_by_key(|t| (t.rows, t.grad_checkpointing))
        .map(|t| BatchChoice {
            rows: t.rows,
            grad_checkpointing: t.grad_checkpointing,
            tokens_per_s: t.tokens_per_s.unwrap_or(0.0),
        })
}

/// The smoothed simple noise scale B_noise = tr(Σ)/|G|² in tokens, once both averages are
/// positive.
pub fn noise_scale(s: &NoiseScaleState) -> Option<f64> {
    (s.grad_sq > 0.0 && s.trace > 0.0).then(|| s.trace / s.grad_sq)
}

/// Where a step's accumulation comes from.
pub struct Accumulation {
    /// `optim.grad_accum`: the schedule's floor and the learning-rate rule's reference.
    pub base: usize,
    /// Tokens of one loader batch (rows × sequence length).
    pub batch_tokens: u64,
    /// `optim.max_batch_tokens` (0: 64 × the base batch).
    pub max_tokens: u64,
}

impl Accumulation {
    fn max(&self) -> usize {
        let max_tokens = match self.max_tokens {
            0 => 64 * self.base as u64 * self.batch_tokens,
            t => t,
        };
        ((max_tokens / self.batch_tokens.max(1)) as usize).max(self.base)
    }

    /// The batches to accumulate for the next step. Noise scale: the global batch follows
    /// B_noise and only grows (an estimate that dips does not shrink the batch back);
    /// before the first estimate, the base. Ramp: linear in the tokens seen.
    pub fn next(&self, schedule: &BatchSchedule, noise: Option<f64>, tokens_seen: u64, current: usize) -> usize {
        let batches = |tokens: f64| (tokens / self.batch_tokens.max(1) as f64).round() as usize;
        match schedule {
            BatchSchedule::Fixed => self.base,
            BatchSchedule::NoiseScale => {
                let target = noise.map_or(self.base, batches).clamp(self.base, self.max());
                target.max(current.min(self.max()))
            }
            BatchSchedule::Linear { start, end, over } => {
                let done = (tokens_seen as f64 / (*over).max(1) as f64).min(1.0);
                batches(*start as f64 + (*end as f64 - *start as f64) * done).clamp(1, self.max())
            }
        }
    }
}

/// The learning rate's multiplier when `accum` batches replace `base`.
pub fn lr_multiplier(rule: LrRule, accum: usize, base: usize) -> f64 {
    let ratio = accum as f64 / base.max(1) as f64;
    match rule {
        LrRule::Constant => 1.0,
        LrRule::Sqrt => ratio.sqrt(),
        LrRule::Linear => ratio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_powers_of_two_and_the_steps_between() {
        let c: Vec<usize> = candidates().take(9).collect();
        assert_eq!(c, [1, 2, 3, 4, 6, 8, 12, 16, 24]);
        assert_eq!(candidates().last(), Some(MAX_ROWS));
    }

    fn trial(rows: usize, ckpt: bool, speed: Option<f64>) -> Trial {
        Trial {
            rows,
            grad_checkpointing: ckpt,
            tokens_per_s: speed,
            memory_mb: 0,
            outcome: if speed.is_some() { "fits" } else { "out of memory" }.into(),
        }
    }

    #[test]
    fn the_choice_is_the_smallest_within_three_percent_of_the_fastest() {
        let trials = [
            trial(4, false, Some(100.0)),
            trial(8, false, Some(140.0)),
            trial(16, false, Some(146.0)),
            trial(32, false, None),
            trial(32, true, Some(150.0)),
        ];
        let c = choose(&trials).unwrap();
        assert_eq!((c.rows, c.grad_checkpointing), (16, false));
        assert!(choose(&[trial(1, false, None)]).is_none());
    }

    fn acc() -> Accumulation {
        Accumulation {
            base: 2,
            batch_tokens: 1000,
            max_tokens: 16_000,
        }
    }

    #[test]
    fn noise_scale_accumulation_follows_b_noise_within_bounds_and_never_shrinks() {
        let s = BatchSchedule::NoiseScale;
        assert_eq!(acc().next(&s, None, 0, 2), 2);
        assert_eq!(acc().next(&s, Some(500.0), 0, 2), 2, "never below the base");
        assert_eq!(acc().next(&s, Some(5_200.0), 0, 2), 5);
        assert_eq!(acc().next(&s, Some(3_000.0), 0, 5), 5, "a dip does not shrink it");
        assert_eq!(acc().next(&s, Some(1e9), 0, 5), 16, "bounded by max_batch_tokens");
        assert_eq!(acc().next(&BatchSchedule::Fixed, Some(1e9), 0, 16), 2);
    }

    #[test]
    fn the_ramp_is_linear_in_tokens_and_holds_at_its_end() {
        let s = BatchSchedule::Linear {
            start: 2_000,
            end: 10_000,
            over: 1_000_000,
        };
        assert_eq!(acc().next(&s, None, 0, 1), 2);
        assert_eq!(acc().next(&s, None, 500_000, 1), 6);
        assert_eq!(acc().next(&s, None, 5_000_000, 1), 10);
    }

    #[test]
    fn learning_rate_rules() {
        assert_eq!(lr_multiplier(LrRule::Constant, 8, 2), 1.0);
        assert_eq!(lr_multiplier(LrRule::Sqrt, 8, 2), 2.0);
        assert_eq!(lr_multiplier(LrRule::Linear, 8, 2), 4.0);
    }
}
