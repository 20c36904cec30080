//! The model presets: named shapes for `model.preset` in a run config.

use mmrec_schemas::ModelConfig;

/// The preset names, smallest first.
pub const PRESETS: [&str; 4] = ["tiny", "small", "medium", "large"];

/// The config of a named preset with the given vocabulary size; None for an unknown name.
pub fn preset(name: &str, vocab_size: usize) -> Option<ModelConfig> {
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
