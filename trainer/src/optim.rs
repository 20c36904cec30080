//! AdamW with decoupled weight decay and parameter groups, the learning-rate schedule
//! (linear warmup, cosine decay, times a plateau multiplier), and gradient clipping.

use std::collections::BTreeMap;

use candle_core::{DType, IndexOp, Result, Tensor, Var};

use mmrec_schemas::checkpoint::{NoiseScaleState, ScheduleState};
use mmrec_schemas::run_config::OptimConfig;

/// One trainable tensor with its AdamW moments and its group's multipliers.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub lr_mult: f64,
    pub decay: bool,
    /// [2, n]: the first moment, then the second, updated in place.
    pub moments: Tensor,
}

impl Param {
    /// The first moment, shaped like the parameter (a view of `moments`).
    pub fn m(&self) -> Result<Tensor> {
        self.moments.i(0)?.reshape(self.var.shape())
    }

    /// The second moment, shaped like the parameter (a view of `moments`).
    pub fn v(&self) -> Result<Tensor> {
        self.moments.i(1)?.reshape(self.var.shape())
    }

    /// Replace both moments (as read from a checkpoint).
    pub fn set_moments(&mut self, m: &Tensor, v: &Tensor) -> Result<()> {
        self.moments = Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?
            .to_dtype(DType::F32)?
            .to_device(self.var.device())?;
        Ok(())
    }
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub t: u64,
    pub cfg: OptimConfig,
}

/// Which group a parameter is in, from its name: the embedding, block `i` (for layer-wise
/// decay), the fusion layer, or the rest (final norm).
pub fn lr_multiplier(name: &str, n_layers: usize, cfg: &OptimConfig) -> f64 {
    if name.ends_with("embed.weight") {
        return cfg.embed_lr_mult;
    }
    if name.starts_with("fusion.") {
        return cfg.fusion_lr_mult;
    }
    let block = name
        .split("blocks.")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    match block {
        // The top block learns at the base rate, each one below at `layer_decay` times the
        // one above it.
        Some(i) => cfg
            .layer_decay
            .powi((n_layers.saturating_sub(1).saturating_sub(i)) as i32),
        None => 1.0,
    }
}

/// Decoupled weight decay applies to matrices only: not to norms, biases or embeddings.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.ends_with("embed.weight") && !name.contains("norm")
}

impl AdamW {
    pub fn new(trainable: Vec<(String, Var)>, n_layers: usize, cfg: OptimConfig) -> Result<Self> {
        let params = trainable
            .into_iter()
            .map(|(name, var)| {
                let moments = Tensor::zeros((2, var.elem_count()), DType::F32, var.device())?;
                Ok(Param {
                    lr_mult: lr_multiplier(&name, n_layers, &cfg),
                    decay: decays(&name, var.rank()),
                    name,
                    moments,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { params, t: 0, cfg })
    }

    /// Σ g² over the trainable parameters' gradients, [1] f32 where they live: one kernel
    /// per tensor, nothing read back.
    pub fn sum_squares(&self, grads: &BTreeMap<String, Tensor>) -> Result<Tensor> {
        let dev = self
            .params
            .first()
            .map_or(candle_core::Device::Cpu, |p| p.var.device().clone());
        let acc = Tensor::zeros(1, DType::F32, &dev)?;
        for p in &self.params {
            if let Some(g) = grads.get(&p.name) {
                mmrec_kernels::adamw::add_squares(&acc, g)?;
            }
        }
        Ok(acc)
    }

    /// One optimiser step without a host–device synchronisation: the gradients' norm, the
    /// clipping factor and the check for a non-finite `loss` [1] or norm are computed on the
    /// device ([`mmrec_kernels::adamw::control`]) and the update reads them there, skipping
    /// itself after a non-finite one. `accum` scales the summed gradients (1 / micro-batches);
    /// `clip` ≤ 0 turns clipping off. Returns the control tensor [scale, skip, norm].
    pub fn update(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        loss: &Tensor,
        lr: f64,
        accum: f64,
        clip: f64,
    ) -> Result<Tensor> {
        let ctl = mmrec_kernels::adamw::control(&self.sum_squares(grads)?, loss, accum, clip)?;
        self.step(grads, lr, &ctl)?;
        Ok(ctl)
    }

    /// AdamW at learning rate `lr` under a control tensor: two in-place kernels per tensor.
    /// `t` counts steps taken, skipped ones included (their skip is known only on the device).
    fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64, ctl: &Tensor) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let corrections = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else { continue };
            mmrec_kernels::adamw::moments(&p.moments, &g.to_dtype(DType::F32)?, ctl, b1, b2)?;
            let lr_p = lr * p.lr_mult;
            let decay = if p.decay {
                1.0 - lr_p * self.cfg.weight_decay
            } else {
                1.0
            };
            mmrec_kernels::adamw::apply(
                p.var.as_tensor(),
                &p.moments,
                ctl,
                lr_p,
                decay,
                corrections,
                self.cfg.eps,
            )?;
        }
        Ok(())
    }
}

/// Linear warmup to `lr`, cosine decay to `min_lr` at `steps`, times the multipliers.
pub fn learning_rate(step: u64, cfg: &OptimConfig, steps: u64, s: &ScheduleState) -> f64 {
    let base = if step < cfg.warmup_steps {
        cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64
    } else {
        let span = steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
        let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
        cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    };
    (base * s.plateau_mult * s.nan_mult)
        .max(cfg.min_lr * s.nan_mult.min(1.0))
        .min(cfg.lr)
}

/// How much of the noise-scale averages each step replaces.
const NOISE_BETA: f64 = 0.95;

/// Feed one step's gradient norms to the noise-scale averages: `small_sq` the mean squared
/// norm of `n` micro-batch gradients of `b_small` tokens each, `big_sq` the squared norm of
/// their mean. Unbiased estimates of |G|² and tr(Σ) from the two batch sizes (McCandlish et
/// al., 2018, appendix A) are averaged separately; returns the smoothed B_noise = tr(Σ)/|G|²
/// in tokens once both averages are positive.
pub fn observe_noise_scale(s: &mut NoiseScaleState, small_sq: f64, big_sq: f64, b_small: f64, n: usize) -> Option<f64> {
    let b_big = b_small * n as f64;
    let grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small);
    let trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big);
    if n < 2 || !grad_sq.is_finite() || !trace.is_finite() {
        return None;
    }
    s.grad_sq = NOISE_BETA * s.grad_sq + (1.0 - NOISE_BETA) * grad_sq;
    s.trace = NOISE_BETA * s.trace + (1.0 - NOISE_BETA) * trace;
    (s.grad_sq > 0.0 && s.trace > 0.0).then(|| s.trace / s.grad_sq)
}

/// Feed a validation loss to the plateau logic; returns true when it improved.
pub fn observe_validation(loss: f64, cfg: &OptimConfig, s: &mut ScheduleState) -> bool {
    let improved = s.best_val.is_none_or(|b| loss < b * (1.0 - cfg.plateau_threshold));
    if improved {
        s.best_val = Some(loss);
        s.bad_evals = 0;
        s.evals_since_best = 0;
    } else {
        s.bad_evals += 1;
        s.evals_since_best += 1;
        if s.bad_evals > cfg.plateau_patience {
            let floor = cfg.min_lr / cfg.lr;
            s.plateau_mult = (s.plateau_mult * cfg.plateau_factor).max(floor);
            s.bad_evals = 0;
        }
    }
    improved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 10,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn warmup_then_cosine_to_min_lr() {
        let (c, s) = (cfg(), ScheduleState::default());
        assert!((learning_rate(0, &c, 110, &s) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(9, &c, 110, &s) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(60, &c, 110, &s) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-9);
        assert!((learning_rate(110, &c, 110, &s) - 1e-5).abs() < 1e-12);
    }

    #[test]
    fn plateau_multiplies_the_rate_down_after_patience() {
        let c = OptimConfig {
            plateau_patience: 1,
            plateau_factor: 0.5,
            ..cfg()
        };
        let mut s = ScheduleState::default();
        assert!(observe_validation(2.0, &c, &mut s));
        assert!(!observe_validation(2.0, &c, &mut s));
        assert_eq!(s.plateau_mult, 1.0);
        assert!(!observe_validation(2.1, &c, &mut s));
        assert_eq!(s.plateau_mult, 0.5);
        assert_eq!(s.evals_since_best, 2);
    }

    #[test]
    fn the_noise_scale_estimate_recovers_trace_over_squared_gradient() {
        // Per-token gradients g = G + noise, noise N(0, σ²) in each of D coordinates:
        // tr(Σ) = D σ², |G|² = D μ², B_noise = σ²/μ² = 16 tokens.
        let (d, mu, sigma, b_small, n) = (400, 0.5, 2.0, 8usize, 4usize);
        let mut rng = mmrec_schemas::rng::SplitMix(9);
        let mut state = NoiseScaleState::default();
        let mut last = None;
        for _ in 0..300 {
            let micro: Vec<Vec<f64>> = (0..n)
                .map(|_| {
                    (0..d)
                        .map(|_| mu + (0..b_small).map(|_| sigma * rng.normal()).sum::<f64>() / b_small as f64)
                        .collect()
                })
                .collect();
            let small_sq = micro.iter().map(|g| g.iter().map(|x| x * x).sum::<f64>()).sum::<f64>() / n as f64;
            let big_sq = (0..d)
                .map(|j| (micro.iter().map(|g| g[j]).sum::<f64>() / n as f64).powi(2))
                .sum::<f64>();
            last = observe_noise_scale(&mut state, small_sq, big_sq, b_small as f64, n);
        }
        let b = last.expect("positive averages");
        assert!((b / 16.0 - 1.0).abs() < 0.15, "B_noise {b}, expected 16");
        assert_eq!(
            observe_noise_scale(&mut state, 1.0, 1.0, 8.0, 1),
            None,
            "one micro-batch says nothing"
        );
    }

    #[test]
    fn groups_follow_names() {
        let c = OptimConfig {
            layer_decay: 0.5,
            embed_lr_mult: 0.1,
            fusion_lr_mult: 3.0,
            ..cfg()
        };
        assert_eq!(lr_multiplier("blocks.2.ffn.up.weight", 3, &c), 1.0);
        assert_eq!(lr_multiplier("blocks.0.ffn.up.weight", 3, &c), 0.25);
        assert_eq!(lr_multiplier("experts.text.blocks.1.in_proj.bias", 3, &c), 0.5);
        assert_eq!(lr_multiplier("embed.weight", 3, &c), 0.1);
        assert_eq!(lr_multiplier("fusion.proj.weight", 3, &c), 3.0);
        assert!(
            decays("blocks.0.ffn.up.weight", 2)
                && !decays("blocks.0.ffn.up.bias", 1)
                && !decays("embed.weight", 2)
                && !decays("blocks.0.norm1.weight", 1)
        );
    }
}
