//! Model-file metadata (DESIGN §2): the `__metadata__` every safetensors file the toolkit
//! writes carries (role, config, frozen patterns, lineage, fusion method, tokenizer hash),
//! and the model config it holds.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The model's shape and options: serialised into every safetensors file and checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Persistent memory slots P per block (M).
    pub n_slots: usize,
    /// Chunk size of each summary level (C_ℓ).
    pub chunk_sizes: Vec<usize>,
    /// Most recent summaries per level a position can read, so streaming state is bounded.
    pub memory_window: usize,
    pub dropout: f32,
    /// UBÖO auxiliary next-state prediction loss weight; 0 disables it (and its weights).
    pub uboo_weight: f64,
}

impl ModelConfig {
    pub fn ffn_dim(&self) -> usize {
        4 * self.d_model
    }

    /// Every constraint the model code relies on, checked on every config read from a
    /// file, so a bad one is an error naming the field instead of a panic deep inside.
    pub fn validate(&self) -> Result<(), String> {
        if self.vocab_size == 0 || self.n_heads == 0 || self.n_slots == 0 {
            return Err(format!(
                "vocab_size ({}), n_heads ({}) and n_slots ({}) must be at least 1",
                self.vocab_size, self.n_heads, self.n_slots
            ));
        }
        if self.d_model % self.n_heads != 0 {
            return Err(format!(
                "d_model {} is not a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if self.d_model < 4 || self.d_model % 4 != 0 {
            return Err(format!(
                "d_model {} must be a positive multiple of 4 (the MDI MLPs are D/4 wide)",
                self.d_model
            ));
        }
        if self.chunk_sizes.contains(&0) || self.memory_window == 0 {
            return Err("chunk sizes and memory_window must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if !(self.uboo_weight >= 0.0 && self.uboo_weight.is_finite()) {
            return Err(format!("uboo_weight {} must be a finite number ≥ 0", self.uboo_weight));
        }
        Ok(())
    }
}

/// How the fused model combines the experts' outputs per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FusionMethod {
    /// `f = Lin(2D→D)([y_text; y_code])`, initialised to `[½I, ½I]`.
    Concat,
    /// `w = softmax(Lin(2D→2)([y_text; y_code]))`, `f = w₀ y_text + w₁ y_code`.
    Gated,
    /// The same router, mixing the experts' next-token distributions instead of their
    /// hidden states: `p = w₀ softmax(head(y_text)) + w₁ softmax(head(y_code))`. A router
    /// that is unsure then costs at most log 1/wₑ over the expert it leans on, where mixed
    /// hidden states can land far from both experts.
    Mixture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Base,
    Expert,
    Fused,
}

/// The `__metadata__` of every model file the toolkit writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMeta {
    pub role: Role,
    pub domain: Option<String>,
    pub config: ModelConfig,
    /// Name patterns the trainer must not update.
    pub frozen: Vec<String>,
    pub lineage: serde_json::Value,
    /// For fused files: how the experts are combined.
    pub fusion: Option<FusionMethod>,
    /// sha256 of the tokenizer the model was trained with (from the shards' manifest), so
    /// data made with another tokenizer is refused; None in files from before it was kept.
    pub tokenizer: Option<String>,
}

impl ModelMeta {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "mmrec".into());
        m.insert("schema_version".into(), crate::SCHEMA_VERSION.to_string());
        m.insert(
            "role".into(),
            serde_json::to_value(self.role)
                .expect("role")
                .as_str()
                .expect("string")
                .into(),
        );
        if let Some(d) = &self.domain {
            m.insert("domain".into(), d.clone());
        }
        m.insert(
            "config".into(),
            serde_json::to_string(&self.config).expect("config serialises"),
        );
        m.insert(
            "frozen".into(),
            serde_json::to_string(&self.frozen).expect("list serialises"),
        );
        m.insert("lineage".into(), self.lineage.to_string());
        if let Some(f) = self.fusion {
            m.insert(
                "fusion".into(),
                serde_json::to_value(f)
                    .expect("fusion")
                    .as_str()
                    .expect("string")
                    .into(),
            );
        }
        if let Some(t) = &self.tokenizer {
            m.insert("tokenizer".into(), t.clone());
        }
        m
    }

    pub fn from_map(path: &Path, m: &BTreeMap<String, String>) -> Result<Self> {
        let err = |message: String| Error::format(path, message);
        let get = |k: &str| {
            m.get(k).ok_or_else(|| {
                err(format!(
                    "metadata has no `{k}`: not a file written by the MM-Rec toolkit"
                ))
            })
        };
        if get("format")? != "mmrec" {
            return Err(err("metadata `format` is not \"mmrec\"".into()));
        }
        let version: u32 = get("schema_version")?
            .parse()
            .map_err(|_| err("bad schema_version".into()))?;
        if version > crate::SCHEMA_VERSION {
            return Err(err(format!(
                "schema_version {version} is newer than this tool's {}",
                crate::SCHEMA_VERSION
            )));
        }
        let json = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(get(k)?).map_err(|e| err(format!("metadata `{k}` is not valid JSON: {e}")))
        };
        let config: ModelConfig =
            serde_json::from_value(json("config")?).map_err(|e| err(format!("metadata `config`: {e}")))?;
        config.validate().map_err(|e| err(format!("metadata `config`: {e}")))?;
        Ok(ModelMeta {
            role: serde_json::from_value(serde_json::Value::String(get("role")?.clone()))
                .map_err(|e| err(format!("metadata `role`: {e}")))?,
            domain: m.get("domain").cloned(),
            config,
            frozen: serde_json::from_value(json("frozen")?).map_err(|e| err(format!("metadata `frozen`: {e}")))?,
            lineage: m
                .get("lineage")
                .map(|l| serde_json::from_str(l))
                .transpose()
                .map_err(|e| err(format!("metadata `lineage`: {e}")))?
                .unwrap_or(serde_json::Value::Null),
            fusion: m
                .get("fusion")
                .map(|f| serde_json::from_value(serde_json::Value::String(f.clone())))
                .transpose()
                .map_err(|e| err(format!("metadata `fusion`: {e}")))?,
            tokenizer: m.get("tokenizer").cloned(),
        })
    }
}

/// Names matching any frozen pattern. Patterns are globs where `*` matches anything and
/// `{a-b}` matches a number in that range (the `frozen` metadata of DESIGN §2).
pub fn is_frozen(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => (0..=n.len()).any(|k| go(&p[1..], &n[k..])),
            Some(b'{') => {
                let Some(close) = p.iter().position(|&c| c == b'}') else {
                    return false;
                };
                let range = std::str::from_utf8(&p[1..close]).unwrap_or("");
                let digits = n.iter().take_while(|c| c.is_ascii_digit()).count();
                if digits == 0 {
                    return false;
                }
                let value: u64 = std::str::from_utf8(&n[..digits])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u64::MAX);
                let ok = match range.split_once('-') {
                    Some((a, b)) => {
                        a.parse::<u64>().is_ok_and(|a| a <= value) && b.parse::<u64>().is_ok_and(|b| value <= b)
                    }
                    None => range.split(',').any(|v| v.parse::<u64>() == Ok(value)),
                };
                ok && go(&p[close + 1..], &n[digits..])
            }
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The initial `fusion.proj.weight` of a concat fusion, `[½I, ½I]` (D × 2D, row-major): the
/// fused model starts as the experts' average.
pub fn concat_fusion_init(d: usize) -> Vec<f32> {
    let mut v = vec![0f32; d * 2 * d];
    for i in 0..d {
        v[i * 2 * d + i] = 0.5;
        v[i * 2 * d + d + i] = 0.5;
    }
    v
}

/// Every tensor a model file of this config holds, with its shape, in name order (DESIGN
/// §2): the contract `mmrec-transfer` checks files against without building the model.
/// `mmrec-model`'s tests assert the candle model asks for exactly these.
pub fn tensor_names(cfg: &ModelConfig, fused: Option<FusionMethod>) -> Vec<(String, Vec<usize>)> {
    let d = cfg.d_model;
    let mut out: Vec<(String, Vec<usize>)> = vec![("embed.weight".into(), vec![cfg.vocab_size, d])];
    let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
    let stacks: Vec<String> = match fused {
        None => vec![String::new()],
        Some(_) => vec!["experts.text.".into(), "experts.code.".into()],
    };
    for stack in &stacks {
        for i in 0..cfg.n_layers {
            block_tensors(cfg, &format!("{stack}blocks.{i}"), &mut push);
        }
        push(format!("{stack}norm.weight"), vec![d]);
    }
    match fused {
        Some(FusionMethod::Concat) => linear("fusion.proj", 2 * d, d, &mut push),
        Some(FusionMethod::Gated | FusionMethod::Mixture) => linear("fusion.router", 2 * d, 2, &mut push),
        None => {}
    }
    out.sort();
    out
}

fn linear(prefix: &str, d_in: usize, d_out: usize, push: &mut impl FnMut(String, Vec<usize>)) {
    push(format!("{prefix}.weight"), vec![d_out, d_in]);
    push(format!("{prefix}.bias"), vec![d_out]);
}

fn block_tensors(cfg: &ModelConfig, p: &str, push: &mut impl FnMut(String, Vec<usize>)) {
    let d = cfg.d_model;
    push(format!("{p}.norm1.weight"), vec![d]);
    linear(&format!("{p}.in_proj"), d, 4 * d, push);
    for gate in ["z", "k"] {
        linear(&format!("{p}.mdi.{gate}.fc1"), d, d / 4, push);
        linear(&format!("{p}.mdi.{gate}.fc2"), d / 4, d, push);
    }
    push(format!("{p}.memory.slots"), vec![cfg.n_slots, d]);
    linear(&format!("{p}.memory.kv"), d, 2 * d, push);
    linear(&format!("{p}.memory.out"), d, d, push);
    linear(&format!("{p}.out_proj"), d, d, push);
    push(format!("{p}.norm2.weight"), vec![d]);
    linear(&format!("{p}.ffn.up"), d, cfg.ffn_dim(), push);
    linear(&format!("{p}.ffn.down"), cfg.ffn_dim(), d, push);
    if cfg.uboo_weight > 0.0 {
        linear(&format!("{p}.uboo.fc1"), d, d, push);
        linear(&format!("{p}.uboo.fc2"), d, d, push);
    }
}
