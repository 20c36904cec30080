//! Weight-space merging of experts fine-tuned from one base into one model of the base's
//! size: a weighted average (`linear`), task arithmetic, TIES (Yadav et al., 2023) and DARE
//! (Yu et al., 2023). One tensor at a time: memory stays near one tensor per input.
//!
//! Every tensor, the embedding and the norms included, is merged by the same rule. A
//! tensor an expert kept frozen equals the base's there, so its task vector is zero and it
//! pulls nothing away from the base.

use std::path::PathBuf;

use mmrec_schemas::atomic::file_sha256;
use mmrec_schemas::rng::{splitmix, SplitMix};
use mmrec_schemas::safetensors::{read_header, Header};
use mmrec_schemas::{ModelConfig, ModelMeta, Role};
use serde::Serialize;

use crate::{finish, source_meta, tool_version, Error, Output, Persist, Plan, Report, Result, Row, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MergeMethod {
    /// `Σ wᵢ θᵢ / Σ wᵢ`.
    Linear,
    /// `base + λ Σ wᵢ (θᵢ − base)`.
    TaskArithmetic,
    /// Task vectors trimmed to their top-`density` magnitudes, a sign elected per parameter
    /// by total mass, the agreeing values averaged, times λ.
    Ties,
    /// Task-vector entries dropped with probability 1 − density, the rest scaled by
    /// 1 / density, then summed with weights, times λ.
    Dare,
}

/// The numbers a method uses; `weights` has one entry per expert.
#[derive(Debug, Clone, Serialize)]
pub struct MergeParams {
    pub method: MergeMethod,
    pub weights: Vec<f64>,
    pub density: f64,
    pub lambda: f64,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub base: PathBuf,
    pub experts: Vec<PathBuf>,
    /// None: every expert weighs 1.
    pub weights: Option<Vec<f64>>,
    pub method: MergeMethod,
    pub density: f64,
    pub lambda: f64,
    pub seed: u64,
    /// Merge experts whose lineage does not name the base.
    pub force: bool,
    pub out: PathBuf,
    pub persist: Persist,
}

impl MergeOptions {
    fn params(&self) -> Result<MergeParams> {
        let weights = self.weights.clone().unwrap_or_else(|| vec![1.0; self.experts.len()]);
        if weights.len() != self.experts.len() {
            return Err(Error::Usage(format!(
                "--weights has {} values for {} experts",
                weights.len(),
                self.experts.len()
            )));
        }
        if weights.iter().any(|w| !w.is_finite()) || !self.lambda.is_finite() {
            return Err(Error::Usage("--weights and --lambda must be finite numbers".into()));
        }
        if self.method == MergeMethod::Linear && weights.iter().sum::<f64>() == 0.0 {
            return Err(Error::Usage("linear merging needs weights that do not sum to 0".into()));
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::Usage(format!(
                "--density must be in (0, 1], not {}",
                self.density
            )));
        }
        Ok(MergeParams {
            method: self.method,
            weights,
            density: self.density,
            lambda: self.lambda,
            seed: self.seed,
        })
    }
}

/// Merge the experts into one model of the base's shape, after checking that they descend
/// from the base and match it tensor for tensor.
pub fn merge(opts: &MergeOptions) -> Result<Report> {
    if opts.experts.is_empty() {
        return Err(Error::Usage("merge needs at least one expert".into()));
    }
    let params = opts.params()?;
    let base = read_header(&opts.base)?;
    let base_meta = source_meta(&base)?;
    if base_meta.role == Role::Fused {
        return Err(Error::Usage(format!(
            "{} is a fused model: merge takes a base (or expert) file as --base",
            opts.base.display()
        )));
    }
    let experts = opts
        .experts
        .iter()
        .map(|p| read_header(p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    check_experts(opts, &base, &base_meta, &experts)?;
    let mut rows = Vec::new();
    let mut outputs = Vec::new();
    for (name, info) in &base.tensors {
        let inputs = std::iter::once(&base)
            .chain(&experts)
            .enumerate()
            .map(|(file, h)| (file, h.tensors[name].clone()))
            .collect();
        rows.push(Row {
            target: name.clone(),
            source: Some(format!("{:?} of {} experts", params.method, experts.len()).to_lowercase()),
            status: Status::Merged,
            shape: info.shape.clone(),
            from_dtype: Some(info.dtype.name()),
            to_dtype: info.dtype.name(),
            frozen: false,
        });
        outputs.push(Output {
            name: name.clone(),
            shape: info.shape.clone(),
            dtype: info.dtype,
            plan: Plan::Merge {
                inputs,
                params: params.clone(),
            },
        });
    }
    let sources: Vec<serde_json::Value> = std::iter::once(&opts.base)
        .chain(&opts.experts)
        .map(|p| serde_json::json!({"path": p, "sha256": crate::SHA_PLACEHOLDER}))
        .collect();
    let meta = ModelMeta {
        role: Role::Base,
        domain: None,
        frozen: vec![],
        lineage: serde_json::json!({"tool": tool_version(), "operation": "merge", "method": params.method, "weights": params.weights, "density": params.density, "lambda": params.lambda, "seed": params.seed, "sources": sources}),
        fusion: None,
        ..base_meta
    };
    let headers: Vec<&Header> = std::iter::once(&base).chain(&experts).collect();
    finish(&headers, rows, outputs, &meta, &opts.out, opts.persist, &base.metadata)
}

/// Same model shape, tensor names, shapes and tokenizer as the base, and (unless `force`)
/// the base's sha256 somewhere in each expert's lineage.
fn check_experts(opts: &MergeOptions, base: &Header, base_meta: &ModelMeta, experts: &[Header]) -> Result<()> {
    let comparable = |c: &ModelConfig| ModelConfig {
        dropout: 0.0,
        ..c.clone()
    };
    let base_sha = if opts.force {
        None
    } else {
        Some(file_sha256(&opts.base)?.0)
    };
    for (path, h) in opts.experts.iter().zip(experts) {
        let meta = source_meta(h)?;
        if meta.role == Role::Fused {
            return Err(Error::Usage(format!(
                "{} is a fused model, not an expert",
                path.display()
            )));
        }
        if comparable(&meta.config) != comparable(&base_meta.config) {
            return Err(Error::Usage(format!(
                "{} has another model shape than the base: {:?} against {:?}",
                path.display(),
                meta.config,
                base_meta.config
            )));
        }
        let shapes = |h: &Header| {
            h.tensors
                .iter()
                .map(|(n, i)| (n.clone(), i.shape.clone()))
                .collect::<Vec<_>>()
        };
        if shapes(h) != shapes(base) {
            let differing: Vec<&String> = base
                .tensors
                .keys()
                .chain(h.tensors.keys())
                .filter(|n| base.tensors.get(*n).map(|i| &i.shape) != h.tensors.get(*n).map(|i| &i.shape))
                .take(6)
                .collect();
            return Err(Error::Usage(format!(
                "{} and the base differ in these tensors (name or shape): {differing:?}",
                path.display()
            )));
        }
        if h.metadata.get("tokenizer") != base.metadata.get("tokenizer") {
            return Err(Error::Usage(format!(
                "{} was trained with another tokenizer than the base",
                path.display()
            )));
        }
        if let Some(sha) = &base_sha {
            if !mentions(&meta.lineage, sha) {
                return Err(Error::Usage(format!(
                    "{} does not descend from {}: no source in its lineage has sha256 {sha} (--force merges anyway)",
                    path.display(),
                    opts.base.display()
                )));
            }
        }
    }
    Ok(())
}

/// Whether `sha` appears as a `sha256` anywhere in a lineage record (sources nest through
/// `from` as a model goes through transfers and training runs).
fn mentions(lineage: &serde_json::Value, sha: &str) -> bool {
    match lineage {
        serde_json::Value::Object(m) => m
            .iter()
            .any(|(k, v)| (k == "sha256" && v.as_str() == Some(sha)) || mentions(v, sha)),
        serde_json::Value::Array(a) => a.iter().any(|v| mentions(v, sha)),
        _ => false,
    }
}

/// One merged tensor from the base's values and each expert's, all of one length.
pub fn merge_values(name: &str, base: &[f64], experts: &[Vec<f64>], p: &MergeParams) -> Vec<f64> {
    match p.method {
        MergeMethod::Linear => linear(experts, &p.weights),
        MergeMethod::TaskArithmetic => {
            let deltas: Vec<Vec<f64>> = experts.iter().map(|e| task_vector(e, base)).collect();
            add_scaled(base, &weighted_sum(&deltas, &p.weights), p.lambda)
        }
        MergeMethod::Ties => {
            let trimmed: Vec<Vec<f64>> = experts
                .iter()
                .zip(&p.weights)
                .map(|(e, w)| {
                    trim(
                        &task_vector(e, base).iter().map(|d| w * d).collect::<Vec<_>>(),
                        p.density,
                    )
                })
                .collect();
            add_scaled(base, &disjoint_mean(&trimmed), p.lambda)
        }
        MergeMethod::Dare => {
            let dropped: Vec<Vec<f64>> = experts
                .iter()
                .enumerate()
                .map(|(i, e)| drop_and_rescale(&task_vector(e, base), p.density, dare_stream(p.seed, name, i)))
                .collect();
            add_scaled(base, &weighted_sum(&dropped, &p.weights), p.lambda)
        }
    }
}

/// `Σ wᵢ θᵢ / Σ wᵢ`, skipping zero weights so that weights (1, 0) give the first expert's
/// values bit for bit (the sign of a zero included).
fn linear(experts: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    (0..experts[0].len())
        .map(|j| {
            experts
                .iter()
                .zip(weights)
                .filter(|(_, &w)| w != 0.0)
                .map(|(e, w)| w * e[j])
                .reduce(|a, b| a + b)
                .unwrap_or(0.0)
                / total
        })
        .collect()
}

fn task_vector(expert: &[f64], base: &[f64]) -> Vec<f64> {
    expert.iter().zip(base).map(|(e, b)| e - b).collect()
}

fn weighted_sum(vectors: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    (0..vectors[0].len())
        .map(|j| vectors.iter().zip(weights).map(|(v, w)| w * v[j]).sum())
        .collect()
}

/// `base + λ δ`, leaving a value untouched (bit for bit) where `λ δ` is zero.
fn add_scaled(base: &[f64], delta: &[f64], lambda: f64) -> Vec<f64> {
    base.iter()
        .zip(delta)
        .map(|(&b, &d)| if lambda * d == 0.0 { b } else { b + lambda * d })
        .collect()
}

/// Keep the `ceil(density · n)` entries of largest magnitude, zero the rest (ties at the
/// threshold broken by position, earlier first).
fn trim(tau: &[f64], density: f64) -> Vec<f64> {
    let keep = ((density * tau.len() as f64).ceil() as usize).min(tau.len());
    let mut order: Vec<usize> = (0..tau.len()).collect();
    order.sort_by(|&a, &b| tau[b].abs().total_cmp(&tau[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; tau.len()];
    for &j in &order[..keep] {
        out[j] = tau[j];
    }
    out
}

/// TIES' elect and merge: per parameter, the sign of the summed (trimmed) task vectors,
/// then the mean of the entries that are non-zero and of that sign.
fn disjoint_mean(trimmed: &[Vec<f64>]) -> Vec<f64> {
    (0..trimmed[0].len())
        .map(|j| {
            let sign = trimmed.iter().map(|t| t[j]).sum::<f64>().signum();
            let agreeing: Vec<f64> = trimmed
                .iter()
                .map(|t| t[j])
                .filter(|&v| v != 0.0 && v.signum() == sign)
                .collect();
            if agreeing.is_empty() {
                0.0
            } else {
                agreeing.iter().sum::<f64>() / agreeing.len() as f64
            }
        })
        .collect()
}

/// DARE's random stream for one expert's tensor: from the seed, the tensor's name and the
/// expert's position, so it does not depend on the order tensors are written in.
fn dare_stream(seed: u64, name: &str, expert: usize) -> SplitMix {
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    });
    SplitMix(splitmix(seed ^ splitmix(name_hash ^ splitmix(expert as u64))))
}

/// Each entry kept with probability `density` and divided by it, else zero.
fn drop_and_rescale(tau: &[f64], density: f64, mut rng: SplitMix) -> Vec<f64> {
    tau.iter()
        .map(|&t| if rng.uniform() < density { t / density } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(method: MergeMethod, weights: &[f64], density: f64, lambda: f64) -> MergeParams {
        MergeParams {
            method,
            weights: weights.to_vec(),
            density,
            lambda,
            seed: 7,
        }
    }

    #[test]
    fn linear_with_weights_one_and_zero_is_the_first_expert_bit_for_bit() {
        let a = vec![0.1, -0.0, 3.5e-30, -7.25];
        let b = vec![9.0, 1.0, -2.0, 0.5];
        let got = merge_values(
            "t",
            &[0.0; 4],
            &[a.clone(), b],
            &params(MergeMethod::Linear, &[1.0, 0.0], 1.0, 1.0),
        );
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn linear_averages_with_weights() {
        let got = merge_values(
            "t",
            &[0.0],
            &[vec![1.0], vec![4.0]],
            &params(MergeMethod::Linear, &[1.0, 2.0], 1.0, 1.0),
        );
        assert_eq!(got, [3.0]);
    }

    #[test]
    fn task_arithmetic_with_lambda_zero_is_the_base_and_otherwise_adds_task_vectors() {
        let base = vec![1.0, -0.0, 2.0];
        let experts = vec![vec![2.0, 1.0, 2.0], vec![0.0, 3.0, 5.0]];
        let zero = merge_values(
            "t",
            &base,
            &experts,
            &params(MergeMethod::TaskArithmetic, &[1.0, 1.0], 1.0, 0.0),
        );
        assert_eq!(
            zero.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            base.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // τ1 = (1, 1, 0), τ2 = (−1, 3, 3); base + ½ (τ1 + 2 τ2).
        let half = merge_values(
            "t",
            &base,
            &experts,
            &params(MergeMethod::TaskArithmetic, &[1.0, 2.0], 1.0, 0.5),
        );
        assert_eq!(half, [0.5, 3.5, 5.0]);
    }

    #[test]
    fn ties_trims_elects_signs_and_averages_the_agreeing_values_by_hand() {
        // Base 0, so the experts are their task vectors. density 0.5 keeps 2 of 4 entries:
        // τ1 = (4, −1, 3, 0.5) → (4, 0, 3, 0); τ2 = (−2, −5, 1, 6) → (0, −5, 0, 6);
        // τ3 = (3, 2, −0.1, −7) → (3, 0, 0, −7).
        // Signs by total mass: (+, −, +, −); agreeing means: 7/2, −5, 3, −7.
        let experts = vec![
            vec![4.0, -1.0, 3.0, 0.5],
            vec![-2.0, -5.0, 1.0, 6.0],
            vec![3.0, 2.0, -0.1, -7.0],
        ];
        let got = merge_values(
            "t",
            &[0.0; 4],
            &experts,
            &params(MergeMethod::Ties, &[1.0; 3], 0.5, 1.0),
        );
        assert_eq!(got, [3.5, -5.0, 3.0, -7.0]);
        // With a base: the merged task vector is added to it, scaled by λ.
        let base = vec![1.0; 4];
        let shifted: Vec<Vec<f64>> = experts.iter().map(|e| e.iter().map(|v| v + 1.0).collect()).collect();
        let got = merge_values("t", &base, &shifted, &params(MergeMethod::Ties, &[1.0; 3], 0.5, 2.0));
        assert_eq!(got, [8.0, -9.0, 7.0, -13.0]);
    }

    #[test]
    fn dare_keeps_about_density_rescales_and_repeats_for_a_seed() {
        let n = 20_000;
        let base = vec![0.0; n];
        let expert = vec![(0..n).map(|j| 1.0 + (j % 7) as f64).collect::<Vec<f64>>()];
        let p = params(MergeMethod::Dare, &[1.0], 0.25, 1.0);
        let got = merge_values("blocks.0.ffn.up.weight", &base, &expert, &p);
        let kept: Vec<usize> = (0..n).filter(|&j| got[j] != 0.0).collect();
        assert!(
            (kept.len() as f64 / n as f64 - 0.25).abs() < 0.02,
            "{} kept",
            kept.len()
        );
        assert!(kept.iter().all(|&j| got[j] == expert[0][j] / 0.25));
        assert_eq!(got, merge_values("blocks.0.ffn.up.weight", &base, &expert, &p));
        // Another seed or another tensor draws another mask.
        assert_ne!(got, merge_values("blocks.1.ffn.up.weight", &base, &expert, &p));
        assert_ne!(
            got,
            merge_values("blocks.0.ffn.up.weight", &base, &expert, &MergeParams { seed: 8, ..p })
        );
    }

    #[test]
    fn lineage_search_follows_nested_sources() {
        let lineage = serde_json::json!({"trained_by": "x", "from": {"operation": "to-expert", "sources": [{"path": "b", "sha256": "abc"}]}});
        assert!(mentions(&lineage, "abc"));
        assert!(!mentions(&lineage, "abd"));
    }
}
