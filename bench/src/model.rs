//! `mmrec-bench model`: scan bandwidth against memcpy and a naive candle loop, model
//! forward / forward+backward throughput and decoding speed. Every figure comes with the
//! machine it ran on.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use mmrec_model::model::seeded_builder;
use mmrec_model::{device, initialise, masked_cross_entropy, MMRecModel, Projection};
use mmrec_schemas::ModelConfig;
use mmrec_trainer::optim::AdamW;
use mmrec_trainer::suite::{generation_figures, time, GenerationFigure};
use mmrec_trainer::train::{loss_and_grads, Net, OptimConfig, Precision};

#[derive(Debug, Serialize)]
pub struct ScanFigure {
    pub shape: [usize; 3],
    pub direction: &'static str,
    pub ms: f64,
    /// Bytes the op must move (read γ and u, write h) over its time.
    pub gb_per_s: f64,
    /// Over the machine's memcpy bandwidth measured in the same run (GPU: a 1 GiB copy).
    pub of_memcpy: f64,
    /// GPU: over the bandwidth of copying one [B, T, D] array, in the same run (a copy of
    /// that size runs below the 1 GiB figure: launch and tail effects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub of_copy_same_size: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ModelFigure {
    pub preset: String,
    pub batch: usize,
    pub seq_len: usize,
    pub projection: &'static str,
    pub forward_tokens_per_s: f64,
    pub train_step_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct CpuBench {
    pub device: String,
    /// The kernel alone writing into a reused buffer (no allocation, no page faults).
    pub scan_kernel: Vec<ScanFigure>,
    pub threads: usize,
    pub build: &'static str,
    pub memcpy_gb_per_s: f64,
    pub scan: Vec<ScanFigure>,
    /// The same recurrence as candle tensor ops, one time step at a time.
    pub naive_candle_loop: ScanFigure,
    pub scan_vs_naive: f64,
    pub model: Vec<ModelFigure>,
    pub generation: Vec<GenerationFigure>,
}

/// Best of `reps` runs, in seconds.
fn best<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up: allocation, page faults, thread pool start
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Read+write bandwidth of a plain copy of a buffer much larger than the caches.
pub fn memcpy_gb_per_s() -> f64 {
    let n = 64 << 20; // 256 MiB of f32
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let secs = best(5, || {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        Ok(())
    })
    .expect("copy cannot fail");
    2.0 * (n * 4) as f64 / secs / 1e9
}

fn scan_figure(shape: [usize; 3], backward: bool, memcpy: f64) -> Result<ScanFigure> {
    let [b, t, d] = shape;
    let dev = Device::Cpu;
    let gamma = Tensor::rand(0.9f32, 1.0, (b, t, d), &dev)?;
    let u = Tensor::randn(0f32, 1.0, (b, t, d), &dev)?;
    let h0 = Tensor::zeros((b, d), DType::F32, &dev)?;
    let secs = if backward {
        best(5, || {
            u.apply_op2_no_bwd(&gamma, &mmrec_kernels::ScanAdjoint).map(|_| ())
        })?
    } else {
        best(5, || mmrec_kernels::scan(&gamma, &u, &h0).map(|_| ()))?
    };
    let gb = 3.0 * (b * t * d * 4) as f64 / secs / 1e9;
    Ok(ScanFigure {
        shape,
        direction: if backward { "adjoint" } else { "forward" },
        ms: secs * 1e3,
        gb_per_s: gb,
        of_memcpy: gb / memcpy,
        of_copy_same_size: None,
    })
}

fn kernel_figure(shape: [usize; 3], memcpy: f64) -> ScanFigure {
    use mmrec_kernels::cpu::{scan_into, Direction, Strategy};
    let [b, t, d] = shape;
    let n = b * t * d;
    let gamma: Vec<f32> = (0..n)
        .map(|i| 0.9 + 0.1 * ((i * 7919 % 1000) as f32 / 1000.0))
        .collect();
    let u: Vec<f32> = (0..n).map(|i| (i % 17) as f32 - 8.0).collect();
    let h0 = vec![0f32; b * d];
    let mut out = vec![0f32; n];
    let secs = best(5, || {
        scan_into(&gamma, &u, &h0, (b, t, d), Direction::Forward, Strategy::Auto, &mut out);
        Ok(())
    })
    .expect("the kernel cannot fail");
    let gb = 3.0 * (n * 4) as f64 / secs / 1e9;
    ScanFigure {
        shape,
        direction: "forward",
        ms: secs * 1e3,
        gb_per_s: gb,
        of_memcpy: gb / memcpy,
        of_copy_same_size: None,
    }
}

fn naive_figure(shape: [usize; 3], memcpy: f64) -> Result<ScanFigure> {
    let [b, t, d] = shape;
    let dev = Device::Cpu;
    let gamma = Tensor::rand(0.9f32, 1.0, (b, t, d), &dev)?;
    let u = Tensor::randn(0f32, 1.0, (b, t, d), &dev)?;
    let secs = best(2, || {
        let mut h = Tensor::zeros((b, d), DType::F32, &dev)?;
        let mut out = Vec::with_capacity(t);
        for s in 0..t {
            h = ((gamma.narrow(1, s, 1)?.squeeze(1)? * &h)? + u.narrow(1, s, 1)?.squeeze(1)?)?;
            out.push(h.clone());
        }
        Tensor::stack(&out, 1).map(|_| ())
    })?;
    let gb = 3.0 * (b * t * d * 4) as f64 / secs / 1e9;
    Ok(ScanFigure {
        shape,
        direction: "forward",
        ms: secs * 1e3,
        gb_per_s: gb,
        of_memcpy: gb / memcpy,
        of_copy_same_size: None,
    })
}

fn model_figure(preset: &str, vocab: usize, batch: usize, seq_len: usize, how: Projection) -> Result<ModelFigure> {
    let cfg =
        mmrec_model::preset(preset, vocab).ok_or_else(|| candle_core::Error::Msg(format!("no preset {preset}")))?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    initialise(&vm, &cfg)?;
    let tokens = Tensor::rand(0f32, vocab as f32, (batch, seq_len + 1), &dev)?.to_dtype(DType::U32)?;
    let (inp, tgt) = (tokens.narrow(1, 0, seq_len)?, tokens.narrow(1, 1, seq_len)?);
    let mask = Tensor::ones((batch, seq_len), DType::F32, &dev)?;
    let fwd = best(3, || model.forward_with(&inp, None, false, how, None).map(|_| ()))?;
    let step = best(3, || {
        let (logits, _, aux) = model.forward_with(&inp, None, true, how, None)?;
        (masked_cross_entropy(&logits, &tgt, &mask)? + aux)?
            .backward()
            .map(|_| ())
    })?;
    let n = (batch * seq_len) as f64;
    Ok(ModelFigure {
        preset: preset.into(),
        batch,
        seq_len,
        projection: match how {
            Projection::Fused => "fused",
            Projection::Unfused => "unfused",
        },
        forward_tokens_per_s: n / fwd,
        train_step_tokens_per_s: n / step,
    })
}

pub fn cpu_bench(presets: &[String], vocab: usize, batch: usize, seq_len: usize) -> Result<CpuBench> {
    let memcpy = memcpy_gb_per_s();
    let scan = vec![
        scan_figure([8, 4096, 1024], false, memcpy)?,
        scan_figure([8, 4096, 1024], true, memcpy)?,
        // B·D too small for tiles to fill the cores: the chunked two-pass path.
        scan_figure([1, 65_536, 64], false, memcpy)?,
    ];
    let scan_kernel = vec![
        kernel_figure([8, 4096, 1024], memcpy),
        kernel_figure([1, 65_536, 64], memcpy),
    ];
    let naive = naive_figure([8, 512, 1024], memcpy)?;
    let ours_same_shape = scan_figure([8, 512, 1024], false, memcpy)?;
    let mut model = Vec::new();
    for p in presets.iter().filter(|p| !p.is_empty()) {
        model.push(model_figure(p, vocab, batch, seq_len, Projection::Fused)?);
        model.push(model_figure(p, vocab, batch, seq_len, Projection::Unfused)?);
    }
    Ok(CpuBench {
        device: mmrec_model::host::cpu_name(),
        threads: rayon::current_num_threads(),
        build: if cfg!(debug_assertions) {
            "dev profile (candle, gemm and kernels at opt-level 2)"
        } else {
            "release"
        },
        memcpy_gb_per_s: memcpy,
        scan_vs_naive: ours_same_shape.gb_per_s / naive.gb_per_s,
        scan_kernel,
        scan,
        naive_candle_loop: naive,
        model,
        generation: generation_figures(&Device::Cpu, presets, vocab)?,
    })
}

/// `mmrec-train bench --device cuda`: the scan against a device-to-device copy, and the
/// model's forward and full training step (forward, backward, AdamW) per preset.
#[derive(Debug, Serialize)]
pub struct DeviceBench {
    pub device: String,
    pub gpu: String,
    pub candle: &'static str,
    pub precision: Precision,
    /// Read + write bandwidth of a 1 GiB device-to-device copy, measured in this run.
    pub copy_gb_per_s: f64,
    pub scan: Vec<ScanFigure>,
    pub model: Vec<StepFigure>,
    pub generation: Vec<GenerationFigure>,
}

#[derive(Debug, Serialize)]
pub struct StepFigure {
    pub preset: String,
    pub batch: usize,
    pub seq_len: usize,
    pub vocab: usize,
    pub parameters: usize,
    pub forward_ms: f64,
    pub forward_tokens_per_s: f64,
    /// Forward, backward and the AdamW update, as the trainer runs them.
    pub train_step_ms: f64,
    pub train_step_tokens_per_s: f64,
    /// Spread of the step times: [fastest, slowest] ms.
    pub train_step_range_ms: [f64; 2],
    pub peak_memory_gib: f64,
    /// Median ms of each part of a step, each synchronised on its own: building the bf16
    /// casts, forward with the loss, backward, the gradient norm, the AdamW update.
    pub breakdown_ms: std::collections::BTreeMap<&'static str, f64>,
    /// Matmul FLOPs per token of a training step (3× forward) × tokens/s over the dense
    /// bf16 peak of the H100/H200 (989 TFLOP/s).
    pub mfu: f64,
}

/// Median seconds per call of `f` over `reps` timings of `inner` back-to-back calls each:
/// a kernel of tens of microseconds is timed as training runs it, without a host
/// synchronisation per launch.
fn timed_back_to_back(dev: &Device, reps: usize, inner: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t = time(dev, 1, reps, || (0..inner).try_for_each(|_| f()))?;
    Ok(t.median_ms / 1e3 / inner as f64)
}

/// Read + write GB/s of copying `elems` f32 on the device.
fn device_copy_gb_per_s(dev: &Device, elems: usize) -> Result<f64> {
    let src = Tensor::rand(0f32, 1.0, elems, dev)?;
    let secs = timed_back_to_back(dev, 20, 10, || src.copy().map(|_| ()))?;
    Ok(2.0 * (elems * 4) as f64 / secs / 1e9)
}

/// Forward: read γ, u, write h (3 arrays). Backward (fused): read dy, γ, h, write du, dγ (5).
fn device_scan_figure(dev: &Device, shape: [usize; 3], backward: bool, copy: f64) -> Result<ScanFigure> {
    let [b, t, d] = shape;
    let gamma = Tensor::rand(0.9f32, 1.0, (b, t, d), dev)?;
    let u = Tensor::randn(0f32, 1.0, (b, t, d), dev)?;
    let h0 = Tensor::randn(0f32, 1.0, (b, d), dev)?;
    let (secs, arrays) = if backward {
        let op = mmrec_kernels::ScanBackward { h0 };
        let h = mmrec_kernels::scan(&gamma, &u, &op.h0)?.0;
        let secs = timed_back_to_back(dev, 20, 10, || u.apply_op3_no_bwd(&gamma, &h, &op).map(|_| ()))?;
        (secs, 5.0)
    } else {
        (
            timed_back_to_back(dev, 20, 10, || mmrec_kernels::scan(&gamma, &u, &h0).map(|_| ()))?,
            3.0,
        )
    };
    let gb = arrays * (b * t * d * 4) as f64 / secs / 1e9;
    Ok(ScanFigure {
        shape,
        direction: if backward { "backward (fused)" } else { "forward" },
        ms: secs * 1e3,
        gb_per_s: gb,
        of_memcpy: gb / copy,
        of_copy_same_size: Some(gb / device_copy_gb_per_s(dev, b * t * d)?),
    })
}

/// Matmul FLOPs of one training step per token: 3× the forward's 2·(weights touched).
pub fn train_flops_per_token(cfg: &ModelConfig, seq_len: usize) -> f64 {
    let d = cfg.d_model as f64;
    let per_block = 2.0 * (4.0 * d * d + 2.0 * (d * d / 4.0) * 2.0 + 2.0 * d * d + 2.0 * d * cfg.ffn_dim() as f64);
    let entries = cfg.n_slots as f64 + cfg.chunk_sizes.iter().map(|&c| (seq_len / c) as f64).sum::<f64>();
    let memory = 2.0 * 2.0 * entries * d;
    3.0 * (cfg.n_layers as f64 * (per_block + memory) + 2.0 * d * cfg.vocab_size as f64)
}

fn step_figure(
    dev: &Device,
    preset: &str,
    vocab: usize,
    batch: usize,
    seq_len: usize,
    precision: Precision,
) -> Result<StepFigure> {
    let cfg =
        mmrec_model::preset(preset, vocab).ok_or_else(|| candle_core::Error::Msg(format!("no preset {preset}")))?;
    let vm = VarMap::new();
    let net = Net::Single(MMRecModel::new(&cfg, seeded_builder(&vm, 0, DType::F32, dev))?);
    initialise(&vm, &cfg)?;
    let trainable = mmrec_model::io::varmap_vars(&vm);
    let parameters = trainable.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(trainable, cfg.n_layers, OptimConfig::default())?;
    // Distinct random batches: the speed does not depend on the token values.
    let batches = (0..4)
        .map(|_| Tensor::rand(0f32, vocab as f32, (batch, seq_len + 1), dev)?.to_dtype(DType::U32))
        .collect::<Result<Vec<_>>>()?;
    let mask = Tensor::ones((batch, seq_len), DType::F32, dev)?;
    let mut i = 0;
    let mut next = || {
        i += 1;
        let b = &batches[i % batches.len()];
        Ok::<_, candle_core::Error>((b.narrow(1, 0, seq_len)?, b.narrow(1, 1, seq_len)?))
    };
    let fwd = time(dev, 2, 10, || {
        let (inp, _) = next()?;
        net.in_precision(&vm, precision, dev)?.logits(&inp, false).map(|_| ())
    })?;
    device::reset_peak_memory(dev)?;
    let step = time(dev, 3, 20, || {
        let (inp, tgt) = next()?;
        let (loss, grads, _) = loss_and_grads(
            &net.in_precision(&vm, precision, dev)?,
            &vm,
            (&inp, &tgt, &mask),
            false,
            None,
        )?;
        opt.update(&grads, &loss, 1e-4, 1.0, 1.0).map(|_| ())
    })?;
    let peak = device::peak_memory(dev)?.map_or(f64::NAN, |b| b as f64 / (1u64 << 30) as f64);
    let breakdown = step_breakdown(dev, &net, &vm, &mut opt, precision, &mut next, &mask)?;
    let tokens = (batch * seq_len) as f64;
    Ok(StepFigure {
        preset: preset.into(),
        batch,
        seq_len,
        vocab,
        parameters,
        forward_ms: fwd.median_ms,
        forward_tokens_per_s: tokens / (fwd.median_ms / 1e3),
        train_step_ms: step.median_ms,
        train_step_tokens_per_s: tokens / (step.median_ms / 1e3),
        train_step_range_ms: [step.min_ms, step.max_ms],
        peak_memory_gib: peak,
        breakdown_ms: breakdown,
        mfu: train_flops_per_token(&cfg, seq_len) * tokens / (step.median_ms / 1e3) / 989e12,
    })
}

/// Where a training step's time goes: each part timed alone (median of 10, synchronised).
fn step_breakdown(
    dev: &Device,
    net: &Net,
    vm: &VarMap,
    opt: &mut AdamW,
    precision: Precision,
    next: &mut dyn FnMut() -> Result<(Tensor, Tensor)>,
    mask: &Tensor,
) -> Result<std::collections::BTreeMap<&'static str, f64>> {
    let mut parts: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut lap = |name: &'static str, since: &mut Instant| -> Result<()> {
        dev.synchronize()?;
        parts.entry(name).or_default().push(since.elapsed().as_secs_f64() * 1e3);
        *since = Instant::now();
        Ok(())
    };
    for _ in 0..10 {
        let (inp, tgt) = next()?;
        dev.synchronize()?;
        let mut t = Instant::now();
        let cast = net.in_precision(vm, precision, dev)?;
        lap("casts", &mut t)?;
        let (logits, aux) = cast.logits(&inp, true)?;
        let loss = (masked_cross_entropy(&logits, &tgt, mask)? + aux)?.to_dtype(DType::F32)?;
        lap("forward", &mut t)?;
        let store = loss.backward()?;
        lap("backward", &mut t)?;
        let grads: std::collections::BTreeMap<String, Tensor> = opt
            .params
            .iter()
            .filter_map(|p| store.get(p.var.as_tensor()).map(|g| (p.name.clone(), g.clone())))
            .collect();
        opt.update(&grads, &loss, 1e-4, 1.0, 1.0)?;
        lap("norm_clip_adamw", &mut t)?;
    }
    Ok(parts
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, v[v.len() / 2])
        })
        .collect())
}

pub fn device_bench(
    dev: &Device,
    presets: &[String],
    vocab: usize,
    batch: usize,
    seq_len: usize,
    precision: Precision,
) -> Result<DeviceBench> {
    let copy = device_copy_gb_per_s(dev, 256 << 20)?;
    let mut scan = Vec::new();
    // Large B·D (training shapes, and larger than the L2), then small B·D with long T.
    for shape in [[32, 1024, 512], [16, 4096, 1024], [1, 65_536, 256], [2, 65_536, 512]] {
        scan.push(device_scan_figure(dev, shape, false, copy)?);
        scan.push(device_scan_figure(dev, shape, true, copy)?);
    }
    let model = presets
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| step_figure(dev, p, vocab, batch, seq_len, precision))
        .collect::<Result<_>>()?;
    Ok(DeviceBench {
        device: device::name(dev),
        gpu: device::gpu_name(dev),
        candle: "0.11.1",
        precision,
        copy_gb_per_s: copy,
        scan,
        model,
        generation: generation_figures(dev, presets, vocab)?,
    })
}
