//! Mixed precision: bf16 activations over f32 master weights, through the trainer's
//! gradient and optimiser step.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mmrec_model::io::varmap_vars;
use mmrec_model::model::seeded_builder;
use mmrec_model::{initialise, MMRecModel};
use mmrec_schemas::ModelConfig;
use mmrec_trainer::optim::AdamW;
use mmrec_trainer::train::{loss_and_grads, Net, OptimConfig, Precision};

#[test]
fn bf16_mixed_precision_keeps_tiny_updates_in_the_f32_master_weights() {
    // Chunk levels and the memory window all engage within the 40 tokens.
    let cfg = ModelConfig {
        chunk_sizes: vec![4, 16],
        memory_window: 3,
        ..mmrec_model::preset("tiny", 50).unwrap()
    };
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let net = Net::Single(MMRecModel::new(&cfg, seeded_builder(&vm, 1, DType::F32, &dev)).unwrap());
    initialise(&vm, &cfg).unwrap();
    let tokens: Vec<u32> = (0..82u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % 50).collect();
    let all = Tensor::from_vec(tokens, (2, 41), &dev).unwrap();
    let mask = Tensor::ones((2, 40), DType::F32, &dev).unwrap();
    let bf16 = net.in_precision(&vm, Precision::Bf16, &dev).unwrap();
    let (inp, tgt) = (all.narrow(1, 0, 40).unwrap(), all.narrow(1, 1, 40).unwrap());
    let (loss, grads, _) = loss_and_grads(&bf16, &vm, (&inp, &tgt, &mask), false, None).unwrap();
    let loss_value = loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    assert!(
        loss_value.is_finite() && (loss_value - 50f64.ln()).abs() < 1.0,
        "bf16 loss {loss_value} far from ln V at initialisation"
    );
    assert!(
        grads.values().all(|g| g.dtype() == DType::F32),
        "gradients must reach the f32 master weights as f32"
    );
    let params = varmap_vars(&vm);
    let w = params
        .iter()
        .find(|(n, _)| n == "blocks.0.ffn.up.weight")
        .unwrap()
        .1
        .clone();
    let before = w.as_tensor().copy().unwrap();
    // Adam's first step moves each weight by about lr: 1e-6, far under bf16's spacing
    // (2^-8 relative) for weights of size ~0.1.
    let mut opt = AdamW::new(
        params,
        cfg.n_layers,
        OptimConfig {
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
    )
    .unwrap();
    opt.update(&grads, &loss, 1e-6, 1.0, 0.0).unwrap();
    let moved = (w.as_tensor() - &before)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 5e-7 && moved < 2e-6, "the f32 master weight moved by {moved}");
    let changed = |a: &Tensor, b: &Tensor| {
        a.ne(b)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let (in_f32, in_bf16) = (
        changed(w.as_tensor(), &before),
        changed(&bf16(w.as_tensor()), &bf16(&before)),
    );
    assert!(in_f32 > 0.9, "only {in_f32} of the f32 weights moved");
    assert!(
        in_bf16 < 0.05,
        "{in_bf16} of the weights changed in bf16: the update should vanish there"
    );
}
