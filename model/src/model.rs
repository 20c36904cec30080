//! MM-Rec in scan form (DESIGN.md §1): blocks, the language model, and the fused model.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use mmrec_model::{preset, MMRecModel};
//! let cfg = preset("tiny", 256).unwrap();
//! let vm = VarMap::new();
//! let model = MMRecModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
//! let tokens = Tensor::zeros((2, 10), DType::U32, &Device::Cpu)?;
//! let (logits, _state, _aux) = model.forward(&tokens, None, false)?;
//! assert_eq!(logits.dims(), [2, 10, 256]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder};

use mmrec_schemas::rng::{splitmix, SplitMix};
use mmrec_schemas::{FusionMethod, ModelConfig};

use crate::stream::DocBounds;

/// `RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + 1e-6)`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    pub fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get_with_hints(d, "weight", Init::Const(1.0))?,
        })
    }
}

impl Module for RmsNorm {
    /// One fused op each way, statistics in at least f32 (DESIGN §6).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        mmrec_kernels::fused::rms_norm(x, &self.weight)
    }
}

/// 16-bit activations as f32 for the parts DESIGN §6 keeps in f32 (γ, the scan, norms,
/// softmax, loss); f32 and f64 unchanged.
pub fn widen(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(wide_dtype(x.dtype()))
}

pub fn wide_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// A linear layer applied as one 2-D matmul over all leading dimensions, then the fused
/// bias add. candle's `Linear` multiplies a [B, T, D] input by a weight broadcast per batch
/// row, and its backward then materialises B weight-sized gradients and sums them.
#[derive(Clone, Debug)]
pub struct Dense(pub Linear);

pub fn dense(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Dense> {
    candle_nn::linear(d_in, d_out, vb).map(Dense)
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (rows, d_in) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
        let x = x.reshape((rows, d_in))?;
        let y = x.matmul(&self.0.weight().t()?)?;
        let y = match self.0.bias() {
            Some(b) => mmrec_kernels::fused::bias_add(&y, b)?,
            None => y,
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("a tensor with dimensions") = y.dim(1)?;
        y.reshape(out)
    }
}

/// `Lin(a→b) → GELU → Lin(b→c)`.
#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Dense,
    fc2: Dense,
}

impl Mlp {
    fn new(d_in: usize, d_hidden: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            fc1: dense(d_in, d_hidden, vb.pp("fc1"))?,
            fc2: dense(d_hidden, d_out, vb.pp("fc2"))?,
        })
    }

    /// An MDI gate MLP: small last weights so that, at initialisation, the gate is set by
    /// its last bias (see [`initialise`]) rather than by noise.
    fn gate(d: usize, last_bias: Init, vb: VarBuilder) -> Result<Self> {
        let fc2 = vb.pp("fc2");
        Ok(Mlp {
            fc1: dense(d, d / 4, vb.pp("fc1"))?,
            fc2: Dense(Linear::new(
                fc2.get_with_hints((d, d / 4), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?,
                Some(fc2.get_with_hints(d, "bias", last_bias)?),
            )),
        })
    }
}

/// The per-channel initial values DESIGN §1 asks for, which `Init` cannot express: every
/// block's `mdi.z.fc2.bias`, and a concat fusion's `[½I, ½I]`. Call once on a new VarMap.
pub fn initialise(varmap: &candle_nn::VarMap, cfg: &ModelConfig) -> Result<()> {
    let d = cfg.d_model;
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        if name.ends_with("mdi.z.fc2.bias") {
            // 1−γ log-spaced from 0.1 to 0.001 across channels: time scales from ~10 to
            // ~1000 tokens (HGRN/Mamba-style). The k factor σ(6) ≈ 0.9975 caps the top.
            let bias: Vec<f32> = (0..d)
                .map(|c| {
                    let frac = if d > 1 { c as f32 / (d - 1) as f32 } else { 0.0 };
                    let p = 1.0 - 0.1 * 0.01f32.powf(frac);
                    (p / (1.0 - p)).ln()
                })
                .collect();
            var.set(&Tensor::from_vec(bias, d, var.device())?.to_dtype(var.dtype())?)?;
        } else if name == "fusion.proj.weight" {
            let init = mmrec_schemas::model_file::concat_fusion_init(d);
            var.set(&Tensor::from_vec(init, (d, 2 * d), var.device())?.to_dtype(var.dtype())?)?;
        }
    }
    Ok(())
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&mmrec_kernels::fused::gelu(&self.fc1.forward(x)?)?)
    }
}

/// Per-block streaming state: the scan state, and per summary level the most recent
/// summaries plus the running sum of the unfinished chunk.
#[derive(Clone, Debug)]
pub struct BlockState {
    /// Absolute position of the next token.
    pub pos: usize,
    pub h: Tensor,
    pub levels: Vec<LevelState>,
}

#[derive(Clone, Debug)]
pub struct LevelState {
    /// Chunk index of the first kept summary.
    pub first: usize,
    /// [B, n, D], n ≤ memory_window.
    pub summaries: Tensor,
    /// Sum of h over the current chunk's positions seen so far, [B, D].
    pub partial: Tensor,
}

/// The MDI gates (DESIGN §2): `γ = clamp(σ(MLP_z(z)) σ(MLP_k(k)))` and the gated input
/// `u = (1 − γ) σ(g) z`.
#[derive(Clone, Debug)]
pub struct Mdi {
    z: Mlp,
    k: Mlp,
}

impl Mdi {
    fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Mdi {
            z: Mlp::gate(d, Init::Const(0.0), vb.pp("z"))?,
            // +6: the k factor starts near 1, leaving the decay to the z factor.
            k: Mlp::gate(d, Init::Const(6.0), vb.pp("k"))?,
        })
    }

    /// (γ, u) stacked as [2, B, T, D] from the `[q, k, z, g]` projection, as one fused op,
    /// in f32 when activations are bf16: there every γ above about 0.998 would round to 1
    /// (DESIGN §6).
    fn forward(&self, z: &Tensor, k: &Tensor, qkzg: &Tensor) -> Result<Tensor> {
        mmrec_kernels::fused::mdi_gate_stacked(&self.z.forward(z)?, &self.k.forward(k)?, qkzg)
    }
}

/// HDS memory attention (DESIGN §2): persistent slots plus chunk summaries of the scan
/// state, read by multi-head attention.
#[derive(Clone, Debug)]
pub struct Memory {
    slots: Tensor,
    kv: Dense,
    out: Dense,
    cfg: ModelConfig,
}

/// `FFN(x) = W_down GELU(W_up x)`.
#[derive(Clone, Debug)]
pub struct Ffn {
    up: Dense,
    down: Dense,
}

impl Ffn {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Ffn {
            up: dense(cfg.d_model, cfg.ffn_dim(), vb.pp("up"))?,
            down: dense(cfg.ffn_dim(), cfg.d_model, vb.pp("down"))?,
        })
    }

    /// With dropout on the hidden activations and the output (sites 1 and 2 of the block).
    fn forward(&self, x: &Tensor, p: f32, train: bool, key: u64) -> Result<Tensor> {
        let f = dropout(&mmrec_kernels::fused::gelu(&self.up.forward(x)?)?, p, train, (key, 1))?;
        dropout(&self.down.forward(&f)?, p, train, (key, 2))
    }
}

/// One MM-Rec block: `r = x + W_o(h + Memory(q, h))` over the gated scan `h`, then
/// `y = r + FFN(RMSNorm(r))`.
#[derive(Clone, Debug)]
pub struct MMRecBlock {
    norm1: RmsNorm,
    in_proj: Dense,
    mdi: Mdi,
    memory: Memory,
    out_proj: Dense,
    norm2: RmsNorm,
    ffn: Ffn,
    uboo: Option<Mlp>,
    cfg: ModelConfig,
    /// A hash of the block's name (`blocks.3`, `experts.code.blocks.3`): its dropout masks'
    /// own stream.
    key: u64,
}

/// Which projection path computes `[q, k, z, g]`: the same weights either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    /// One D→4D matmul (the default, and the fast one).
    Fused,
    /// Four D→D matmuls: only for the fused-vs-unfused benchmark.
    Unfused,
}

impl MMRecBlock {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(MMRecBlock {
            norm1: RmsNorm::new(d, vb.pp("norm1"))?,
            in_proj: dense(d, 4 * d, vb.pp("in_proj"))?,
            mdi: Mdi::new(d, vb.pp("mdi"))?,
            memory: Memory::new(cfg, vb.pp("memory"))?,
            out_proj: dense(d, d, vb.pp("out_proj"))?,
            norm2: RmsNorm::new(d, vb.pp("norm2"))?,
            ffn: Ffn::new(cfg, vb.pp("ffn"))?,
            uboo: if cfg.uboo_weight > 0.0 {
                Some(Mlp::new(d, d, d, vb.pp("uboo"))?)
            } else {
                None
            },
            cfg: cfg.clone(),
            key: name_hash(&vb.prefix()),
        })
    }

    pub fn initial_state(&self, b: usize, dtype: DType, dev: &Device) -> Result<BlockState> {
        let d = self.cfg.d_model;
        let levels = self
            .cfg
            .chunk_sizes
            .iter()
            .map(|_| {
                Ok(LevelState {
                    first: 0,
                    summaries: Tensor::zeros((b, 0, d), dtype, dev)?,
                    partial: Tensor::zeros((b, d), dtype, dev)?,
                })
            })
            .collect::<Result<_>>()?;
        // The scan's carried state is at least f32 (DESIGN §6).
        Ok(BlockState {
            pos: 0,
            h: Tensor::zeros((b, d), wide_dtype(dtype), dev)?,
            levels,
        })
    }

    fn project(&self, x: &Tensor, how: Projection) -> Result<Tensor> {
        match how {
            Projection::Fused => self.in_proj.forward(x),
            Projection::Unfused => {
                let d = self.cfg.d_model;
                let (w, b) = (
                    self.in_proj.0.weight(),
                    self.in_proj.0.bias().expect("in_proj has a bias"),
                );
                let parts = (0..4)
                    .map(|i| Dense(Linear::new(w.narrow(0, i * d, d)?, Some(b.narrow(0, i * d, d)?))).forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, D::Minus1)
            }
        }
    }

    /// y = Block(x) for x [B, T, D]; returns the output, the state after the segment, and
    /// the UBÖO loss of this block (zero when disabled). With `docs`, the rows are streams
    /// of documents: the state resets where one begins.
    pub fn forward(
        &self,
        x: &Tensor,
        state: &BlockState,
        train: bool,
        how: Projection,
        docs: Option<&DocBounds>,
    ) -> Result<(Tensor, BlockState, Tensor)> {
        let (b, t, d) = x.dims3()?;
        let xn = self.norm1.forward(x)?;
        let qkzg = self.project(&xn, how)?;
        // q split into heads as a view of the projection, [B, T, H, D/H]; k and z feed
        // matmuls, which on CUDA need rows laid out contiguously.
        let n_heads = self.cfg.n_heads;
        let (q, k, z) = (
            qkzg.reshape((b, t, 4, n_heads, d / n_heads))?.i((.., .., 0))?,
            qkzg.narrow(2, d, d)?.contiguous()?,
            qkzg.narrow(2, 2 * d, d)?.contiguous()?,
        );
        let mut gamma_u = self.mdi.forward(&z, &k, &qkzg)?;
        if let Some(docs) = docs {
            // γ = 0 where a document begins: h_t = u_t, nothing of the one before.
            let gamma = gamma_u.get(0)?.broadcast_mul(&docs.keep.to_dtype(gamma_u.dtype())?)?;
            gamma_u = Tensor::stack(&[gamma, gamma_u.get(1)?], 0)?;
        }
        // The scan runs in f32 (DESIGN §6); its output goes back to the activations' dtype.
        let (h, h_last) = mmrec_kernels::scan_stacked(&gamma_u, &state.h)?;
        let h = h.to_dtype(x.dtype())?;
        let (c, levels) = self.memory.forward(&q, &h, state, docs)?;
        let p = self.cfg.dropout;
        let r = (x + dropout(&self.out_proj.forward(&(&h + c)?)?, p, train, (self.key, 0))?)?;
        let y = (&r + self.ffn.forward(&self.norm2.forward(&r)?, p, train, self.key)?)?;
        let aux = self.uboo_loss(&h)?;
        Ok((
            y,
            BlockState {
                pos: state.pos + t,
                h: h_last,
                levels,
            },
            aux,
        ))
    }

    /// `mean ‖P(h_t) − sg(h_{t+1})‖²` over positions with a successor in this segment.
    fn uboo_loss(&self, h: &Tensor) -> Result<Tensor> {
        let t = h.dim(1)?;
        match &self.uboo {
            Some(p) if t > 1 => {
                let pred = p.forward(&h.narrow(1, 0, t - 1)?)?;
                (pred - h.narrow(1, 1, t - 1)?.detach())?
                    .sqr()?
                    .sum(D::Minus1)?
                    .mean_all()
            }
            _ => Tensor::zeros((), h.dtype(), h.device()),
        }
    }
}

impl Memory {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Memory {
            slots: vb.get_with_hints((cfg.n_slots, d), "slots", Init::Randn { mean: 0.0, stdev: 0.02 })?,
            kv: dense(d, 2 * d, vb.pp("kv"))?,
            out: dense(d, d, vb.pp("out"))?,
            cfg: cfg.clone(),
        })
    }

    /// HDS memory attention: each position reads the persistent slots and, per level, the
    /// summaries of chunks that ended before its own chunk started (at most
    /// `memory_window` of them), so it never sees its own chunk or the future. `q` comes
    /// split into heads, [B, T, H, D/H].
    fn forward(
        &self,
        q: &Tensor,
        h: &Tensor,
        state: &BlockState,
        docs: Option<&DocBounds>,
    ) -> Result<(Tensor, Vec<LevelState>)> {
        let (b, t, d) = h.dims3()?;
        let n_heads = self.cfg.n_heads;
        let dh = d / n_heads;
        let p0 = state.pos;
        let window = self.cfg.memory_window;
        let mut entries = vec![self
            .slots
            .unsqueeze(0)?
            .broadcast_as((b, self.cfg.n_slots, d))?
            .to_dtype(h.dtype())?];
        // Visibility mask [T, E]: slots first, then each level's summaries in chunk order.
        let mut visible: Vec<Vec<bool>> = vec![vec![true; self.cfg.n_slots]; t];
        let mut new_levels = Vec::with_capacity(self.cfg.chunk_sizes.len());
        // Where each entry's chunk began (slots: always visible), against document starts.
        let mut chunk_start = vec![f32::MAX; self.cfg.n_slots];
        // Sum of h over absolute positions [from, to) that lie in this segment.
        let seg_sum = |from: usize, to: usize| h.narrow(1, from - p0, to - from)?.sum(1);
        for (lvl, &cs) in self.cfg.chunk_sizes.iter().enumerate() {
            let old = &state.levels[lvl];
            // Chunks that end inside this segment; one that began in an earlier segment
            // adds that segment's running sum.
            let mut all = vec![old.summaries.clone()];
            let mut start = (p0 / cs) * cs;
            if start < p0 && start + cs <= p0 + t {
                all.push(((seg_sum(p0, start + cs)? + &old.partial)? / cs as f64)?.unsqueeze(1)?);
                start += cs;
            }
            // Every chunk lying wholly in this segment in one reshape and one mean: a
            // narrow per chunk cost a full-size gradient buffer per chunk in backward.
            let whole = if start >= p0 { (p0 + t - start) / cs } else { 0 };
            if whole > 0 {
                all.push(
                    h.narrow(1, start - p0, whole * cs)?
                        .reshape((b, whole, cs, d))?
                        .mean(2)?,
                );
                start += whole * cs;
            }
            let all = Tensor::cat(&all, 1)?;
            let n_all = all.dim(1)?;
            for (ti, row) in visible.iter_mut().enumerate() {
                let own = (p0 + ti) / cs;
                row.extend((old.first..old.first + n_all).map(|idx| idx < own && idx + window >= own));
            }
            chunk_start.extend((old.first..old.first + n_all).map(|idx| (idx * cs) as f32));
            entries.push(all.clone());
            // Keep the newest `window` summaries and the unfinished chunk's running sum
            // (`start` is now the first position of the unfinished chunk).
            let end = p0 + t;
            let partial = if start >= end {
                Tensor::zeros((b, d), h.dtype(), h.device())?
            } else if start >= p0 {
                seg_sum(start, end)?
            } else {
                (&old.partial + seg_sum(p0, end)?)?
            };
            let keep_from = n_all.saturating_sub(window);
            new_levels.push(LevelState {
                first: old.first + keep_from,
                summaries: all.narrow(1, keep_from, n_all - keep_from)?,
                partial,
            });
        }
        let mem = Tensor::cat(&entries, 1)?; // [B, E, D]
        let n_e = mem.dim(1)?;
        let kv = self.kv.forward(&mem)?;
        let heads = |x: &Tensor, n: usize| x.reshape((b, n, n_heads, dh))?.transpose(1, 2)?.contiguous();
        let (k, v) = (heads(&kv.narrow(2, 0, d)?, n_e)?, heads(&kv.narrow(2, d, d)?, n_e)?);
        let qh = q.transpose(1, 2)?.contiguous()?;
        let mask = visibility_mask(visible.into_iter().flatten().collect(), (t, n_e), h.dtype(), h.device())?;
        let mut scores = (qh.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?.broadcast_add(&mask)?;
        if let Some(docs) = docs {
            scores = scores.broadcast_add(&docs.attention_mask(&chunk_start, h.dtype())?)?;
        }
        // One fused pass each way, statistics in f32 whatever the dtype (DESIGN §6).
        let attn = mmrec_kernels::fused::softmax_last_dim(&scores)?;
        let ctx = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        Ok((self.out.forward(&ctx)?, new_levels))
    }
}

/// The additive attention mask (0 visible, −∞ hidden) for a visibility pattern, cached per
/// device: a host-to-device copy from pageable memory waits for the GPU's queue to drain,
/// and every block of every step asks for the same few patterns.
fn visibility_mask(visible: Vec<bool>, shape: (usize, usize), dtype: DType, dev: &Device) -> Result<Tensor> {
    type Key = (String, DType, (usize, usize), Vec<bool>);
    static CACHE: std::sync::Mutex<Vec<(Key, Tensor)>> = std::sync::Mutex::new(Vec::new());
    let device = match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(c) => format!("{:?}", c.id()),
        other => format!("{:?}", other.location()),
    };
    let key = (device, dtype, shape, visible);
    let mut cache = CACHE.lock().expect("mask cache lock");
    if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(t.clone());
    }
    let values: Vec<f32> = key.3.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect();
    let mask = Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?;
    if cache.len() >= 64 {
        cache.remove(0);
    }
    cache.push((key, mask.clone()));
    Ok(mask)
}

thread_local! {
    /// The seed dropout masks of the current step are drawn from (see [`set_dropout_seed`]).
    static DROPOUT_SEED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Seed the dropout masks of the forward passes that follow on this thread. The trainer
/// sets it from (model seed, step, micro-batch) before each step, so masks repeat exactly
/// on a resumed run, and a recomputed block (gradient checkpointing) draws the same ones.
pub fn set_dropout_seed(seed: u64) {
    DROPOUT_SEED.with(|s| s.set(seed));
}

/// Inverted dropout with a mask that is a function of (step seed, block, site, element):
/// candle's dropout draws from an unseeded generator, so runs could not repeat.
fn dropout(x: &Tensor, p: f32, train: bool, key: (u64, u64)) -> Result<Tensor> {
    if !(train && p > 0.0) {
        return Ok(x.clone());
    }
    let seed = DROPOUT_SEED.with(|s| s.get()) ^ key.0.rotate_left(17) ^ key.1.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let threshold = (p as f64 * (1u64 << 53) as f64) as u64;
    let keep = 1.0 / (1.0 - p);
    // Drawn on the host: exact and device-independent; only runs with dropout pay for it.
    let mask: Vec<f32> = (0..x.elem_count() as u64)
        .map(|i| {
            if splitmix(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 11 < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// A stack of blocks with its final norm: the part experts own.
#[derive(Clone, Debug)]
pub struct BlockStack {
    pub blocks: Vec<MMRecBlock>,
    pub norm: RmsNorm,
}

impl BlockStack {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..cfg.n_layers)
            .map(|i| MMRecBlock::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<_>>()?;
        Ok(BlockStack {
            blocks,
            norm: RmsNorm::new(cfg.d_model, vb.pp("norm"))?,
        })
    }

    pub fn initial_state(&self, b: usize, dtype: DType, dev: &Device) -> Result<Vec<BlockState>> {
        self.blocks.iter().map(|blk| blk.initial_state(b, dtype, dev)).collect()
    }

    /// Normalised hidden states, the new per-layer states, and the summed UBÖO loss.
    pub fn forward(
        &self,
        x: &Tensor,
        state: &[BlockState],
        train: bool,
        how: Projection,
        docs: Option<&DocBounds>,
    ) -> Result<(Tensor, Vec<BlockState>, Tensor)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.blocks.len());
        let mut aux = Tensor::zeros((), x.dtype(), x.device())?;
        for (blk, s) in self.blocks.iter().zip(state) {
            let (y, s2, a) = blk.forward(&x, s, train, how, docs)?;
            x = y;
            aux = (aux + a)?;
            states.push(s2);
        }
        Ok((self.norm.forward(&x)?, states, aux))
    }
}

/// Token embedding → L blocks → RMSNorm → logits `y Eᵀ` (tied head).
#[derive(Clone, Debug)]
pub struct MMRecModel {
    pub embed: Embedding,
    pub stack: BlockStack,
    pub cfg: ModelConfig,
}

impl MMRecModel {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        Ok(MMRecModel {
            embed: tied_embedding(cfg, vb.pp("embed"))?,
            stack: BlockStack::new(cfg, vb.clone())?,
            cfg: cfg.clone(),
        })
    }

    pub fn initial_state(&self, b: usize, dev: &Device) -> Result<Vec<BlockState>> {
        self.stack.initial_state(b, self.embed.embeddings().dtype(), dev)
    }

    /// Logits [B, T, V] for tokens [B, T], the state after them, and the UBÖO loss
    /// (already weighted, in at least f32). `state` None starts a sequence.
    pub fn forward(
        &self,
        tokens: &Tensor,
        state: Option<&[BlockState]>,
        train: bool,
    ) -> Result<(Tensor, Vec<BlockState>, Tensor)> {
        self.forward_with(tokens, state, train, Projection::Fused, None)
    }

    /// [`MMRecModel::forward`] with the projection path chosen and, for streams of
    /// documents, where documents begin.
    pub fn forward_with(
        &self,
        tokens: &Tensor,
        state: Option<&[BlockState]>,
        train: bool,
        how: Projection,
        docs: Option<&DocBounds>,
    ) -> Result<(Tensor, Vec<BlockState>, Tensor)> {
        let b = tokens.dim(0)?;
        let fresh;
        let state = match state {
            Some(s) => s,
            None => {
                fresh = self.initial_state(b, tokens.device())?;
                &fresh
            }
        };
        let x = mmrec_kernels::fused::embedding(self.embed.embeddings(), tokens)?;
        let (y, states, aux) = self.stack.forward(&x, state, train, how, docs)?;
        Ok((
            tied_logits(&y, self.embed.embeddings())?,
            states,
            (widen(&aux)? * self.cfg.uboo_weight)?,
        ))
    }
}

/// N(0, 0.02) as in GPT-2: the embedding is also the output head, and candle's default
/// N(0, 1) would start the logits at a scale of √D (a loss far above ln V).
fn tied_embedding(cfg: &ModelConfig, vb: VarBuilder) -> Result<Embedding> {
    Ok(Embedding::new(
        vb.get_with_hints(
            (cfg.vocab_size, cfg.d_model),
            "weight",
            Init::Randn { mean: 0.0, stdev: 0.02 },
        )?,
        cfg.d_model,
    ))
}

/// `y Eᵀ` as one 2-D matmul: candle's batched matmul would broadcast E per batch row.
pub fn tied_logits(y: &Tensor, embed: &Tensor) -> Result<Tensor> {
    let (b, t, d) = y.dims3()?;
    y.reshape((b * t, d))?.matmul(&embed.t()?)?.reshape((b, t, ()))
}

/// Per-position negative log-likelihood [B, T] of logits [B, T, V] against targets
/// [B, T], zero where `mask` [B, T] is 0 (padding targets).
pub fn token_nll(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    mmrec_kernels::loss::cross_entropy_rows(
        &logits.reshape((b * t, v))?,
        &targets.reshape(b * t)?,
        &mask.reshape(b * t)?,
    )?
    .reshape((b, t))
}

/// Mean cross-entropy over the positions where `mask` is 1.
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let nll = token_nll(logits, targets, mask)?;
    let n = mask.to_dtype(nll.dtype())?.sum_all()?;
    (nll.sum_all()? / n.maximum(1.0)?)?.reshape(())
}

/// Shared embedding, the text and code experts' blocks side by side, a fusion layer, and
/// the tied head.
#[derive(Clone, Debug)]
pub struct FusedModel {
    pub embed: Embedding,
    pub text: BlockStack,
    pub code: BlockStack,
    pub fusion: Dense,
    pub method: FusionMethod,
    pub cfg: ModelConfig,
    /// Fusion training: the experts' outputs are constants, so backward stops at them
    /// instead of walking both stacks for gradients nobody will use.
    pub experts_frozen: bool,
}

impl FusedModel {
    pub fn new(cfg: &ModelConfig, method: FusionMethod, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let d = cfg.d_model;
        let fusion = match method {
            FusionMethod::Concat => {
                // [½I, ½I] is set by `initialise`: the fused model starts as the average.
                let vbf = vb.pp("fusion").pp("proj");
                Dense(Linear::new(
                    vbf.get_with_hints((d, 2 * d), "weight", Init::Const(0.0))?,
                    Some(vbf.get_with_hints(d, "bias", Init::Const(0.0))?),
                ))
            }
            FusionMethod::Gated | FusionMethod::Mixture => dense(2 * d, 2, vb.pp("fusion").pp("router"))?,
        };
        Ok(FusedModel {
            embed: tied_embedding(cfg, vb.pp("embed"))?,
            text: BlockStack::new(cfg, vb.pp("experts").pp("text"))?,
            code: BlockStack::new(cfg, vb.pp("experts").pp("code"))?,
            fusion,
            method,
            cfg: cfg.clone(),
            experts_frozen: false,
        })
    }

    /// Logits [B, T, V] and the per-token expert weights ([B, T, 2] for `gated`).
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_from(tokens, None, train)
            .map(|(logits, weights, _)| (logits, weights))
    }

    /// [`FusedModel::forward`] continuing from both experts' states (None: a fresh
    /// sequence); also returns the states after `tokens`, (text, code).
    pub fn forward_from(
        &self,
        tokens: &Tensor,
        state: Option<&FusedState>,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>, FusedState)> {
        let b = tokens.dim(0)?;
        let x = mmrec_kernels::fused::embedding(self.embed.embeddings(), tokens)?;
        let dt = x.dtype();
        let fresh;
        let (st, sc) = match state {
            Some((st, sc)) => (st, sc),
            None => {
                fresh = (
                    self.text.initial_state(b, dt, x.device())?,
                    self.code.initial_state(b, dt, x.device())?,
                );
                (&fresh.0, &fresh.1)
            }
        };
        let (yt, st, _) = self.text.forward(&x, st, train, Projection::Fused, None)?;
        let (yc, sc, _) = self.code.forward(&x, sc, train, Projection::Fused, None)?;
        let (yt, yc) = if self.experts_frozen {
            (yt.detach(), yc.detach())
        } else {
            (yt, yc)
        };
        let both = Tensor::cat(&[&yt, &yc], D::Minus1)?;
        let embed = if self.experts_frozen {
            self.embed.embeddings().detach()
        } else {
            self.embed.embeddings().clone()
        };
        let (logits, weights) = match self.method {
            FusionMethod::Concat => (tied_logits(&self.fusion.forward(&both)?, &embed)?, None),
            FusionMethod::Gated => {
                let w = candle_nn::ops::softmax(&self.fusion.forward(&both)?, D::Minus1)?;
                let f = (yt.broadcast_mul(&w.narrow(2, 0, 1)?)? + yc.broadcast_mul(&w.narrow(2, 1, 1)?)?)?;
                (tied_logits(&f, &embed)?, Some(w))
            }
            FusionMethod::Mixture => {
                let log_w = candle_nn::ops::log_softmax(&self.fusion.forward(&both)?, D::Minus1)?;
                let logits = mixture_log_probs([&tied_logits(&yt, &embed)?, &tied_logits(&yc, &embed)?], &log_w)?;
                (logits, Some(log_w.exp()?))
            }
        };
        Ok((logits, weights, (st, sc)))
    }
}

/// `log(w₀ softmax(l₀) + w₁ softmax(l₁))` per position, from both experts' logits [B, T, V]
/// and the log-weights [B, T, 2]: normalised log-probabilities, which the cross-entropy and
/// sampling take as logits (their softmax is the mixture itself). The log-sum-exp is
/// shifted by the larger term so that neither exp overflows; the result stays in the wide
/// dtype (f32 under bf16), as bf16 would round log-probabilities of -16 to steps of 0.06.
fn mixture_log_probs(logits: [&Tensor; 2], log_w: &Tensor) -> Result<Tensor> {
    let [a, b] = [0, 1].map(|e| {
        let wide = wide_dtype(logits[e].dtype());
        candle_nn::ops::log_softmax(&logits[e].to_dtype(wide)?, D::Minus1)?
            .broadcast_add(&log_w.narrow(2, e, 1)?.to_dtype(wide)?)
    });
    let (a, b) = (a?, b?);
    let top = a.maximum(&b)?;
    let rest = ((a - &top)?.exp()? + (b - &top)?.exp()?)?.log()?;
    top + rest
}

/// A fused model's recurrent state: the text expert's blocks', then the code expert's.
pub type FusedState = (Vec<BlockState>, Vec<BlockState>);

/// A VarBuilder that creates missing variables in `varmap` from candle's `Init`
/// descriptions with a seeded generator, each tensor's stream derived from (seed, name):
/// candle 0.11 cannot seed its CPU generator, and a run that must resume or be repeated
/// exactly needs its initial weights to be a function of the seed.
pub fn seeded_builder(varmap: &candle_nn::VarMap, seed: u64, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededInit {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        dev.clone(),
    )
}

struct SeededInit {
    varmap: candle_nn::VarMap,
    seed: u64,
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(&self, s: candle_core::Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("{name}: shape {:?} requested, {:?} exists", s, v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = SplitMix(self.seed ^ name_hash(name));
        let n = s.elem_count();
        let values: Vec<f64> = match h {
            Init::Const(c) => vec![c; n],
            Init::Uniform { lo, up } => (0..n).map(|_| lo + (up - lo) * rng.uniform()).collect(),
            Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * rng.normal()).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => (0..n)
                        .map(|_| 3f64.sqrt() * std * (2.0 * rng.uniform() - 1.0))
                        .collect(),
                    candle_nn::init::NormalOrUniform::Normal => (0..n).map(|_| std * rng.normal()).collect(),
                }
            }
        };
        let var = candle_core::Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// FNV-1a of a tensor or module name: a stable per-name stream for seeded draws.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A VarBuilder over existing variables that hands each one out cast to `dtype`: the
/// model built from it computes in `dtype` (bf16 mixed precision) while gradients flow
/// back through the casts to the f32 master weights. Build the model anew each step: the
/// casts are taken when the model is built.
pub fn cast_builder(varmap: &candle_nn::VarMap, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(CastVars(varmap.clone())), dtype, dev.clone())
}

struct CastVars(candle_nn::VarMap);

impl candle_nn::var_builder::SimpleBackend for CastVars {
    fn get(&self, s: candle_core::Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("{name}: shape {:?} requested, {:?} exists", s, t.shape());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.0.data().lock().expect("varmap lock");
        let var = data
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        var.as_tensor().to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// Every tensor name and shape a model of this config has (fused: with its fusion layer),
/// in name order, read off the module structure itself so no name table can drift.
/// The tensors the candle model asks its VarBuilder for, by name, with shapes: what
/// `mmrec_schemas::model_file::tensor_names` must list (a test holds the two together).
pub fn recorded_tensor_names(cfg: &ModelConfig, fused: Option<FusionMethod>) -> Result<Vec<(String, Vec<usize>)>> {
    let record = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(record.clone())), DType::F32, Device::Cpu);
    match fused {
        Some(method) => drop(FusedModel::new(cfg, method, vb)?),
        None => drop(MMRecModel::new(cfg, vb)?),
    }
    let names = record.lock().expect("recorder lock").clone();
    Ok(names.into_iter().collect())
}

/// Records what a constructor asks for; hands out zero tensors (untouched pages, so even a
/// large model costs no memory to enumerate).
struct Recorder(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(&self, s: candle_core::Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0
            .lock()
            .expect("recorder lock")
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor { path: name.to_string() })
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}
