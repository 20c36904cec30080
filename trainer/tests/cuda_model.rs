//! The whole model on the GPU against the CPU path: loss and every gradient, in f32 and in
//! bf16 mixed precision. Built only with `--features cuda`; run by scripts/gpu-check.sh.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mmrec_model::model::seeded_builder;
use mmrec_model::{initialise, MMRecModel};
use mmrec_schemas::ModelConfig;
use mmrec_trainer::train::{loss_and_grads, Net, Precision};

/// Chunk levels and the memory window all engage within the sequence.
fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 300,
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_slots: 3,
        chunk_sizes: vec![8, 32],
        memory_window: 3,
        dropout: 0.0,
        uboo_weight: 0.1,
    }
}

fn loss_and_grads_on(dev: &Device, precision: Precision, checkpointing: bool) -> (f64, BTreeMap<String, Vec<f64>>) {
    let cfg = cfg();
    let vm = VarMap::new();
    // The seeded builder draws in f64 on the host: the same weights on either device.
    let net = Net::Single(MMRecModel::new(&cfg, seeded_builder(&vm, 3, DType::F32, dev)).unwrap());
    initialise(&vm, &cfg).unwrap();
    let (b, t) = (3, 150);
    let toks: Vec<u32> = (0..b * (t + 1))
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 9) % 300)
        .collect();
    let all = Tensor::from_vec(toks, (b, t + 1), dev).unwrap();
    let mut mask = vec![1f32; b * t];
    mask[b * t - 20..].fill(0.0); // padded tail of the last row
    let mask = Tensor::from_vec(mask, (b, t), dev).unwrap();
    let net = net.in_precision(&vm, precision, dev).unwrap();
    let (inp, tgt) = (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap());
    let (loss, grads, _) = loss_and_grads(&net, &vm, (&inp, &tgt, &mask), checkpointing, None).unwrap();
    let loss = loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let grads = grads
        .into_iter()
        .map(|(n, g)| {
            (
                n,
                g.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            )
        })
        .collect();
    (loss, grads)
}

/// Largest norm-wise relative error over all gradients.
fn worst_gradient(got: &BTreeMap<String, Vec<f64>>, want: &BTreeMap<String, Vec<f64>>) -> (String, f64) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let mut worst = (String::new(), 0.0);
    for (name, w) in want {
        let g = &got[name];
        let num: f64 = g.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = w.iter().map(|b| b * b).sum();
        let err = if g.iter().all(|x| x.is_finite()) {
            (num / den.max(1e-30)).sqrt()
        } else {
            f64::INFINITY
        };
        if err > worst.1 {
            worst = (name.clone(), err);
        }
    }
    worst
}

fn gpu() -> Device {
    mmrec_model::device::parse("cuda").expect("these tests need a CUDA GPU")
}

#[test]
fn f32_loss_and_gradients_on_the_gpu_match_the_cpu() {
    let (cpu_loss, cpu_grads) = loss_and_grads_on(&Device::Cpu, Precision::F32, false);
    let (gpu_loss, gpu_grads) = loss_and_grads_on(&gpu(), Precision::F32, false);
    assert!(
        ((gpu_loss - cpu_loss) / cpu_loss).abs() < 1e-5,
        "loss {gpu_loss} vs {cpu_loss}"
    );
    let (name, err) = worst_gradient(&gpu_grads, &cpu_grads);
    assert!(err < 1e-4, "{name}: relative error {err:e}");
}

#[test]
fn gradient_checkpointing_on_the_gpu_gives_the_same_gradients() {
    let (_, plain) = loss_and_grads_on(&gpu(), Precision::F32, false);
    let (_, ckpt) = loss_and_grads_on(&gpu(), Precision::F32, true);
    let (name, err) = worst_gradient(&ckpt, &plain);
    assert!(err < 1e-5, "{name}: relative error {err:e}");
}

#[test]
fn bf16_loss_and_gradients_stay_close_to_f32() {
    let (f32_loss, f32_grads) = loss_and_grads_on(&gpu(), Precision::F32, false);
    let (bf16_loss, bf16_grads) = loss_and_grads_on(&gpu(), Precision::Bf16, false);
    let (name, err) = worst_gradient(&bf16_grads, &f32_grads);
    eprintln!("bf16 against f32: loss {bf16_loss} vs {f32_loss}; worst gradient {name} at {err:.3e}");
    assert!(
        ((bf16_loss - f32_loss) / f32_loss).abs() < 1e-2,
        "loss {bf16_loss} vs {f32_loss}"
    );
    assert!(err < 5e-2, "{name}: relative error {err:e}");
}
