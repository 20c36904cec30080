//! `mmrec-train bench`: the MM-Rec reports' benchmark suite (issue 14) on the CPU or a GPU,
//! written to `benchmark_results.json` (schema below, versioned) with charts beside it:
//! per preset, precision and sequence length the block latency, the whole model's forward
//! and training step, peak memory and the time of every layer; the fused QKVZ projection
//! ("HEM") against four separate ones; tokens/s and memory against sequence length and
//! batch; the largest micro-batch that fits with and without gradient checkpointing.
//! Figures are medians over repeats with their range.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use mmrec_model::model::{initialise, masked_cross_entropy, seeded_builder, tied_logits, MMRecModel, Projection};
use mmrec_schemas::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::batch::Search;
use crate::optim::AdamW;
use crate::train::{loss_and_grads, Net, OptimConfig, Precision, Result};

/// Bumped whenever a field changes meaning or goes away (added fields keep it).
pub const SCHEMA_VERSION: u32 = 1;

/// What to measure.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub presets: Vec<String>,
    pub precisions: Vec<Precision>,
    pub seq_lens: Vec<usize>,
    /// Rows per batch for the per-preset figures (fewer at long sequences: a batch holds
    /// at most `scaling_tokens` tokens, or one row).
    pub batch: usize,
    /// Tokens per batch held fixed while the sequence length varies (scaling).
    pub scaling_tokens: usize,
    pub vocab: usize,
    pub repeats: usize,
    /// Bytes the memory plan's micro-batches may use (0: the device's memory).
    pub memory: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BenchmarkResults {
    pub schema_version: u32,
    pub machine: Machine,
    pub command: String,
    pub runs: Vec<RunFigure>,
    pub hem: Vec<HemFigure>,
    pub scaling: Vec<ScalingFigure>,
    pub memory_plan: Vec<MemoryPlan>,
    /// Decoding speed at batch 1 and 32 per preset (absent in older files).
    #[serde(default)]
    pub generation: Vec<GenerationFigure>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub device: String,
    pub gpu: Option<String>,
    pub driver: Option<String>,
    pub cuda: Option<String>,
    pub candle: String,
    pub git_commit: Option<String>,
}

/// Median, fastest and slowest of `repeats` timings, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub repeats: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunFigure {
    pub preset: String,
    pub precision: Precision,
    pub seq_len: usize,
    pub batch: usize,
    pub parameters: usize,
    /// One block: forward, and forward with backward.
    pub block_forward: Timing,
    pub block_forward_backward: Timing,
    pub model_forward: Timing,
    /// Forward, backward and the AdamW update.
    pub train_step: Timing,
    pub forward_tokens_per_s: f64,
    pub train_step_tokens_per_s: f64,
    /// GPU: the allocator's peak during the training steps; CPU: the process's RSS after.
    pub peak_memory_mb: f64,
    /// Forward+backward of each layer alone: `embedding`, `block.N`, `head_and_loss`.
    pub layers: BTreeMap<String, Timing>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HemFigure {
    pub preset: String,
    pub precision: Precision,
    pub seq_len: usize,
    pub batch: usize,
    /// Training step (forward and backward) with the one D→4D projection.
    pub fused: Timing,
    /// The same with four D→D projections of the same weights (same outputs: tested).
    pub separate: Timing,
    /// separate / fused median time.
    pub speedup: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScalingFigure {
    pub preset: String,
    pub precision: Precision,
    /// `seq_len` (fixed tokens per batch) or `batch` (fixed sequence length).
    pub varies: String,
    pub seq_len: usize,
    pub batch: usize,
    pub train_step: Timing,
    pub tokens_per_s: f64,
    pub peak_memory_mb: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub preset: String,
    pub precision: Precision,
    pub seq_len: usize,
    /// The largest micro-batch that fitted, and its forward+backward tokens/s.
    pub without_checkpointing: Option<(usize, f64)>,
    pub with_checkpointing: Option<(usize, f64)>,
    pub trials: Vec<crate::batch::Trial>,
}

/// A model of `preset` with seeded weights on `dev`.
fn model(preset: &str, vocab: usize, dev: &Device) -> Result<(ModelConfig, VarMap, Net)> {
    let cfg = mmrec_model::preset(preset, vocab)
        .ok_or_else(|| crate::train::Error::Config(format!("no preset {preset:?} (tiny, small, medium)")))?;
    let vm = VarMap::new();
    let net = Net::Single(MMRecModel::new(&cfg, seeded_builder(&vm, 0, DType::F32, dev))?);
    initialise(&vm, &cfg)?;
    Ok((cfg, vm, net))
}

/// Random tokens: inputs, targets and an all-ones mask of [rows, seq].
fn batch(rows: usize, seq: usize, vocab: usize, dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let all = Tensor::rand(0f32, vocab as f32, (rows, seq + 1), dev)?.to_dtype(DType::U32)?;
    let mask = Tensor::ones((rows, seq), DType::F32, dev)?;
    Ok((all.narrow(1, 0, seq)?, all.narrow(1, 1, seq)?, mask))
}

/// `f` `warmup` times, then `repeats` times, each run synchronised with the device.
pub fn time<E: From<candle_core::Error>>(
    dev: &Device,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<Timing, E> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        repeats: ms.len(),
    })
}

/// [`time`] with one warm-up, for the suite's own closures.
fn timed(dev: &Device, repeats: usize, f: impl FnMut() -> Result<()>) -> Result<Timing> {
    time(dev, 1, repeats, f)
}

fn peak_mb(dev: &Device) -> Result<f64> {
    let bytes = mmrec_model::device::peak_memory(dev)?.or_else(mmrec_model::host::rss_bytes);
    Ok(bytes.map_or(f64::NAN, |b| b as f64 / 1e6))
}

/// Run the whole suite on `dev`; `progress` hears what is being measured.
pub fn run(cfg: &SuiteConfig, dev: &Device, command: String, progress: &dyn Fn(&str)) -> Result<BenchmarkResults> {
    let mut out = BenchmarkResults {
        schema_version: SCHEMA_VERSION,
        machine: machine(dev),
        command,
        runs: vec![],
        hem: vec![],
        scaling: vec![],
        memory_plan: vec![],
        generation: vec![],
    };
    for preset in &cfg.presets {
        for &precision in &cfg.precisions {
            for &seq in &cfg.seq_lens {
                progress(&format!("{preset} {precision:?} T={seq}: model, blocks and layers"));
                out.runs.push(run_figure(cfg, preset, precision, seq, dev)?);
                progress(&format!(
                    "{preset} {precision:?} T={seq}: fused against separate projections"
                ));
                out.hem.push(hem_figure(cfg, preset, precision, seq, dev)?);
            }
            progress(&format!("{preset} {precision:?}: scaling"));
            out.scaling.extend(scaling(cfg, preset, precision, dev)?);
            progress(&format!("{preset} {precision:?}: memory plan"));
            out.memory_plan.push(memory_plan(cfg, preset, precision, dev)?);
        }
    }
    progress("generation at batch 1 and 32");
    out.generation = generation_figures(dev, &cfg.presets, cfg.vocab)?;
    Ok(out)
}

impl SuiteConfig {
    fn rows(&self, seq: usize) -> usize {
        self.batch.min(self.scaling_tokens / seq).max(1)
    }
}

fn run_figure(cfg: &SuiteConfig, preset: &str, precision: Precision, seq: usize, dev: &Device) -> Result<RunFigure> {
    let (mcfg, vm, net) = model(preset, cfg.vocab, dev)?;
    let rows = cfg.rows(seq);
    let params = mmrec_model::io::varmap_vars(&vm);
    let parameters = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(params, mcfg.n_layers, OptimConfig::default())?;
    let (inp, tgt, mask) = batch(rows, seq, cfg.vocab, dev)?;
    let cast = net.in_precision(&vm, precision, dev)?;
    let model_forward = timed(dev, cfg.repeats, || Ok(cast.logits(&inp, false).map(|_| ())?))?;
    mmrec_model::device::reset_peak_memory(dev)?;
    let train_step = timed(dev, cfg.repeats, || {
        let cast = net.in_precision(&vm, precision, dev)?;
        let (loss, grads, _) = loss_and_grads(&cast, &vm, (&inp, &tgt, &mask), false, None)?;
        opt.update(&grads, &loss, 1e-4, 1.0, 1.0)?;
        Ok(())
    })?;
    let peak_memory_mb = peak_mb(dev)?;
    let layers = layer_times(cfg, &cast, (&inp, &tgt, &mask), dev)?;
    let tokens = (rows * seq) as f64;
    Ok(RunFigure {
        preset: preset.into(),
        precision,
        seq_len: seq,
        batch: rows,
        parameters,
        block_forward: layers["block.0 forward"],
        block_forward_backward: layers["block.0"],
        forward_tokens_per_s: tokens / (model_forward.median_ms / 1e3),
        train_step_tokens_per_s: tokens / (train_step.median_ms / 1e3),
        model_forward,
        train_step,
        peak_memory_mb,
        layers,
    })
}

/// Each layer alone, as the checkpointed backward runs it: the embedding, every block
/// (forward, and forward with the backward of Σ y ⊙ g for a random g), and the head with
/// the loss.
fn layer_times(
    cfg: &SuiteConfig,
    net: &Net,
    (inp, tgt, mask): (&Tensor, &Tensor, &Tensor),
    dev: &Device,
) -> Result<BTreeMap<String, Timing>> {
    let Net::Single(m) = net else {
        return Err(crate::train::Error::Config("layer times need a single model".into()));
    };
    let table = m.embed.embeddings();
    let mut out = BTreeMap::new();
    let embed = Var::from_tensor(table)?;
    out.insert(
        "embedding".into(),
        timed(dev, cfg.repeats, || {
            let x = mmrec_kernels::fused::embedding(embed.as_tensor(), inp)?;
            x.sum_all()?.backward()?;
            Ok(())
        })?,
    );
    let x0 = mmrec_kernels::fused::embedding(table, inp)?.detach();
    let states = m.stack.initial_state(inp.dim(0)?, table.dtype(), dev)?;
    let g = x0.randn_like(0.0, 1.0)?;
    let mut x = x0;
    for (i, (blk, s)) in m.stack.blocks.iter().zip(&states).enumerate() {
        let input = Var::from_tensor(&x)?;
        let forward = || Ok(blk.forward(input.as_tensor(), s, true, Projection::Fused, None)?.0);
        out.insert(
            format!("block.{i} forward"),
            timed(dev, cfg.repeats, || forward().map(|_| ()))?,
        );
        let both = timed(dev, cfg.repeats, || {
            (forward()? * &g)?.sum_all()?.backward()?;
            Ok(())
        })?;
        out.insert(format!("block.{i}"), both);
        x = forward()?.detach();
    }
    let top = Var::from_tensor(&x)?;
    out.insert(
        "head_and_loss".into(),
        timed(dev, cfg.repeats, || {
            let y = candle_nn::Module::forward(&m.stack.norm, top.as_tensor())?;
            masked_cross_entropy(&tied_logits(&y, table)?, tgt, mask)?.backward()?;
            Ok(())
        })?,
    );
    Ok(out)
}

/// A training step's forward and backward with the fused projection and with four
/// separate ones (the same weights).
fn hem_figure(cfg: &SuiteConfig, preset: &str, precision: Precision, seq: usize, dev: &Device) -> Result<HemFigure> {
    let (_, vm, net) = model(preset, cfg.vocab, dev)?;
    let (inp, tgt, mask) = batch(cfg.rows(seq), seq, cfg.vocab, dev)?;
    let Net::Single(m) = net.in_precision(&vm, precision, dev)? else {
        return Err(crate::train::Error::Config("HEM needs a single model".into()));
    };
    let step = |how| {
        timed(dev, cfg.repeats, || {
            let (logits, _, aux) = m.forward_with(&inp, None, true, how, None)?;
            (masked_cross_entropy(&logits, &tgt, &mask)? + aux)?.backward()?;
            Ok(())
        })
    };
    let (fused, separate) = (step(Projection::Fused)?, step(Projection::Unfused)?);
    Ok(HemFigure {
        preset: preset.into(),
        precision,
        seq_len: seq,
        batch: cfg.rows(seq),
        speedup: separate.median_ms / fused.median_ms,
        fused,
        separate,
    })
}

/// Training steps at every sequence length with the tokens per batch fixed, then at
/// doubling batches at the first sequence length; a size that runs out of memory ends
/// its series.
fn scaling(cfg: &SuiteConfig, preset: &str, precision: Precision, dev: &Device) -> Result<Vec<ScalingFigure>> {
    let (mcfg, vm, net) = model(preset, cfg.vocab, dev)?;
    let mut opt = AdamW::new(mmrec_model::io::varmap_vars(&vm), mcfg.n_layers, OptimConfig::default())?;
    let mut point = |varies: &str, seq: usize, rows: usize| -> Result<Option<ScalingFigure>> {
        let measured = (|| {
            let (inp, tgt, mask) = batch(rows, seq, cfg.vocab, dev)?;
            mmrec_model::device::reset_peak_memory(dev)?;
            let t = timed(dev, cfg.repeats, || {
                let cast = net.in_precision(&vm, precision, dev)?;
                let (loss, grads, _) = loss_and_grads(&cast, &vm, (&inp, &tgt, &mask), false, None)?;
                opt.update(&grads, &loss, 1e-4, 1.0, 1.0)?;
                Ok(())
            })?;
            Ok::<_, crate::train::Error>((t, peak_mb(dev)?))
        })();
        match measured {
            Ok((train_step, peak_memory_mb)) => Ok(Some(ScalingFigure {
                preset: preset.into(),
                precision,
                varies: varies.into(),
                seq_len: seq,
                batch: rows,
                tokens_per_s: (rows * seq) as f64 / (train_step.median_ms / 1e3),
                train_step,
                peak_memory_mb,
            })),
            Err(crate::train::Error::Candle(e)) if crate::train::is_out_of_memory(&e) => {
                mmrec_model::device::release_cached_memory(dev)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    };
    let mut out = Vec::new();
    for &seq in &cfg.seq_lens {
        match point("seq_len", seq, (cfg.scaling_tokens / seq).max(1))? {
            Some(p) => out.push(p),
            None => break,
        }
    }
    let seq = cfg.seq_lens.first().copied().unwrap_or(512);
    let mut rows = 1;
    while rows * seq <= 4 * cfg.scaling_tokens {
        match point("batch", seq, rows)? {
            Some(p) => out.push(p),
            None => break,
        }
        rows *= 2;
    }
    Ok(out)
}

/// The micro-batch search (as `data.batch_size = "auto"` runs it) at the first sequence
/// length: the largest micro-batch that fits with and without checkpointing.
fn memory_plan(cfg: &SuiteConfig, preset: &str, precision: Precision, dev: &Device) -> Result<MemoryPlan> {
    let (_, vm, net) = model(preset, cfg.vocab, dev)?;
    let seq = cfg.seq_lens.first().copied().unwrap_or(512);
    let memory = match cfg.memory {
        0 => mmrec_model::device::total_memory(dev),
        m => m,
    };
    let search = Search {
        net: &net,
        vm: &vm,
        dev,
        precision,
        seq_len: seq,
        memory,
    };
    let (_, trials) = search.run(&mut |_| {})?;
    let largest = |ckpt: bool| {
        trials
            .iter()
            .filter(|t| t.grad_checkpointing == ckpt)
            .filter_map(|t| t.tokens_per_s.map(|s| (t.rows, s)))
            .max_by_key(|&(rows, _)| rows)
    };
    Ok(MemoryPlan {
        preset: preset.into(),
        precision,
        seq_len: seq,
        without_checkpointing: largest(false),
        with_checkpointing: largest(true),
        trials,
    })
}

fn machine(dev: &Device) -> Machine {
    let gpu = dev.is_cuda().then(|| mmrec_model::device::gpu_name(dev));
    let smi = |field: &str| {
        std::process::Command::new("nvidia-smi")
            .args([&format!("--query-gpu={field}"), "--format=csv,noheader"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
    };
    let git = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string());
    Machine {
        cpu: mmrec_model::host::cpu_name(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        device: mmrec_model::device::name(dev),
        driver: gpu.as_ref().and_then(|_| smi("driver_version")),
        cuda: gpu.as_ref().and_then(|_| mmrec_model::device::cuda_version(dev)),
        gpu,
        candle: "0.11.1".into(),
        // The build's own record first: a copy of the tree without its history (as on a
        // GPU machine) may carry a stale .git.
        git_commit: option_env!("MMREC_GIT_COMMIT")
            .filter(|c| !c.is_empty())
            .map(String::from)
            .or(git),
    }
}

/// Decoding: a prompt of [`PROMPT`] tokens per sequence through the parallel pass, then
/// [`NEW_TOKENS`] tokens one step at a time with the carried state (greedy, the argmax
/// taken on the device and fed back), `batch` sequences at once, f32.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenerationFigure {
    pub preset: String,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// The prompt's pass and the first token, for the whole batch.
    pub prompt_ms: f64,
    /// Later tokens of all sequences per second.
    pub decode_tokens_per_s: f64,
}

const PROMPT: usize = 128;
const NEW_TOKENS: usize = 64;

/// Best of three runs (after one to warm up) of the prompt's pass and the decoding loop.
fn generation_figure(dev: &Device, preset: &str, vocab: usize, batch: usize) -> candle_core::Result<GenerationFigure> {
    let cfg =
        mmrec_model::preset(preset, vocab).ok_or_else(|| candle_core::Error::Msg(format!("no preset {preset}")))?;
    let vm = VarMap::new();
    let net = Net::Single(MMRecModel::new(&cfg, seeded_builder(&vm, 0, DType::F32, dev))?);
    initialise(&vm, &cfg)?;
    let prompt = Tensor::rand(0f32, vocab as f32, (batch, PROMPT), dev)?.to_dtype(DType::U32)?;
    let run = || -> candle_core::Result<(f64, f64)> {
        let t = Instant::now();
        let (logits, mut state) = net.logits_from(&prompt, None)?;
        let mut next = logits.narrow(1, PROMPT - 1, 1)?.argmax(D::Minus1)?;
        dev.synchronize()?;
        let prompt_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 1..NEW_TOKENS {
            let (logits, s) = net.logits_from(&next, Some(&state))?;
            state = s;
            next = logits.argmax(D::Minus1)?;
        }
        dev.synchronize()?;
        Ok((prompt_s, t.elapsed().as_secs_f64()))
    };
    run()?;
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let (p, d) = run()?;
        best = (best.0.min(p), best.1.min(d));
    }
    Ok(GenerationFigure {
        preset: preset.into(),
        batch,
        prompt_tokens: PROMPT,
        new_tokens: NEW_TOKENS,
        prompt_ms: best.0 * 1e3,
        decode_tokens_per_s: (batch * (NEW_TOKENS - 1)) as f64 / best.1,
    })
}

/// Generation figures at batch 1 and 32 for each preset.
pub fn generation_figures(
    dev: &Device,
    presets: &[String],
    vocab: usize,
) -> candle_core::Result<Vec<GenerationFigure>> {
    let mut out = Vec::new();
    for p in presets.iter().filter(|p| !p.is_empty()) {
        for batch in [1, 32] {
            out.push(generation_figure(dev, p, vocab, batch)?);
        }
    }
    Ok(out)
}
