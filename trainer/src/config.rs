use serde::{Deserialize, Serialize};

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
    pub fn preset(name: &str, vocab_size: usize) -> Option<Self> {
        let (d_model, n_layers, n_heads) = match name {
            "tiny" => (64, 2, 2),
            "small" => (256, 12, 4),
            "medium" => (512, 12, 8),
            // About 150M parameters with an 8k vocabulary: the size transfer is measured at.
            "large" => (1024, 8, 16),
            _ => return None,
        };
        Some(ModelConfig {
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            n_slots: 16,
            chunk_sizes: vec![32, 256],
            memory_window: 64,
            dropout: 0.0,
            uboo_weight: 0.0,
        })
    }

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
