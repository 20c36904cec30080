//! The training loop (pretrain, finetune, fusion), evaluation, and checkpoints that resume
//! exactly (DESIGN.md §5).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mmrec_loader::{Batch, Loader, LoaderConfig, Split};
use mmrec_model::device::Uploader;
use mmrec_model::io;
use mmrec_model::model::{initialise, tied_logits, widen, BlockStack, BlockState, FusedModel, MMRecModel, Projection};
use mmrec_model::stream::DocBounds;
use mmrec_schemas::checkpoint::{
    read_pointer, read_state, write_pointer, write_state, ScheduleState, TrainState, CHECKPOINTS,
};
use mmrec_schemas::model_file::is_frozen;
pub use mmrec_schemas::run_config::{
    BatchSchedule, BatchSize, DataConfig, LrRule, ModelSection, OptimConfig, Precision, RunConfig, TrainConfig,
};
use mmrec_schemas::{ModelConfig, ModelMeta, Role};

use crate::dist::Group;
use crate::optim::{learning_rate, observe_noise_scale, observe_validation, AdamW};
use crate::segments::{Carried, Segments};
use mmrec_kernels::adamw::{CONTROL_NORM, CONTROL_SKIP};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    File(#[from] mmrec_schemas::Error),
    #[error(transparent)]
    Data(#[from] mmrec_loader::Error),
    #[error(transparent)]
    Model(#[from] io::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A tensor operation that failed outside the forward and backward passes.
    #[error("{during}: {source}")]
    During {
        during: &'static str,
        source: candle_core::Error,
    },
    #[error("computing gradients with micro-batches of {rows} rows (after {halvings} halvings{memory}): {source}")]
    Gradients {
        rows: usize,
        halvings: usize,
        memory: String,
        source: candle_core::Error,
    },
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The model being trained: a single stack (base or expert) or the fused model.
#[derive(Clone)]
pub enum Net {
    Single(MMRecModel),
    Fused(FusedModel),
}

impl Net {
    pub fn config(&self) -> &ModelConfig {
        match self {
            Net::Single(m) => &m.cfg,
            Net::Fused(m) => &m.cfg,
        }
    }

    /// The same model computing in `precision`: itself for f32; for bf16, built anew over
    /// bf16 casts of the f32 variables in `vm` (call once per step: the casts are taken now).
    pub fn in_precision(&self, vm: &VarMap, precision: Precision, dev: &Device) -> candle_core::Result<Net> {
        if precision == Precision::F32 {
            return Ok(self.clone());
        }
        let vb = mmrec_model::model::cast_builder(vm, crate::dtype(precision), dev);
        Ok(match self {
            Net::Single(m) => Net::Single(MMRecModel::new(&m.cfg, vb)?),
            Net::Fused(m) => Net::Fused(FusedModel {
                experts_frozen: m.experts_frozen,
                ..FusedModel::new(&m.cfg, m.method, vb)?
            }),
        })
    }

    /// Logits and the weighted auxiliary loss.
    pub fn logits(&self, tokens: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Net::Single(m) => m.forward(tokens, None, train).map(|(l, _, aux)| (l, aux)),
            Net::Fused(m) => {
                let (l, _) = m.forward(tokens, train)?;
                let zero = Tensor::zeros((), mmrec_model::model::wide_dtype(l.dtype()), l.device())?;
                Ok((l, zero))
            }
        }
    }
}

/// Per-row summed negative log-likelihood and target counts, for per-domain evaluation.
pub fn row_losses(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let nll = mmrec_model::model::token_nll(logits, targets, mask)?;
    let sums = nll.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let counts = mask.to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()?;
    Ok((sums, counts))
}

/// A batch as tensors: inputs [B, T], targets [B, T], target mask [B, T]; tokens and mask
/// go to the device in one copy.
pub fn batch_tensors(
    b: &Batch,
    (batch, seq_len): (usize, usize),
    dtype: DType,
    dev: &Device,
    uploader: &mut Uploader,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let packed: Vec<u32> = b
        .tokens
        .iter()
        .copied()
        .chain(b.mask.iter().map(|&m| m as u32))
        .collect();
    let both = uploader.u32_tensor(&packed, (2, batch, seq_len + 1), dev)?;
    let (all, mask) = (both.i(0)?, both.i(1)?.to_dtype(dtype)?);
    Ok((all.i((.., ..seq_len))?, all.i((.., 1..))?, mask.i((.., 1..))?))
}

/// Loss (a scalar tensor on the device, at least f32: nothing is read back) and gradients by
/// parameter name. The loss comes back detached: tied to its graph it would keep the
/// micro-batch's activations alive until the step ends. With `checkpointing`, see
/// [`checkpointed_loss_and_grads`]. With `stream` (segment training) the forward starts
/// from those states and document bounds, and the states after it come back too.
pub fn loss_and_grads(
    net: &Net,
    vm: &VarMap,
    (inp, tgt, mask): (&Tensor, &Tensor, &Tensor),
    checkpointing: bool,
    stream: Option<(&[BlockState], &DocBounds)>,
) -> candle_core::Result<Gradients> {
    let named = io::varmap_vars(vm);
    let (logits, aux, after) = match (net, checkpointing, stream) {
        (Net::Single(m), true, _) => return checkpointed_loss_and_grads(m, &named, (inp, tgt, mask), stream),
        (Net::Fused(_), _, Some(_)) => candle_core::bail!("segment training needs a single model, not a fused one"),
        (Net::Single(m), false, Some((states, docs))) => {
            let (logits, after, aux) = m.forward_with(inp, Some(states), true, Projection::Fused, Some(docs))?;
            (logits, aux, Some(after))
        }
        _ => {
            let (logits, aux) = net.logits(inp, true)?;
            (logits, aux, None)
        }
    };
    let loss = (mmrec_model::model::masked_cross_entropy(&logits, tgt, mask)? + aux)?;
    let mut grads = BTreeMap::new();
    collect_grads(&named, &loss.backward()?, &mut grads)?;
    Ok((widen(&loss)?.detach(), grads, after))
}

/// Add the gradients `store` holds for the named parameters into `into`.
fn collect_grads(
    named: &[(String, Var)],
    store: &candle_core::backprop::GradStore,
    into: &mut BTreeMap<String, Tensor>,
) -> candle_core::Result<()> {
    for (name, var) in named {
        if let Some(g) = store.get(var.as_tensor()) {
            let sum = match into.remove(name) {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            };
            into.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// [`loss_and_grads`] with gradient checkpointing: only each block's input is kept from
/// the forward pass; the backward recomputes one block at a time and chains the gradient
/// through it (`∂(Σ y ⊙ g)/∂x`), so memory holds one block's activations.
fn checkpointed_loss_and_grads(
    model: &MMRecModel,
    named: &[(String, Var)],
    (inp, tgt, mask): (&Tensor, &Tensor, &Tensor),
    stream: Option<(&[BlockState], &DocBounds)>,
) -> candle_core::Result<Gradients> {
    let mut grads = BTreeMap::new();
    let stack: &BlockStack = &model.stack;
    let b = inp.dim(0)?;
    let (states, docs) = match stream {
        Some((states, docs)) => (states.to_vec(), Some(docs)),
        None => (
            stack.initial_state(b, model.embed.embeddings().dtype(), inp.device())?,
            None,
        ),
    };
    // Forward, keeping only block inputs (and the states after, for the next segment).
    let mut inputs = vec![mmrec_kernels::fused::embedding(model.embed.embeddings(), inp)?.detach()];
    let mut after = Vec::with_capacity(states.len());
    for (blk, s) in stack.blocks.iter().zip(&states) {
        let (y, s2, _) = blk.forward(inputs.last().expect("an input"), s, true, Projection::Fused, docs)?;
        inputs.push(y.detach());
        after.push(s2);
    }
    // Head: norm, tied logits, loss; the gradient flowing into the last block's output.
    let top = Var::from_tensor(inputs.last().expect("an output"))?;
    let logits = tied_logits(
        &candle_nn::Module::forward(&stack.norm, top.as_tensor())?,
        model.embed.embeddings(),
    )?;
    let ce = mmrec_model::model::masked_cross_entropy(&logits, tgt, mask)?;
    let store = ce.backward()?;
    collect_grads(named, &store, &mut grads)?;
    let mut g = store
        .get(top.as_tensor())
        .expect("the head depends on the stack")
        .clone();
    let mut loss = widen(&ce)?;
    for (i, blk) in stack.blocks.iter().enumerate().rev() {
        let x = Var::from_tensor(&inputs[i])?;
        let (y, _, aux) = blk.forward(x.as_tensor(), &states[i], true, Projection::Fused, docs)?;
        let aux = (aux * model.cfg.uboo_weight)?;
        loss = (loss + widen(&aux)?)?;
        let surrogate = ((y * &g)?.sum_all()? + aux)?;
        let store = surrogate.backward()?;
        collect_grads(named, &store, &mut grads)?;
        g = store.get(x.as_tensor()).expect("a block depends on its input").clone();
    }
    let x0 = mmrec_kernels::fused::embedding(model.embed.embeddings(), inp)?;
    collect_grads(named, &(x0 * g)?.sum_all()?.backward()?, &mut grads)?;
    Ok((loss.detach(), grads, stream.map(|_| after)))
}

/// A micro-batch's loss, its gradients by parameter name, and (segment training) the
/// states after it.
pub type Gradients = (Tensor, BTreeMap<String, Tensor>, Option<Vec<BlockState>>);

/// Segment training's plan for a config (`data.context_len` > 0), with the data's
/// `<|endoftext|>` id.
fn segment_plan(cfg: &TrainConfig, net: &Net) -> Result<Option<Segments>> {
    let context = cfg.data.context_len;
    if context == 0 {
        return Ok(None);
    }
    if matches!(net, Net::Fused(_)) {
        return Err(Error::Config(
            "data.context_len: segment training trains a base or an expert, not a fused model".into(),
        ));
    }
    let dir = cfg
        .data
        .dirs
        .first()
        .ok_or_else(|| Error::Config("no data directories".into()))?;
    let manifest = mmrec_schemas::read_manifest(dir)?;
    let eot = *manifest
        .tokenizer
        .special_tokens
        .get(mmrec_schemas::special::EOT)
        .ok_or_else(|| Error::Config(format!("{}: the tokenizer has no <|endoftext|>", dir.display())))?;
    Ok(Some(Segments {
        per_context: (context / cfg.data.seq_len) as u64,
        eot,
    }))
}

/// How a run starts.
pub enum Init {
    /// A fresh model from the config's preset.
    Fresh,
    /// An expert or base file to fine-tune (its `frozen` patterns are honoured).
    Model(PathBuf),
    /// A fused file: only `fusion.*` learns.
    Fused(PathBuf),
}

impl Init {
    /// The run's mode, as `state.json` records it.
    fn mode(&self) -> &'static str {
        match self {
            Init::Fresh => "pretrain",
            Init::Model(_) => "finetune",
            Init::Fused(_) => "fusion",
        }
    }
}

/// The model a run starts from, with its metadata: a seeded fresh base of the preset, or
/// the weights of an `--init` file (a fused one trains only its fusion layer).
fn build_net(cfg: &TrainConfig, init: &Init, vm: &VarMap, dev: &Device) -> Result<(Net, ModelMeta)> {
    let vb = VarBuilder::from_varmap(vm, DType::F32, dev);
    Ok(match init {
        Init::Fresh => {
            let (tokenizer, vocab) = data_tokenizer(&cfg.data.dirs)?;
            let mut mc = mmrec_model::preset(&cfg.model.preset, vocab).ok_or_else(|| {
                Error::Config(format!(
                    "unknown preset {:?} ({})",
                    cfg.model.preset,
                    mmrec_model::PRESETS.join(", ")
                ))
            })?;
            mc.dropout = cfg.model.dropout;
            mc.uboo_weight = cfg.model.uboo_weight;
            let seeded = mmrec_model::model::seeded_builder(vm, cfg.model.seed, DType::F32, dev);
            let net = Net::Single(MMRecModel::new(&mc, seeded)?);
            initialise(vm, &mc)?;
            let meta = ModelMeta {
                role: Role::Base,
                domain: None,
                config: mc,
                frozen: vec![],
                lineage: serde_json::json!({}),
                fusion: None,
                tokenizer: Some(tokenizer),
            };
            (net, meta)
        }
        Init::Model(path) => {
            let meta = mmrec_schemas::safetensors::read_meta(path)?;
            let net = Net::Single(MMRecModel::new(&meta.config, vb)?);
            load_into(vm, path)?;
            (net, meta)
        }
        Init::Fused(path) => {
            let mut meta = mmrec_schemas::safetensors::read_meta(path)?;
            let method = meta.fusion.ok_or_else(|| {
                Error::Config(format!(
                    "{} is not a fused model (no `fusion` metadata)",
                    path.display()
                ))
            })?;
            let mut fused = FusedModel::new(&meta.config, method, vb)?;
            fused.experts_frozen = true;
            load_into(vm, path)?;
            // In fusion training only the fusion layer learns (DESIGN §1).
            if !meta.frozen.iter().any(|p| p == "embed.*") {
                meta.frozen.extend(["embed.*".to_string(), "experts.*".to_string()]);
            }
            (Net::Fused(fused), meta)
        }
    })
}

pub struct Session {
    pub cfg: TrainConfig,
    pub vm: VarMap,
    pub net: Net,
    pub opt: AdamW,
    pub meta: ModelMeta,
    pub state: TrainState,
    dev: Device,
    uploader: Uploader,
    /// Training wall time: the checkpoint's, plus this process's since `train` began, less
    /// the seconds this process spent evaluating (a measurement, not training).
    clock: (Instant, f64),
    eval_secs: f64,
    /// Segment training (`data.context_len`), and the state carried into the next segment.
    segments: Option<Segments>,
    carried: Carried,
    /// Data parallelism: the other ranks (None: a single process), and whether any rank
    /// was asked to stop at the last step (all stop after the same step).
    group: Option<Group>,
    all_stop: bool,
}

impl Session {
    /// Build the model and optimiser, from scratch, from an init file, or from the latest
    /// checkpoint under `run.out` when `resume` is set and one exists.
    pub fn new(cfg: TrainConfig, init: Init, resume: bool, dev: &Device) -> Result<Self> {
        let vm = VarMap::new();
        let (net, meta) = build_net(&cfg, &init, &vm, dev)?;
        let source = match &init {
            Init::Model(p) | Init::Fused(p) => p.clone(),
            Init::Fresh => cfg.run.out.clone(),
        };
        check_tokenizer(&meta, &source, &cfg.data.dirs, cfg.run.allow_tokenizer_mismatch)?;
        let mut trainable: Vec<(String, Var)> = io::varmap_vars(&vm)
            .into_iter()
            .filter(|(n, _)| !is_frozen(n, &meta.frozen))
            .collect();
        // Name order: the optimiser's sums and its moments file must not depend on a
        // HashMap's order.
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        if trainable.is_empty() {
            return Err(Error::Config("every parameter is frozen: nothing to train".into()));
        }
        let opt = AdamW::new(trainable, net.config().n_layers, cfg.optim.clone())?;
        let state = TrainState {
            schema_version: mmrec_schemas::SCHEMA_VERSION,
            tool_version: format!("mmrec-train {}", env!("CARGO_PKG_VERSION")),
            mode: init.mode().into(),
            step: 0,
            tokens_seen: 0,
            adam_t: 0,
            schedule: ScheduleState::default(),
            cursor: None,
            config: cfg.clone(),
            model_meta_role: meta.role,
            recent: vec![],
            best_checkpoint: None,
            micro_splits: 1,
            noise_scale: Default::default(),
            batch_choice: None,
            grad_accum: 0,
            elapsed_s: 0.0,
            segments: None,
        };
        let segments = segment_plan(&cfg, &net)?;
        let backend = crate::dist::Backend::choose(dev)?;
        let group = match crate::dist::World::from_env()? {
            // Each rank would measure its own micro-batch, and the ranks' rows must agree.
            Some(_) if cfg.data.batch_size == BatchSize::Auto => {
                return Err(Error::Config(
                    "data.batch_size = \"auto\" with data parallelism: measure it in a single process \
                     (`pretrain ... --set data.batch_size=\"auto\" --set run.steps=3`), then set that number of rows"
                        .into(),
                ))
            }
            Some(world) => Some(Group::connect(world, backend, dev)?),
            None => None,
        };
        let mut session = Session {
            cfg,
            vm,
            net,
            opt,
            meta,
            state,
            dev: dev.clone(),
            uploader: Uploader::default(),
            clock: (Instant::now(), 0.0),
            eval_secs: 0.0,
            segments,
            carried: Carried::default(),
            group,
            all_stop: false,
        };
        if resume {
            session.resume_latest()?;
        }
        Ok(session)
    }

    /// Weights, moments and state from the latest checkpoint under `run.out`, if any; the
    /// config stays the one given (already checked by `TrainConfig::for_resume`).
    fn resume_latest(&mut self) -> Result<()> {
        let root = self.cfg.run.out.join(CHECKPOINTS);
        let Some(name) = read_pointer(&root, "latest") else {
            return Ok(());
        };
        let dir = root.join(name);
        let state = read_state(&dir)?;
        load_into(&self.vm, &dir.join("model.safetensors"))?;
        load_moments(&mut self.opt, &dir.join("optimizer.safetensors"), &self.dev)?;
        self.opt.t = state.adam_t;
        self.state = TrainState {
            config: self.cfg.clone(),
            ..state
        };
        self.load_carried(&dir)
    }

    /// The carried segment state of the checkpoint in `dir` (segment training only).
    fn load_carried(&mut self, dir: &Path) -> Result<()> {
        if self.segments.is_some() {
            let net = self.net.in_precision(&self.vm, self.cfg.run.precision, &self.dev)?;
            self.carried = Carried::load(self.state.segments.clone(), dir, &net, self.batch_rows(), &self.dev)?;
        }
        Ok(())
    }

    fn loader_config(&self, split: Split) -> Result<LoaderConfig> {
        let d = &self.cfg.data;
        let weights =
            mmrec_loader::parse_weights(&d.weights).map_err(|e| Error::Config(format!("data.weights: {e}")))?;
        Ok(LoaderConfig {
            seq_len: d.seq_len,
            batch_size: self.batch_rows(),
            workers: d.workers,
            seed: d.seed,
            weights,
            val_permille: d.val_permille,
            split,
            streams: split == Split::Train && self.segments.is_some(),
            ranks: self
                .group
                .as_ref()
                .filter(|_| split == Split::Train)
                .map(|g| (g.world.rank, g.world.size)),
            ..LoaderConfig::default()
        })
    }

    /// Mean validation loss per domain (and overall), at most `max_batches` per domain.
    pub fn evaluate(&self, max_batches: usize) -> Result<BTreeMap<String, f64>> {
        let net = self.net.in_precision(&self.vm, self.cfg.run.precision, &self.dev)?;
        let (losses, _tokens) = evaluate_net(
            &net,
            &self.cfg.data.dirs,
            &self.loader_config(Split::Validation)?,
            max_batches,
            &self.dev,
        )?;
        Ok(losses)
    }

    /// The training loop. Stops at `run.steps` / `run.token_budget`, on early stopping, or
    /// when `stop` is raised (SIGINT/SIGTERM), saving a checkpoint in every case.
    pub fn train(&mut self, stop: &AtomicBool, progress: &dyn Fn(&serde_json::Value)) -> Result<Summary> {
        let (mut log, mut loader) = self.open_run(progress)?;
        (self.clock, self.eval_secs) = ((Instant::now(), self.state.elapsed_s), 0.0);
        let (started, mut meter) = (Instant::now(), Throughput::new(&loader));
        let mut pending = Vec::new();
        let mut stopped_early = false;
        while !self.budget_spent() && !self.stopping(stop) {
            let (accum, lr_mult) = self.next_accumulation();
            let batches = next_batches(&mut loader, accum)?;
            let seen = self.state.tokens_seen;
            pending.push(self.step(&batches, lr_mult, stop.load(Ordering::Relaxed))?);
            self.state.cursor = loader.cursor().cloned();
            // Every rank's tokens with data parallelism: the job's throughput.
            meter.count(self.state.tokens_seen - seen);
            let run = &self.cfg.run;
            let (eval_due, ckpt_due) = (self.due(run.eval_every), self.due(run.ckpt_every));
            if self.due(run.log_every.max(1)) || eval_due || ckpt_due {
                self.flush(&mut pending, &mut log, &mut meter, &loader, progress)?;
            }
            self.check_sync()?;
            let improved = self.maybe_evaluate(&mut log, progress)?;
            stopped_early = self.cfg.optim.early_stop_patience > 0
                && self.state.schedule.evals_since_best >= self.cfg.optim.early_stop_patience;
            if improved || ckpt_due || stopped_early {
                self.save_checkpoint(improved)?;
            }
            if stopped_early {
                break;
            }
        }
        self.flush(&mut pending, &mut log, &mut meter, &loader, progress)?;
        self.finish_run(self.stopping(stop), started, stopped_early)
    }

    /// `run.check_sync_every`: the ranks compare a hash of their parameters' bits.
    fn check_sync(&mut self) -> Result<()> {
        if self.group.is_none() || !self.due(self.cfg.run.check_sync_every) {
            return Ok(());
        }
        let mut vars = io::varmap_vars(&self.vm);
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for (_, v) in &vars {
            for x in v.as_tensor().flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                hash = (hash ^ u64::from(x.to_bits())).wrapping_mul(0x0100_0000_01b3);
            }
        }
        let step = self.state.step;
        let group = self.group.as_mut().expect("checked above");
        match group.agree(hash)? {
            true => Ok(()),
            false => Err(Error::Config(format!("the ranks' parameters differ at step {step}"))),
        }
    }

    /// Whether to stop: this process's signal, or with data parallelism any rank's, as the
    /// last step's reduction carried it (so every rank stops after the same step).
    fn stopping(&self, stop: &AtomicBool) -> bool {
        match self.group {
            Some(_) => self.all_stop,
            None => stop.load(Ordering::Relaxed),
        }
    }

    /// With data parallelism: this rank, the world size and the backend.
    pub fn data_parallel(&self) -> Option<(usize, usize, crate::dist::Backend)> {
        self.group.as_ref().map(|g| (g.world.rank, g.world.size, g.backend()))
    }

    /// Rank 0 writes the run's files (metrics, checkpoints, the final model); the other
    /// ranks hold the same weights and state.
    fn writes(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.world.rank == 0)
    }

    /// Data parallelism: the ranks' losses and gradients averaged, their token counts and
    /// micro-batches summed, and whether any rank was asked to stop.
    ///
    /// `parts`: how many micro-batch gradients this process summed (the update divides the
    /// sum by it); the job's total comes back, so that every rank divides by the same
    /// number even when one of them halved its micro-batch after running out of memory.
    fn all_reduce(
        &mut self,
        mut acc: Accumulated,
        tokens: u64,
        parts: u64,
        stop: bool,
    ) -> Result<(Accumulated, u64, u64)> {
        let Some(group) = self.group.as_mut() else {
            return Ok((acc, tokens, parts));
        };
        // What the host knows goes over TCP, so that the device is not waited for.
        let mut counts = [tokens, u64::from(stop), parts, acc.micro_batches as u64];
        group.all_reduce_sum(&mut counts)?;
        self.all_stop = counts[1] > 0;
        // What the device holds stays there: every gradient, the loss, and the
        // micro-batches' sum of squared gradient norms.
        let world = group.world.size as f64;
        let mut tensors: Vec<Tensor> = acc.grads.values().cloned().collect();
        tensors.push(Tensor::cat(
            &[
                acc.loss.to_dtype(DType::F32)?.reshape(1)?,
                acc.micro_sq.to_dtype(DType::F32)?.sum_all()?.reshape(1)?,
            ],
            0,
        )?);
        let mut sums = group.sum(tensors)?;
        let extra = sums.pop().expect("the loss and sum of squares were pushed last");
        // The gradients stay sums: the update's scale divides by every rank's parts (see
        // `step`), which saves a kernel per tensor.
        for (g, sum) in acc.grads.values_mut().zip(sums) {
            *g = sum;
        }
        acc.loss = (extra.get(0)? / world)?;
        acc.micro_sq = extra.narrow(0, 1, 1)?;
        acc.micro_batches = counts[3] as usize;
        Ok((acc, counts[0], counts[2]))
    }

    fn elapsed_s(&self) -> f64 {
        self.clock.1 + self.clock.0.elapsed().as_secs_f64() - self.eval_secs
    }

    /// Rows per loader batch: `data.batch_size`, or what the search chose.
    fn batch_rows(&self) -> usize {
        match (self.cfg.data.batch_size, &self.state.batch_choice) {
            (BatchSize::Rows(n), _) => n,
            (BatchSize::Auto, Some(choice)) => choice.rows,
            (BatchSize::Auto, None) => 1,
        }
    }

    fn checkpointing(&self) -> bool {
        match (self.cfg.data.batch_size, &self.state.batch_choice) {
            (BatchSize::Auto, Some(choice)) => choice.grad_checkpointing,
            _ => self.cfg.run.grad_checkpointing,
        }
    }

    /// `data.batch_size = "auto"`: measure micro-batches on this device (once per run: the
    /// choice is kept in the checkpoint) and log every trial and the choice.
    fn find_micro_batch(&mut self, log: &mut RunLog, progress: &dyn Fn(&serde_json::Value)) -> Result<()> {
        if self.cfg.data.batch_size != BatchSize::Auto || self.state.batch_choice.is_some() {
            return Ok(());
        }
        let memory = match self.cfg.run.memory_limit_mb {
            0 => mmrec_model::device::total_memory(&self.dev),
            mb => mb * 1_000_000,
        };
        let search = crate::batch::Search {
            net: &self.net,
            vm: &self.vm,
            dev: &self.dev,
            precision: self.cfg.run.precision,
            seq_len: self.cfg.data.seq_len,
            memory,
        };
        let mut trials_seen = Vec::new();
        let (choice, trials) = search.run(&mut |t| {
            progress(&serde_json::json!({"step": 0, "batch_trial": t}));
            trials_seen.push(t.clone());
        })?;
        let event = format!(
            "data.batch_size = \"auto\": {} rows{} ({:.0} tokens/s), the fastest of {} trials that fits",
            choice.rows,
            if choice.grad_checkpointing {
                " with gradient checkpointing"
            } else {
                ""
            },
            choice.tokens_per_s,
            trials.len()
        );
        let record = serde_json::json!({"step": self.state.step, "event": event, "batch_search": trials, "batch_choice": choice});
        log.write(&record, progress)?;
        self.state.batch_choice = Some(choice);
        // The trials' blocks stay cached in the GPU's pool; give them back so that the
        // device's free memory means what it says again.
        mmrec_model::device::release_cached_memory(&self.dev)?;
        Ok(())
    }

    /// Batches the next step accumulates, and the learning rate's multiplier for them.
    fn next_accumulation(&mut self) -> (usize, f64) {
        let optim = &self.cfg.optim;
        let plan = crate::batch::Accumulation {
            base: optim.grad_accum,
            batch_tokens: (self.batch_rows() * self.cfg.data.seq_len) as u64,
            max_tokens: optim.max_batch_tokens,
        };
        let noise = crate::batch::noise_scale(&self.state.noise_scale);
        let accum = plan.next(
            &optim.batch_schedule,
            noise,
            self.state.tokens_seen,
            self.state.grad_accum,
        );
        self.state.grad_accum = accum;
        (
            accum,
            crate::batch::lr_multiplier(optim.batch_lr_rule, accum, optim.grad_accum),
        )
    }

    /// Whether the step just taken is a multiple of `every` (0: never).
    fn due(&self, every: u64) -> bool {
        every > 0 && self.state.step % every == 0
    }

    /// Read the pending steps' losses and gradient norms back in one transfer (the only
    /// host–device synchronisation of the loop, once per `log_every` steps or at an
    /// evaluation or checkpoint), complete and write their records, and run the NaN guard
    /// for each step the device skipped.
    fn flush(
        &mut self,
        pending: &mut Vec<PendingStep>,
        log: &mut RunLog,
        meter: &mut Throughput,
        loader: &Loader,
        progress: &dyn Fn(&serde_json::Value),
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let values = Tensor::stack(&pending.iter().map(|p| p.values.clone()).collect::<Vec<_>>(), 0)
            .and_then(|v| v.to_vec2::<f32>())
            .map_err(|source| Error::During {
                during: "reading the losses back",
                source,
            })?;
        let last = pending.len() - 1;
        for (i, (mut p, v)) in pending.drain(..).zip(values).enumerate() {
            let (loss, norm) = (v[PENDING_LOSS] as f64, v[PENDING_CONTROL + CONTROL_NORM] as f64);
            p.record["loss"] = serde_json::json!(loss);
            p.record["ppl"] = serde_json::json!(loss.exp());
            p.record["grad_norm"] = serde_json::json!(norm);
            p.record["elapsed_s"] = serde_json::json!(self.elapsed_s());
            // The micro-batches' mean squared gradient norm against the squared norm of
            // their mean (before clipping): the noise scale, in tokens.
            let small_sq = v[PENDING_MICRO_SQ] as f64 / p.micro_batches as f64;
            let (b_small, n) = (p.micro_tokens as f64, p.micro_batches);
            if let Some(b) = observe_noise_scale(&mut self.state.noise_scale, small_sq, norm * norm, b_small, n) {
                p.record["noise_scale"] = serde_json::json!(b);
            }
            if v[PENDING_CONTROL + CONTROL_SKIP] != 0.0 {
                p.record["event"] = serde_json::json!(self.nan_guard()?);
            }
            if i == last && (p.log_step || p.record.get("event").is_some()) {
                meter.annotate(&mut p.record, loader);
                // The GPU allocator's peak so far (memory against context length, issue 17).
                if let Ok(Some(peak)) = mmrec_model::device::peak_memory(&self.dev) {
                    p.record["gpu_peak_mb"] = serde_json::json!(peak as f64 / 1e6);
                }
            }
            log.write(&p.record, progress)?;
            self.remember(p.record);
        }
        Ok(())
    }

    /// Whether `run.steps` (or `run.token_budget`, when set) is used up.
    fn budget_spent(&self) -> bool {
        let run = &self.cfg.run;
        self.state.step >= run.steps.max(1) || (run.token_budget > 0 && self.state.tokens_seen >= run.token_budget)
    }

    /// Prepare the output directory (stale temporaries removed, metrics cut back to the
    /// checkpoint's step), open the metrics log and the loader at the checkpoint's cursor,
    /// and fit the micro-batch to the memory there is.
    fn open_run(&mut self, progress: &dyn Fn(&serde_json::Value)) -> Result<(RunLog, Loader)> {
        let out = self.cfg.run.out.clone();
        let path = out.join("metrics.jsonl");
        let file = if self.writes() {
            std::fs::create_dir_all(&out).map_err(io_err(&out))?;
            remove_stale_checkpoint_dirs(&out.join(CHECKPOINTS))?;
            truncate_metrics(&path, self.state.step)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            Some(file)
        } else {
            None
        };
        let mut log = RunLog { file, path };
        self.find_micro_batch(&mut log, progress)?;
        let loader = Loader::open(
            &self.cfg.data.dirs,
            self.loader_config(Split::Train)?,
            self.state.cursor.clone(),
        )?;
        if let Some(event) = self.fit_micro_batches() {
            log.write(&serde_json::json!({"step": self.state.step, "event": event}), progress)?;
        }
        Ok((log, loader))
    }

    /// Split each batch into enough micro-batches that one's activations fit the memory
    /// limit (or what the device has free); the event to log when it had to.
    fn fit_micro_batches(&mut self) -> Option<String> {
        // A micro-batch chosen by measurement fitted for real; the estimate is rougher
        // (for `small` at 384 × 512 tokens it says 110 GB where the GPU measured 72).
        if self.state.batch_choice.is_some() {
            return None;
        }
        let (bsz, seq, ckpt) = (self.batch_rows(), self.cfg.data.seq_len, self.checkpointing());
        let limit = match self.cfg.run.memory_limit_mb {
            0 => mmrec_model::device::free_memory(&self.dev),
            mb => mb * 1_000_000,
        };
        let needs = |rows| activation_bytes(self.net.config(), rows, seq, ckpt);
        while bsz / self.state.micro_splits > 1 && needs(bsz.div_ceil(self.state.micro_splits)) > limit {
            self.state.micro_splits *= 2;
        }
        (self.state.micro_splits > 1).then(|| {
            format!(
                "a micro-batch of {bsz} rows needs about {} MB of activations, over the {} MB limit: {} micro-batches of {} rows per batch (same effective batch)",
                needs(bsz) / 1_000_000,
                limit / 1_000_000,
                self.state.micro_splits,
                bsz.div_ceil(self.state.micro_splits)
            )
        })
    }

    /// One optimiser step on `batches`: gradients (halving the micro-batch on an
    /// out-of-memory error), then the clipped AdamW update, which the device skips after a
    /// non-finite loss or gradient. Returns the step's record, to be completed by `flush`.
    fn step(&mut self, batches: &[Batch], lr_mult: f64, stop: bool) -> Result<PendingStep> {
        let (acc, events) = self.gradients_with_retry(batches)?;
        let tokens = batches.iter().flat_map(|b| &b.mask).map(|&m| m as u64).sum::<u64>();
        // Gradients are summed over micro-batches and, with data parallelism, over ranks.
        let parts = (batches.len() * self.state.micro_splits) as u64;
        let (acc, tokens, parts) = self.all_reduce(acc, tokens, parts, stop)?;
        let optim = &self.cfg.optim;
        let world = self.group.as_ref().map_or(1, |g| g.world.size);
        let accum = 1.0 / parts as f64;
        let lr = learning_rate(self.state.step, optim, self.cfg.run.steps, &self.state.schedule) * lr_mult;
        let ctl = self
            .opt
            .update(&acc.grads, &acc.loss, lr, accum, optim.grad_clip)
            .map_err(|source| Error::During {
                during: "the optimiser update",
                source,
            })?;
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        if let Some(carried) = acc.carried {
            self.state.segments = Some(carried.meta.clone());
            self.carried = carried;
        }
        self.state.adam_t = self.opt.t;
        let mut record = serde_json::json!({"step": self.state.step, "lr": lr, "tokens_seen": self.state.tokens_seen});
        if optim.batch_schedule != BatchSchedule::Fixed {
            record["grad_accum"] = serde_json::json!(batches.len());
            record["batch_tokens"] =
                serde_json::json!((batches.len() * self.batch_rows() * self.cfg.data.seq_len * world) as u64);
        }
        if !events.is_empty() {
            record["event"] = serde_json::json!(events.join("; "));
        }
        if let Some(ms) = self.group.as_ref().and_then(Group::comm_ms) {
            record["comm_ms"] = serde_json::json!(ms);
        }
        let values = Tensor::cat(&[acc.loss.reshape(1)?, ctl, acc.micro_sq], 0).map_err(|source| Error::During {
            during: "collecting the step's loss and gradient norm",
            source,
        })?;
        Ok(PendingStep {
            record,
            values,
            log_step: self.due(self.cfg.run.log_every.max(1)),
            micro_batches: acc.micro_batches,
            micro_tokens: acc.micro_tokens,
        })
    }

    fn gradients_with_retry(&mut self, batches: &[Batch]) -> Result<(Accumulated, Vec<String>)> {
        let bsz = self.batch_rows();
        let mut events = Vec::new();
        let mut memory = None;
        loop {
            match self.accumulate(batches, bsz, self.cfg.data.seq_len) {
                Ok(acc) => return Ok((acc, events)),
                // An allocator that reports failure (candle's CUDA backend does) gets a
                // smaller micro-batch; the effective batch and the data stay the same.
                Err(Error::Candle(e)) if is_out_of_memory(&e) && bsz / self.state.micro_splits > 1 => {
                    memory = mmrec_model::device::release_cached_memory(&self.dev).map_err(|source| Error::During {
                        during: "freeing the GPU's cached memory after an out-of-memory error",
                        source,
                    })?;
                    self.state.micro_splits *= 2;
                    events.push(format!(
                        "out of memory: micro-batch halved to {} rows, accumulation doubled{}",
                        bsz.div_ceil(self.state.micro_splits),
                        memory.as_ref().map(|m| format!(" ({m})")).unwrap_or_default()
                    ));
                }
                // Which micro-batch size failed, after how many halvings, and the memory
                // the last retry started from: an error without them does not say whether
                // the fallback ran, nor why it did not help.
                Err(Error::Candle(source)) => {
                    return Err(Error::Gradients {
                        rows: bsz.div_ceil(self.state.micro_splits),
                        halvings: events.len(),
                        memory: memory.map(|m| format!(", starting from {m}")).unwrap_or_default(),
                        source,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After a non-finite loss or gradient (whose update the device skipped): go back to the
    /// last checkpoint, as later steps may have damaged the weights, and halve the learning
    /// rate. Returns the event.
    fn nan_guard(&mut self) -> Result<String> {
        self.state.schedule.nan_mult *= 0.5;
        let restored = self.restore_latest()?;
        Ok(format!(
            "non-finite loss or gradient: step skipped, learning rate halved{}",
            if restored { ", last checkpoint restored" } else { "" }
        ))
    }

    /// Evaluate when `run.eval_every` says so; whether validation improved.
    fn maybe_evaluate(&mut self, log: &mut RunLog, progress: &dyn Fn(&serde_json::Value)) -> Result<bool> {
        if !self.due(self.cfg.run.eval_every) {
            return Ok(false);
        }
        let started = Instant::now();
        let mut val = self.evaluate(self.cfg.run.eval_batches)?;
        self.eval_secs += started.elapsed().as_secs_f64();
        if let Some(group) = self.group.as_mut() {
            // Rank 0's figure for all: the plateau schedule and early stopping decide on
            // it, and ranks that decided differently would train apart.
            let mut bits = val["all"].to_bits().to_le_bytes();
            group.broadcast(&mut bits)?;
            val.insert("all".into(), f64::from_bits(u64::from_le_bytes(bits)));
        }
        let improved = observe_validation(val["all"], &self.cfg.optim, &mut self.state.schedule);
        let rec = serde_json::json!({"step": self.state.step, "val": val, "plateau_mult": self.state.schedule.plateau_mult,
                "tokens_seen": self.state.tokens_seen, "elapsed_s": self.elapsed_s()});
        log.write(&rec, progress)?;
        self.remember(rec);
        Ok(improved)
    }

    /// The last checkpoint, and `final.safetensors` unless a signal stopped the run part-way
    /// (the checkpoint is there to resume from; no `final` may suggest a finished model).
    fn finish_run(&mut self, interrupted: bool, started: Instant, stopped_early: bool) -> Result<Summary> {
        self.save_checkpoint(false)?;
        let final_path = self.cfg.run.out.join("final.safetensors");
        let written = !interrupted && self.writes();
        if written {
            self.export(&final_path)?;
        }
        Ok(Summary {
            steps: self.state.step,
            tokens: self.state.tokens_seen,
            seconds: started.elapsed().as_secs_f64(),
            stopped_early,
            interrupted,
            best_val: self.state.schedule.best_val,
            final_model: written.then_some(final_path),
        })
    }

    /// Mean loss (on the device) and summed gradients over the step's batches, each split
    /// into `micro_splits` row groups (gradients scaled later by the number of micro-batches),
    /// and the sum of the micro-batch gradients' squared norms (for the noise scale).
    fn accumulate(&mut self, batches: &[Batch], bsz: usize, seq: usize) -> Result<Accumulated> {
        let rows = bsz.div_ceil(self.state.micro_splits);
        let n_micro = (batches.len() * bsz.div_ceil(rows)) as f64;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss = Tensor::zeros((), DType::F32, &self.dev)?;
        let mut micro_sq = Tensor::zeros(1, DType::F32, &self.dev)?;
        // The weights change once a step: one set of bf16 casts serves every micro-batch.
        let net = self.net.in_precision(&self.vm, self.cfg.run.precision, &self.dev)?;
        // Segment training: the batches are consecutive segments of the same row streams.
        let mut carried = self.segments.as_ref().map(|_| self.carried.clone());
        for (k, batch) in batches.iter().enumerate() {
            let (inp, tgt, mask) = batch_tensors(batch, (bsz, seq), DType::F32, &self.dev, &mut self.uploader)?;
            let start = match (&self.segments, &carried) {
                (Some(plan), Some(c)) => Some(plan.begin(c, &net, batch, seq, &self.dev)?),
                _ => None,
            };
            let mut after = Vec::new();
            for r0 in (0..bsz).step_by(rows) {
                let n = rows.min(bsz - r0);
                // Dropout masks from (seed, step, micro-batch): a resumed run draws the same.
                let micro =
                    ((self.state.step << 24) ^ ((k as u64) << 12) ^ r0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                mmrec_model::model::set_dropout_seed(self.cfg.model.seed ^ micro);
                let part = match &start {
                    Some(s) => Some((mmrec_model::stream::rows(&s.states, r0, n)?, s.docs.rows(r0, n)?)),
                    None => None,
                };
                let (l, g, states) = loss_and_grads(
                    &net,
                    &self.vm,
                    (&inp.narrow(0, r0, n)?, &tgt.narrow(0, r0, n)?, &mask.narrow(0, r0, n)?),
                    self.checkpointing(),
                    part.as_ref().map(|(s, d)| (s.as_slice(), d)),
                )?;
                after.extend(states);
                loss = (loss + (l.to_dtype(DType::F32)? / n_micro)?)?;
                if n_micro > 1.0 {
                    micro_sq = (micro_sq + self.opt.sum_squares(&g)?)?;
                }
                for (name, t) in g {
                    let sum = match grads.remove(&name) {
                        Some(prev) => (prev + t)?,
                        None => t,
                    };
                    grads.insert(name, sum);
                }
            }
            if let (Some(start), Some(c)) = (start, carried.as_mut()) {
                *c = c.advanced(start, mmrec_model::stream::join_rows(&after)?)?;
            }
        }
        Ok(Accumulated {
            loss,
            grads,
            micro_sq,
            micro_batches: n_micro as usize,
            micro_tokens: rows * seq,
            carried,
        })
    }

    fn remember(&mut self, rec: serde_json::Value) {
        self.state.recent.push(rec);
        let n = self.state.recent.len();
        if n > 20 {
            self.state.recent.drain(..n - 20);
        }
    }

    /// Write the current weights as a model file with the run's role and lineage.
    pub fn export(&self, path: &Path) -> Result<()> {
        let mut meta = self.meta.clone();
        meta.lineage = serde_json::json!({"trained_by": self.state.tool_version, "mode": self.state.mode, "steps": self.state.step, "tokens": self.state.tokens_seen, "from": self.meta.lineage});
        io::save(path, &io::varmap_tensors(&self.vm), &meta)?;
        Ok(())
    }

    /// Directory written under a temporary name and renamed; then `latest` (and `best`)
    /// are repointed atomically and old checkpoints beyond `keep_last` are removed.
    pub fn save_checkpoint(&mut self, best: bool) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let root = self.cfg.run.out.join(CHECKPOINTS);
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let name = format!("step-{:08}", self.state.step);
        let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        self.export(&tmp.join("model.safetensors"))?;
        let mut moments = Vec::with_capacity(2 * self.opt.params.len());
        for p in &self.opt.params {
            moments.push((format!("m.{}", p.name), p.m()?));
            moments.push((format!("v.{}", p.name), p.v()?));
        }
        io::save(
            &tmp.join("optimizer.safetensors"),
            &moments,
            &ModelMeta {
                frozen: vec![],
                lineage: serde_json::Value::Null,
                ..self.meta.clone()
            },
        )?;
        if best {
            self.state.best_checkpoint = Some(name.clone());
        }
        self.state.elapsed_s = self.elapsed_s();
        self.carried.save(&tmp)?;
        write_state(&tmp, &self.state)?;
        let dest = root.join(&name);
        // Re-saving a step (a resumed finished run does): move the old copy aside first and
        // remove it only once the new one is in place, so a kill at any point leaves a
        // complete checkpoint for `read_pointer` to find.
        let old = root.join(format!(".old-{name}-{}", std::process::id()));
        let replaced = std::fs::rename(&dest, &old).is_ok();
        std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        if replaced {
            let _ = std::fs::remove_dir_all(&old);
        }
        write_pointer(&root, "latest", &name)?;
        if best {
            write_pointer(&root, "best", &name)?;
        }
        // Retention: the newest `keep_last`, and the best.
        let mut steps: Vec<String> = std::fs::read_dir(&root)
            .map_err(io_err(&root))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        steps.sort();
        let keep = self.cfg.run.keep_last.max(1);
        let best_name = read_pointer(&root, "best");
        for old in steps.iter().take(steps.len().saturating_sub(keep)) {
            if Some(old) != best_name.as_ref() {
                let _ = std::fs::remove_dir_all(root.join(old));
            }
        }
        Ok(())
    }

    /// Reload weights and moments from the latest checkpoint; false when there is none.
    fn restore_latest(&mut self) -> Result<bool> {
        let root = self.cfg.run.out.join(CHECKPOINTS);
        let Some(name) = read_pointer(&root, "latest") else {
            return Ok(false);
        };
        load_into(&self.vm, &root.join(&name).join("model.safetensors"))?;
        load_moments(
            &mut self.opt,
            &root.join(&name).join("optimizer.safetensors"),
            &self.dev,
        )?;
        // The loader goes on from here: the checkpoint's carried state belongs to another
        // point of the streams, so the next segment starts from a fresh state.
        self.carried.states = None;
        Ok(true)
    }
}

/// `metrics.jsonl`, with every record also handed to the progress callback.
struct RunLog {
    /// None on a data-parallel rank other than 0.
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl RunLog {
    fn write(&mut self, record: &serde_json::Value, progress: &dyn Fn(&serde_json::Value)) -> Result<()> {
        if let Some(file) = &mut self.file {
            writeln!(file, "{record}").map_err(io_err(&self.path))?;
        }
        progress(record);
        Ok(())
    }
}

/// A step whose loss and gradient norm are still on the device; `flush` completes its
/// record.
struct PendingStep {
    record: serde_json::Value,
    /// [5] f32: the loss, the optimiser's control values (scale, skip, norm), and the sum
    /// of the micro-batch gradients' squared norms.
    values: Tensor,
    log_step: bool,
    micro_batches: usize,
    micro_tokens: usize,
}

/// One step's loss and gradients, summed over its micro-batches on the device.
struct Accumulated {
    loss: Tensor,
    grads: BTreeMap<String, Tensor>,
    /// Σ over micro-batches of their gradient's squared norm (zero with one micro-batch).
    micro_sq: Tensor,
    micro_batches: usize,
    /// Token positions per micro-batch.
    micro_tokens: usize,
    /// Segment training: the state after the step's last segment.
    carried: Option<Carried>,
}

/// Where a pending step's values sit: the loss, the optimiser's 3 control values, the
/// micro-batches' summed squared gradient norms.
const PENDING_LOSS: usize = 0;
const PENDING_CONTROL: usize = 1;
const PENDING_MICRO_SQ: usize = 4;

/// Throughput over the steps since the last logged one: tokens/s, the share of that time
/// spent waiting for data, and resident memory.
struct Throughput {
    since: Instant,
    tokens: u64,
    waited: std::time::Duration,
}

impl Throughput {
    fn new(loader: &Loader) -> Self {
        Throughput {
            since: Instant::now(),
            tokens: 0,
            waited: loader.waited(),
        }
    }

    fn count(&mut self, tokens: u64) {
        self.tokens += tokens;
    }

    fn annotate(&mut self, record: &mut serde_json::Value, loader: &Loader) {
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let waited = (loader.waited() - self.waited).as_secs_f64();
        record["tokens_per_s"] = serde_json::json!(self.tokens as f64 / secs);
        record["data_wait_pct"] = serde_json::json!(100.0 * waited / secs);
        record["rss_mb"] = serde_json::json!(mmrec_model::host::rss_bytes().unwrap_or(0) as f64 / 1e6);
        *self = Throughput::new(loader);
    }
}

/// The `n` batches of one optimiser step (gradient accumulation).
fn next_batches(loader: &mut Loader, n: usize) -> Result<Vec<Batch>> {
    (0..n)
        .map(|_| {
            loader
                .next_batch()
                .ok_or_else(|| Error::Config("the training loader ended".into()))?
                .map_err(Error::from)
        })
        .collect()
}

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub stopped_early: bool,
    pub interrupted: bool,
    pub best_val: Option<f64>,
    /// None when interrupted, or on a data-parallel rank other than 0 (rank 0 writes it).
    pub final_model: Option<PathBuf>,
}

/// Mean loss per domain and overall (`all`, token-weighted) on the held-out split, and the
/// number of tokens scored: each domain gets its own loader, so a batch cap never starves
/// a domain.
pub fn evaluate_net(
    net: &Net,
    dirs: &[PathBuf],
    base: &LoaderConfig,
    max_batches: usize,
    dev: &Device,
) -> Result<(BTreeMap<String, f64>, u64)> {
    let mut out = BTreeMap::new();
    let (mut all_s, mut all_c) = (0.0, 0.0);
    let mut uploader = Uploader::default();
    for d in base.weights.keys() {
        let cfg = LoaderConfig {
            split: Split::Validation,
            weights: [(*d, 1.0)].into_iter().collect(),
            ..base.clone()
        };
        let mut loader = Loader::open(dirs, cfg, None)?;
        let (mut s, mut c, mut n) = (0.0, 0.0, 0);
        while let Some(batch) = loader.next_batch() {
            let (inp, tgt, mask) =
                batch_tensors(&batch?, (base.batch_size, base.seq_len), DType::F32, dev, &mut uploader)?;
            let (logits, _) = net.logits(&inp, false)?;
            let (rs, rc) = row_losses(&logits, &tgt, &mask)?;
            s += rs.iter().sum::<f64>();
            c += rc.iter().sum::<f64>();
            n += 1;
            if max_batches > 0 && n >= max_batches {
                break;
            }
        }
        if c > 0.0 {
            out.insert(d.to_string(), s / c);
            all_s += s;
            all_c += c;
        }
    }
    out.insert("all".into(), if all_c > 0.0 { all_s / all_c } else { f64::NAN });
    Ok((out, all_c as u64))
}

/// Entropy (nats) of the unigram distribution of the held-out targets, per domain and
/// overall: the loss a model that ignored context entirely could reach at best, if it knew
/// the held-out token frequencies themselves.
pub fn unigram_entropy(dirs: &[PathBuf], base: &LoaderConfig, max_batches: usize) -> Result<BTreeMap<String, f64>> {
    let entropy = |counts: &std::collections::HashMap<u32, u64>| {
        let n: u64 = counts.values().sum();
        counts
            .values()
            .map(|&c| c as f64 / n as f64)
            .map(|p| -p * p.ln())
            .sum::<f64>()
    };
    let mut out = BTreeMap::new();
    let mut all: std::collections::HashMap<u32, u64> = Default::default();
    for d in base.weights.keys() {
        let cfg = LoaderConfig {
            split: Split::Validation,
            weights: [(*d, 1.0)].into_iter().collect(),
            ..base.clone()
        };
        let mut loader = Loader::open(dirs, cfg, None)?;
        let mut counts: std::collections::HashMap<u32, u64> = Default::default();
        let mut n = 0;
        while let Some(batch) = loader.next_batch() {
            let batch = batch?;
            let row = base.seq_len + 1;
            for (i, (&t, &m)) in batch.tokens.iter().zip(&batch.mask).enumerate() {
                // Targets only: positions 1..=T of each row, as the loss counts them.
                if m == 1 && i % row != 0 {
                    *counts.entry(t).or_default() += 1;
                    *all.entry(t).or_default() += 1;
                }
            }
            n += 1;
            if max_batches > 0 && n >= max_batches {
                break;
            }
        }
        if !counts.is_empty() {
            out.insert(d.to_string(), entropy(&counts));
        }
    }
    out.insert("all".into(), entropy(&all));
    Ok(out)
}

/// The shards' tokenizer: (sha256, vocabulary size), which every directory must share.
pub fn data_tokenizer(dirs: &[PathBuf]) -> Result<(String, usize)> {
    let first = dirs
        .first()
        .ok_or_else(|| Error::Config("data.dirs is empty: give shard directories (--data DIR)".into()))?;
    let t = mmrec_schemas::read_manifest(first)?.tokenizer;
    for d in &dirs[1..] {
        let other = mmrec_schemas::read_manifest(d)?.tokenizer;
        if other.sha256 != t.sha256 {
            return Err(Error::Config(format!(
                "{} and {} were made with different tokenizers ({} and {})",
                first.display(),
                d.display(),
                t.sha256,
                other.sha256
            )));
        }
    }
    Ok((t.sha256, t.vocab_size))
}

/// Refuse to train or evaluate a model on shards of another tokenizer: a different
/// vocabulary size always (the ids would not fit, or mean nothing), a different tokenizer
/// of the same size unless `allow_mismatch` (a model file that predates the recorded
/// tokenizer is checked by size alone).
pub fn check_tokenizer(meta: &ModelMeta, model: &Path, dirs: &[PathBuf], allow_mismatch: bool) -> Result<()> {
    let (sha, vocab) = data_tokenizer(dirs)?;
    if meta.config.vocab_size != vocab {
        return Err(Error::Config(format!(
            "{} has a vocabulary of {} but the shards' tokenizer has {vocab}",
            model.display(),
            meta.config.vocab_size
        )));
    }
    match &meta.tokenizer {
        Some(t) if *t != sha && !allow_mismatch => Err(Error::Config(format!(
            "{} was trained with tokenizer {t}, the shards were made with {sha}: the same ids would mean other text (--allow-tokenizer-mismatch to go on anyway)",
            model.display()
        ))),
        _ => Ok(()),
    }
}

/// Load a safetensors file into existing variables, naming any missing or misshapen tensor.
pub fn load_into(vm: &VarMap, path: &Path) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let data = vm.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::Config(format!("{}: tensor `{name}` is missing", path.display())))?;
        if t.dims() != var.dims() {
            return Err(Error::Config(format!(
                "{}: tensor `{name}` is {:?}, the model expects {:?}",
                path.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

fn load_moments(opt: &mut AdamW, path: &Path, dev: &Device) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, dev)?;
    for p in &mut opt.params {
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .ok_or_else(|| Error::Config(format!("{}: `{k}` is missing", path.display())))
        };
        p.set_moments(&get(format!("m.{}", p.name))?, &get(format!("v.{}", p.name))?)?;
    }
    Ok(())
}

/// Half-written (`.tmp-step-*`) and superseded (`.old-step-*`) checkpoint directories left
/// by killed runs.
fn remove_stale_checkpoint_dirs(root: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-step-") || name.starts_with(".old-step-") {
            std::fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
        }
    }
    Ok(())
}

/// Drop the records of steps after `step` (the checkpoint a run resumes from): a resumed
/// run logs them again, and each step should appear once.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let keep: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|r| r.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if keep.len() != text.len() {
        mmrec_schemas::atomic::write_atomic(path, keep.as_bytes())?;
    }
    Ok(())
}

pub(crate) fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let m = e.to_string().to_ascii_lowercase();
    m.contains("out of memory") || m.contains("out_of_memory")
}

/// Rough bytes of activations a micro-batch keeps for the backward pass (f32): per block
/// about 40 D-wide tensors per token (norms, the 4D projection and its parts, the MDI gates,
/// the scan, memory attention, the FFN's 4D up-projection and GELU), plus the logits and
/// their log-softmax temporaries (about 4 V per token). With checkpointing, one block's
/// worth plus each block's input.
pub fn activation_bytes(cfg: &ModelConfig, rows: usize, seq: usize, checkpointing: bool) -> u64 {
    let (d, v, l) = (cfg.d_model as u64, cfg.vocab_size as u64, cfg.n_layers as u64);
    let per_token = if checkpointing { (l + 40) * d } else { l * 40 * d } + 4 * v;
    4 * (rows * seq) as u64 * per_token
}

/// Model files for `eval`: any role.
pub fn load_net(path: &Path, dev: &Device) -> Result<Net> {
    let meta = mmrec_schemas::safetensors::read_meta(path)?;
    Ok(match meta.role {
        Role::Fused => Net::Fused(io::load_fused(path, dev)?.0),
        _ => Net::Single(io::load_model(path, dev)?.0),
    })
}
