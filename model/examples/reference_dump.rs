//! Writes a randomly initialised model and its logits on fixed tokens, for
//! bench/reference/compare.py. Usage: cargo run --example reference_dump -- OUT_DIR

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mmrec_model::io::{save, varmap_tensors};
use mmrec_model::{initialise, preset, MMRecModel};
use mmrec_schemas::{ModelMeta, Role};

fn main() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "reference-dump".into()));
    std::fs::create_dir_all(&out)?;
    // The tiny preset with the default chunk levels [32, 256]; 600 tokens engage both, and
    // a window of 4 engages the window limit at level 32.
    let mut cfg = preset("tiny", 512).expect("tiny preset");
    cfg.memory_window = 4;
    let vm = VarMap::new();
    let model = MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    initialise(&vm, &cfg)?;
    let (b, t) = (2, 600);
    let toks: Vec<u32> = (0..b * t)
        .map(|i| ((i as u64 * 2_654_435_761) >> 9) as u32 % 512)
        .collect();
    let tokens = Tensor::from_vec(toks, (b, t), &Device::Cpu)?;
    let (logits, _, _) = model.forward(&tokens, None, false)?;
    let meta = ModelMeta {
        role: Role::Base,
        domain: None,
        config: cfg,
        frozen: vec![],
        lineage: serde_json::json!({"tool": "reference_dump"}),
        fusion: None,
        tokenizer: None,
    };
    save(&out.join("model.safetensors"), &varmap_tensors(&vm), &meta)?;
    let dump = ModelMeta {
        lineage: serde_json::Value::Null,
        ..meta
    };
    save(
        &out.join("logits.safetensors"),
        &[
            ("tokens".into(), tokens.to_dtype(DType::F32)?),
            ("logits".into(), logits),
        ],
        &dump,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
