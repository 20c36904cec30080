//! Move weights between the roles of DESIGN.md §1–§2: base → expert (layer mapping,
//! partial freezing, dtype conversion) and experts → fused model. Every target tensor gets
//! a status; mismatches are errors unless the user states a policy; nothing is written
//! unless everything checks out, and then atomically.
//!
//! Tensors are copied byte for byte from a memory map of the source, so a transfer costs
//! about what copying the file costs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use mmrec_schemas::atomic::sha256_hex;
use mmrec_schemas::model_file::{concat_fusion_init, glob_match, tensor_names};
use mmrec_schemas::safetensors::{read_header, Dtype, Header, TensorInfo, Writer};
use mmrec_schemas::{FusionMethod, ModelConfig, ModelMeta, Role};
use serde::Serialize;

mod merge;
pub use merge::{merge, merge_values, MergeMethod, MergeOptions, MergeParams};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] mmrec_schemas::Error),
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Model(String),
    /// The checks failed; the report says which tensors and why.
    #[error("{summary}")]
    Rejected {
        summary: String,
        kind: Rejection,
        report: Box<Report>,
    },
}

/// Why a transfer was refused, each with its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    ShapeMismatch,
    Missing,
    Unexpected,
    NonFinite,
}

impl Rejection {
    pub fn exit_code(self) -> u8 {
        match self {
            Rejection::ShapeMismatch => 3,
            Rejection::Missing => 4,
            Rejection::Unexpected => 5,
            Rejection::NonFinite => 6,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Copied,
    /// Copied from a block with another index.
    Mapped,
    /// Copied with a dtype conversion.
    Converted,
    /// Not in the source; created by an `--init` policy.
    Initialised,
    Missing,
    ShapeMismatch,
    /// In the source, not wanted by the target (and not a deliberately skipped block).
    Unexpected,
    /// A source block the layer mapping leaves out.
    Skipped,
    /// Computed from the base and the experts (`merge`).
    Merged,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: String,
    pub source: Option<String>,
    pub status: Status,
    pub shape: Vec<u64>,
    pub from_dtype: Option<&'static str>,
    pub to_dtype: &'static str,
    pub frozen: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: Vec<String>,
    pub out: Option<String>,
    pub rows: Vec<Row>,
    pub trainable_params: u64,
    pub frozen_params: u64,
    /// Values that became ±inf in a narrowing conversion, per tensor.
    pub overflows: BTreeMap<String, u64>,
    pub written: bool,
}

impl Report {
    /// The table of DESIGN's report: rows that differ only in the block index are grouped
    /// into ranges (`blocks.{0..11}.ffn.up.weight  copied  [1024, 256]`).
    pub fn render(&self) -> String {
        // Group rows that share everything but the block index, in name order.
        let mut groups: BTreeMap<(String, String, String, String, bool), Vec<usize>> = BTreeMap::new();
        for r in &self.rows {
            let (template, index) = block_template(&r.target);
            let status = serde_json::to_value(r.status)
                .expect("status")
                .as_str()
                .unwrap_or("")
                .to_string();
            let dtype = match r.from_dtype {
                Some(f) if f != r.to_dtype => format!("{f}→{}", r.to_dtype),
                _ => r.to_dtype.to_string(),
            };
            groups
                .entry((template, status, format!("{:?}", r.shape), dtype, r.frozen))
                .or_default()
                .extend(index);
        }
        let mut ordered: Vec<_> = groups.iter().collect();
        ordered.sort_by_key(|((template, ..), idx)| (template.clone(), idx.iter().min().copied()));
        let mut out = String::new();
        for ((template, status, shape, dtype, frozen), idx) in ordered {
            let name = if idx.is_empty() {
                template.clone()
            } else {
                template.replacen("{}", &format!("{{{}}}", ranges(idx)), 1)
            };
            out.push_str(&format!(
                "{name:<44} {status:<12} {shape:<14} {dtype:<9}{}\n",
                if *frozen { " frozen" } else { "" }
            ));
        }
        for (t, n) in &self.overflows {
            out.push_str(&format!(
                "warning: {n} values of {t} overflowed to ±inf in the conversion\n"
            ));
        }
        let all = self.trainable_params + self.frozen_params;
        out.push_str(&format!(
            "trainable params: {} || frozen params: {} || all params: {} || trainable%: {:.2}\n",
            self.trainable_params,
            self.frozen_params,
            all,
            if all > 0 {
                100.0 * self.trainable_params as f64 / all as f64
            } else {
                0.0
            }
        ));
        out
    }
}

/// `[0, 1, 2, 5]` → `0..2,5`.
fn ranges(idx: &[usize]) -> String {
    let mut v = idx.to_vec();
    v.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}..{}", v[i], v[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// `blocks.7.ffn.up.weight` → (`blocks.{}.ffn.up.weight`, Some(7)); the last `blocks.N.`
/// counts, so `experts.text.blocks.3.x` groups too.
fn block_template(name: &str) -> (String, Option<usize>) {
    if let Some(pos) = name.rfind("blocks.") {
        let rest = &name[pos + 7..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(i) = digits.parse() {
            return (format!("{}blocks.{{}}{}", &name[..pos], &rest[digits.len()..]), Some(i));
        }
    }
    (name.to_string(), None)
}

/// Which source block each target block comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerMap {
    /// Same layers, same order.
    Identity,
    /// `--layers 0-5,8`: target block i ← source block list[i].
    List(Vec<usize>),
    /// `--map 'blocks.{i} <- blocks.{2*i+1}'` with `n` target blocks.
    Affine { a: i64, b: i64, n: usize },
}

impl LayerMap {
    pub fn parse_layers(s: &str) -> Result<Self> {
        let mut list = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || Error::Usage(format!("--layers: {part:?} is not N or A-B"));
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) = (
                        a.trim().parse().map_err(|_| bad())?,
                        b.trim().parse().map_err(|_| bad())?,
                    );
                    if a > b {
                        return Err(bad());
                    }
                    list.extend(a..=b);
                }
                None => list.push(part.parse().map_err(|_| bad())?),
            }
        }
        if list.is_empty() {
            return Err(Error::Usage("--layers names no layer".into()));
        }
        Ok(LayerMap::List(list))
    }

    /// `blocks.{i} <- blocks.{EXPR}` where EXPR is affine in i: `i`, `2*i`, `i+3`, `2*i-1`.
    pub fn parse_map(s: &str, n: usize) -> Result<Self> {
        let bad = |m: &str| {
            Error::Usage(format!(
                "--map {s:?}: {m} (expected 'blocks.{{i}} <- blocks.{{2*i+1}}')"
            ))
        };
        let (lhs, rhs) = s.split_once("<-").ok_or_else(|| bad("no `<-`"))?;
        if lhs.trim() != "blocks.{i}" {
            return Err(bad("the left side must be blocks.{i}"));
        }
        let expr = rhs
            .trim()
            .strip_prefix("blocks.{")
            .and_then(|r| r.strip_suffix('}'))
            .ok_or_else(|| bad("the right side must be blocks.{EXPR}"))?;
        let e: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
        let (scale_part, offset) = match e.find(['+', '-']).filter(|&p| p > 0) {
            Some(p) => (&e[..p], e[p..].parse::<i64>().map_err(|_| bad("bad offset"))?),
            None => (e.as_str(), 0),
        };
        let a = match scale_part {
            "i" => 1,
            other => other
                .strip_suffix("*i")
                .and_then(|k| k.parse::<i64>().ok())
                .ok_or_else(|| bad("bad scale"))?,
        };
        Ok(LayerMap::Affine { a, b: offset, n })
    }

    fn targets(&self, source_layers: usize) -> Result<Vec<usize>> {
        let v: Vec<i64> = match self {
            LayerMap::Identity => (0..source_layers as i64).collect(),
            LayerMap::List(l) => l.iter().map(|&x| x as i64).collect(),
            LayerMap::Affine { a, b, n } => (0..*n as i64).map(|i| a * i + b).collect(),
        };
        v.iter()
            .enumerate()
            .map(|(i, &s)| {
                if s < 0 || s as usize >= source_layers {
                    Err(Error::Usage(format!(
                        "target block {i} maps to source block {s}, but the source has blocks 0..{}",
                        source_layers.saturating_sub(1)
                    )))
                } else {
                    Ok(s as usize)
                }
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        match self {
            LayerMap::Identity => "identity".into(),
            LayerMap::List(l) => format!("layers {l:?}"),
            LayerMap::Affine { a, b, n } => format!("blocks.{{i}} <- blocks.{{{a}*i{b:+}}} for i in 0..{n}"),
        }
    }
}

/// How to create a target tensor the source does not have (`--allow-partial`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitPolicy {
    Zeros,
    Ones,
}

#[derive(Debug, Clone)]
pub struct ExpertOptions {
    pub source: PathBuf,
    pub out: PathBuf,
    pub domain: String,
    pub layers: LayerMap,
    pub freeze: Vec<String>,
    pub dtype: Option<Dtype>,
    /// Pattern → policy for target tensors missing from the source.
    pub init: Vec<(String, InitPolicy)>,
    pub persist: Persist,
}

/// What happens to the output once every check has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persist {
    /// Report only.
    DryRun,
    /// Written under a temporary name and renamed into place, as `cp` leaves it in the
    /// page cache: readers and a killed run never see a partial file.
    #[default]
    Atomic,
    /// Atomic, and flushed to disk before the rename: survives a power loss too.
    Durable,
}

/// One tensor of the output and where its bytes come from.
enum Plan {
    Copy {
        file: usize,
        info: TensorInfo,
    },
    Init(InitPolicy),
    /// Mean of the same tensor in two files (the fused model's shared embedding).
    Mean {
        a: (usize, TensorInfo),
        b: (usize, TensorInfo),
    },
    /// Explicit f32 values (fusion layer initialisation).
    Values(Vec<f32>),
    /// The same tensor of the base (first) and of each expert, merged (`merge`).
    Merge {
        inputs: Vec<(usize, TensorInfo)>,
        params: MergeParams,
    },
}

struct Output {
    name: String,
    shape: Vec<u64>,
    dtype: Dtype,
    plan: Plan,
}

fn source_meta(h: &Header) -> Result<ModelMeta> {
    ModelMeta::from_map(&h.path, &h.metadata).map_err(|e| Error::Model(e.to_string()))
}

pub fn to_expert(opts: &ExpertOptions) -> Result<Report> {
    let header = read_header(&opts.source)?;
    let meta = source_meta(&header)?;
    if meta.role == Role::Fused {
        return Err(Error::Usage(format!(
            "{} is a fused model; expert transfer takes a base or expert",
            opts.source.display()
        )));
    }
    let src_layers = meta.config.n_layers;
    let mapping = opts.layers.targets(src_layers)?;
    let cfg = ModelConfig {
        n_layers: mapping.len(),
        ..meta.config.clone()
    };
    let expected = tensor_names(&cfg, None);
    check_freeze_patterns(&opts.freeze, &expected)?;

    let mut rows = Vec::new();
    let mut outputs = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for (name, shape) in &expected {
        let (template, index) = block_template(name);
        let src_name = match index {
            Some(i) => template.replacen("{}", &mapping[i].to_string(), 1),
            None => name.clone(),
        };
        let (row, output) = expert_row(opts, &header, name, shape, &src_name);
        if row.source.is_some() {
            used.insert(src_name);
        }
        rows.push(row);
        outputs.extend(output);
    }
    rows.extend(unused_source_rows(&header, &used, &mapping, &expected, src_layers));
    let out_meta = ModelMeta {
        role: Role::Expert,
        domain: Some(opts.domain.clone()),
        config: cfg,
        frozen: opts.freeze.clone(),
        lineage: serde_json::json!({"tool": tool_version(), "operation": "to-expert", "sources": [{"path": opts.source, "sha256": SHA_PLACEHOLDER}], "mapping": opts.layers.describe(), "dtype": opts.dtype.map(Dtype::name)}),
        fusion: None,
        tokenizer: meta.tokenizer.clone(),
    };
    finish(
        &[&header],
        rows,
        outputs,
        &out_meta,
        &opts.out,
        opts.persist,
        &header.metadata,
    )
}

/// The target tensor `name`'s row and, unless it is missing, how to produce it: from the
/// source's `src_name` (copied, mapped from another layer, or converted), or from an
/// `--init` policy.
fn expert_row(
    opts: &ExpertOptions,
    header: &Header,
    name: &str,
    shape: &[usize],
    src_name: &str,
) -> (Row, Option<Output>) {
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut row = Row {
        target: name.to_string(),
        source: Some(src_name.to_string()),
        status: Status::Copied,
        shape: shape.clone(),
        from_dtype: None,
        to_dtype: "F32",
        frozen: opts.freeze.iter().any(|p| glob_match(p, name)),
    };
    let Some(info) = header.tensors.get(src_name) else {
        row.source = None;
        let dtype = opts.dtype.unwrap_or(Dtype::F32);
        row.to_dtype = dtype.name();
        let Some((_, policy)) = opts.init.iter().find(|(p, _)| glob_match(p, name)) else {
            row.status = Status::Missing;
            return (row, None);
        };
        row.status = Status::Initialised;
        let plan = Plan::Init(*policy);
        return (
            row,
            Some(Output {
                name: name.to_string(),
                shape,
                dtype,
                plan,
            }),
        );
    };
    let to = opts.dtype.unwrap_or(info.dtype);
    row.from_dtype = Some(info.dtype.name());
    row.to_dtype = to.name();
    row.status = if info.shape != shape {
        row.shape = info.shape.clone();
        Status::ShapeMismatch
    } else if to != info.dtype {
        Status::Converted
    } else if src_name != name {
        Status::Mapped
    } else {
        Status::Copied
    };
    let plan = Plan::Copy {
        file: 0,
        info: info.clone(),
    };
    (
        row,
        Some(Output {
            name: name.to_string(),
            shape,
            dtype: to,
            plan,
        }),
    )
}

/// Rows for the source tensors no target took: blocks the layer map leaves out are
/// skipped; anything else does not belong in the target model.
fn unused_source_rows(
    header: &Header,
    used: &std::collections::BTreeSet<String>,
    mapping: &[usize],
    expected: &[(String, Vec<usize>)],
    src_layers: usize,
) -> Vec<Row> {
    let kept: std::collections::BTreeSet<usize> = mapping.iter().copied().collect();
    let is_block_tensor = |name: &str| {
        expected
            .iter()
            .any(|(n, _)| block_template(n).0 == block_template(name).0)
    };
    header
        .tensors
        .iter()
        .filter(|(name, _)| !used.contains(*name))
        .map(|(name, info)| {
            let status = match block_template(name).1 {
                Some(i) if i < src_layers && !kept.contains(&i) && is_block_tensor(name) => Status::Skipped,
                _ => Status::Unexpected,
            };
            Row {
                target: name.clone(),
                source: Some(name.clone()),
                status,
                shape: info.shape.clone(),
                from_dtype: Some(info.dtype.name()),
                to_dtype: info.dtype.name(),
                frozen: false,
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct FuseOptions {
    pub text: PathBuf,
    pub code: PathBuf,
    pub method: FusionMethod,
    pub embed: EmbedChoice,
    pub out: PathBuf,
    pub persist: Persist,
}

/// Which embedding the fused model shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbedChoice {
    /// Element-wise mean of the two experts' embeddings.
    Mean,
    Text,
    Code,
}

pub fn fuse(opts: &FuseOptions) -> Result<Report> {
    let (ht, hc) = (read_header(&opts.text)?, read_header(&opts.code)?);
    let mt = check_experts(opts, &ht, &hc)?;
    let cfg = ModelConfig {
        uboo_weight: 0.0,
        ..mt.config.clone()
    };
    let expected = tensor_names(&cfg, Some(opts.method));
    let mut rows = Vec::new();
    let mut outputs = Vec::new();
    for (name, shape) in &expected {
        let shape: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        let mut row = Row {
            target: name.clone(),
            source: None,
            status: Status::Copied,
            shape: shape.clone(),
            from_dtype: Some("F32"),
            to_dtype: "F32",
            frozen: !name.starts_with("fusion."),
        };
        match fused_tensor(opts, &ht, &hc, name, &shape, cfg.d_model, &mut row)? {
            Some((dtype, plan)) => outputs.push(Output {
                name: name.clone(),
                shape,
                dtype,
                plan,
            }),
            None => row.status = Status::Missing,
        }
        rows.push(row);
    }
    let meta = ModelMeta {
        role: Role::Fused,
        domain: None,
        config: cfg,
        frozen: vec!["embed.*".into(), "experts.*".into()],
        lineage: serde_json::json!({"tool": tool_version(), "operation": "fuse", "sources": [{"path": opts.text, "sha256": SHA_PLACEHOLDER}, {"path": opts.code, "sha256": SHA_PLACEHOLDER}], "method": opts.method, "embed": format!("{:?}", opts.embed).to_lowercase()}),
        fusion: Some(opts.method),
        tokenizer: mt.tokenizer.clone(),
    };
    finish(&[&ht, &hc], rows, outputs, &meta, &opts.out, opts.persist, &ht.metadata)
}

/// The text expert's metadata, once both experts are known to be of one shape and one
/// tokenizer.
fn check_experts(opts: &FuseOptions, ht: &Header, hc: &Header) -> Result<ModelMeta> {
    let (mt, mc) = (source_meta(ht)?, source_meta(hc)?);
    let comparable = |c: &ModelConfig| ModelConfig {
        dropout: 0.0,
        uboo_weight: 0.0,
        ..c.clone()
    };
    if comparable(&mt.config) != comparable(&mc.config) {
        return Err(Error::Usage(format!(
            "the experts are not compatible: {} has {:?}, {} has {:?} (width, layers, heads, memory and vocabulary must match)",
            opts.text.display(),
            mt.config,
            opts.code.display(),
            mc.config
        )));
    }
    if let (Some(a), Some(b)) = (ht.metadata.get("tokenizer"), hc.metadata.get("tokenizer")) {
        if a != b {
            return Err(Error::Usage(format!(
                "the experts were trained with different tokenizers ({a} and {b})"
            )));
        }
    }
    Ok(mt)
}

/// Where fused tensor `name` comes from: an expert's block, the shared embedding (one
/// expert's or their mean), or the fusion layer's initial values; None when missing.
/// Updates `row` with the source and status.
fn fused_tensor(
    opts: &FuseOptions,
    ht: &Header,
    hc: &Header,
    name: &str,
    shape: &[u64],
    d: usize,
    row: &mut Row,
) -> Result<Option<(Dtype, Plan)>> {
    let lookup = |h: &Header, name: &str| h.tensors.get(name).cloned();
    let expert = if let Some(rest) = name.strip_prefix("experts.text.") {
        row.source = Some(format!("{}:{rest}", opts.text.display()));
        lookup(ht, rest).map(|i| (0, i))
    } else if let Some(rest) = name.strip_prefix("experts.code.") {
        row.source = Some(format!("{}:{rest}", opts.code.display()));
        lookup(hc, rest).map(|i| (1, i))
    } else {
        None
    };
    Ok(match (name, expert) {
        (_, Some((file, info))) => {
            if info.shape != shape {
                row.status = Status::ShapeMismatch;
            }
            row.from_dtype = Some(info.dtype.name());
            row.to_dtype = info.dtype.name();
            Some((info.dtype, Plan::Copy { file, info }))
        }
        ("embed.weight", None) => match (lookup(ht, name), lookup(hc, name), opts.embed) {
            (Some(a), _, EmbedChoice::Text) => Some((a.dtype, Plan::Copy { file: 0, info: a })),
            (_, Some(b), EmbedChoice::Code) => Some((b.dtype, Plan::Copy { file: 1, info: b })),
            (Some(a), Some(b), EmbedChoice::Mean) if a.dtype == Dtype::F32 && b.dtype == Dtype::F32 => {
                row.status = Status::Converted;
                row.source = Some("mean of both experts".into());
                Some((Dtype::F32, Plan::Mean { a: (0, a), b: (1, b) }))
            }
            (Some(_), Some(_), EmbedChoice::Mean) => {
                return Err(Error::Usage(
                    "--embed mean needs f32 embeddings; pick --embed text or code".into(),
                ))
            }
            _ => None,
        },
        ("fusion.proj.weight", None) => {
            row.status = Status::Initialised;
            Some((Dtype::F32, Plan::Values(concat_fusion_init(d))))
        }
        (n, None) if n.starts_with("fusion.") => {
            // Zero router weights and biases: equal weights to start; zero concat bias.
            row.status = Status::Initialised;
            Some((Dtype::F32, Plan::Init(InitPolicy::Zeros)))
        }
        _ => None,
    })
}

fn check_freeze_patterns(patterns: &[String], expected: &[(String, Vec<usize>)]) -> Result<()> {
    for p in patterns {
        if !expected.iter().any(|(n, _)| glob_match(p, n)) {
            return Err(Error::Usage(format!(
                "--freeze {p:?} matches no tensor of the target model (names look like blocks.0.ffn.up.weight)"
            )));
        }
    }
    Ok(())
}

const SHA_PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn tool_version() -> String {
    format!("mmrec-transfer {}", env!("CARGO_PKG_VERSION"))
}

/// Decide, then (unless dry-run) write: header with the sources' sha256 filled in after a
/// parallel hash of each source, tensor bytes streamed from memory maps, temp + rename.
fn finish(
    sources: &[&Header],
    rows: Vec<Row>,
    outputs: Vec<Output>,
    meta: &ModelMeta,
    out: &Path,
    persist: Persist,
    source_metadata: &BTreeMap<String, String>,
) -> Result<Report> {
    let frozen_names: std::collections::BTreeSet<&str> =
        rows.iter().filter(|r| r.frozen).map(|r| r.target.as_str()).collect();
    let (mut trainable, mut frozen) = (0u64, 0u64);
    for o in &outputs {
        let n: u64 = o.shape.iter().product();
        if frozen_names.contains(o.name.as_str()) {
            frozen += n;
        } else {
            trainable += n;
        }
    }
    let mut report = Report {
        source: sources.iter().map(|h| h.path.display().to_string()).collect(),
        out: Some(out.display().to_string()),
        rows,
        trainable_params: trainable,
        frozen_params: frozen,
        overflows: BTreeMap::new(),
        written: false,
    };
    reject_bad_rows(&report)?;
    let maps: Vec<memmap2::Mmap> = sources
        .iter()
        .map(|h| {
            let f = std::fs::File::open(&h.path).map_err(io_err(&h.path))?;
            // SAFETY: read-only map of a file this process does not modify. Not populated up
            // front: the writer and the hashing thread then fault pages in concurrently.
            unsafe { memmap2::MmapOptions::new().map(&f) }.map_err(io_err(&h.path))
        })
        .collect::<Result<_>>()?;
    let bytes = SourceBytes { sources, maps: &maps };
    if persist == Persist::DryRun {
        report.overflows = bytes.count_overflows(&outputs);
        if let Some(summary) = outputs.iter().find_map(|o| non_finite(o, sources, &maps)) {
            return Err(rejected_non_finite(summary, report));
        }
        report.out = None;
        return Ok(report);
    }
    let mut metadata = meta.to_map();
    if let Some(t) = source_metadata.get("tokenizer") {
        metadata.insert("tokenizer".into(), t.clone());
    }
    match bytes.write(&outputs, &metadata, out, persist)? {
        Ok(overflows) => report.overflows = overflows,
        Err(summary) => return Err(rejected_non_finite(summary, report)),
    }
    report.written = true;
    Ok(report)
}

fn rejected_non_finite(summary: String, report: Report) -> Error {
    Error::Rejected {
        summary,
        kind: Rejection::NonFinite,
        report: Box::new(report),
    }
}

/// Refuse a transfer whose rows show shape mismatches, missing or unexpected tensors.
fn reject_bad_rows(report: &Report) -> Result<()> {
    for (status, kind, what) in [
        (Status::ShapeMismatch, Rejection::ShapeMismatch, "shape mismatch"),
        (
            Status::Missing,
            Rejection::Missing,
            "missing from the source (use --allow-partial with --init PATTERN=zeros|ones)",
        ),
        (
            Status::Unexpected,
            Rejection::Unexpected,
            "in the source but not in the target model",
        ),
    ] {
        let bad: Vec<&str> = report
            .rows
            .iter()
            .filter(|r| r.status == status)
            .map(|r| r.target.as_str())
            .collect();
        if !bad.is_empty() {
            let summary = format!(
                "{} tensors {what}: {}",
                bad.len(),
                bad.iter().take(6).copied().collect::<Vec<_>>().join(", ")
            );
            return Err(Error::Rejected {
                summary,
                kind,
                report: Box::new(report.clone()),
            });
        }
    }
    Ok(())
}

/// The source files' headers and memory maps, from which output tensors are made.
struct SourceBytes<'a> {
    sources: &'a [&'a Header],
    maps: &'a [memmap2::Mmap],
}

impl SourceBytes<'_> {
    /// What a write would count as overflowing while converting, counted into a scratch
    /// buffer (for a dry run).
    fn count_overflows(&self, outputs: &[Output]) -> BTreeMap<String, u64> {
        let mut overflows = BTreeMap::new();
        let mut scratch = Vec::new();
        for o in outputs {
            if let Plan::Copy { file, info } = &o.plan {
                if o.dtype != info.dtype {
                    scratch.clear();
                    let n = convert(
                        slice(self.maps, self.sources, *file, info),
                        info.dtype,
                        o.dtype,
                        &mut scratch,
                    );
                    if n > 0 {
                        overflows.insert(o.name.clone(), n);
                    }
                }
            }
        }
        overflows
    }

    /// Write the output file. Outer error: I/O; inner: the first non-finite tensor, found
    /// while writing (each tensor is checked just before it is copied, while its pages are
    /// hot). Ok: the tensors that overflowed in a dtype conversion, with counts.
    fn write(
        &self,
        outputs: &[Output],
        metadata: &BTreeMap<String, String>,
        out: &Path,
        persist: Persist,
    ) -> Result<Result<BTreeMap<String, u64>, String>> {
        let layout: Vec<(String, Dtype, Vec<u64>)> = outputs
            .iter()
            .map(|o| (o.name.clone(), o.dtype, o.shape.clone()))
            .collect();
        let mut w = Writer::create(out, &layout, metadata)?;
        let mut overflows = BTreeMap::new();
        let checked = std::thread::scope(|s| -> Result<Result<(), String>> {
            // Hash the sources on another core while this one writes.
            let hashers: Vec<_> = self.maps.iter().map(|m| s.spawn(move || sha256_hex(&m[..]))).collect();
            for o in outputs {
                if let Some(summary) = non_finite(o, self.sources, self.maps) {
                    return Ok(Err(summary));
                }
                let n = write_tensor(&mut w, o, self.sources, self.maps).map_err(io_err(out))?;
                if n > 0 {
                    overflows.insert(o.name.clone(), n);
                }
            }
            // Each source's sha256 takes its placeholder's place (same length: every
            // offset stays valid).
            for h in hashers {
                w.patch_header(SHA_PLACEHOLDER.as_bytes(), h.join().expect("hash thread").as_bytes());
            }
            Ok(Ok(()))
        })?;
        match checked {
            Ok(()) => {
                w.commit(persist == Persist::Durable)?;
                Ok(Ok(overflows))
            }
            Err(summary) => Ok(Err(summary)),
        }
    }
}

fn slice<'a>(maps: &'a [memmap2::Mmap], sources: &[&Header], file: usize, info: &TensorInfo) -> &'a [u8] {
    let base = sources[file].data_offset;
    &maps[file][(base + info.start) as usize..(base + info.end) as usize]
}

/// Writes one output tensor; returns how many of its values overflowed to ±inf in a
/// dtype conversion.
fn write_tensor(f: &mut impl Write, o: &Output, sources: &[&Header], maps: &[memmap2::Mmap]) -> std::io::Result<u64> {
    let n = o.shape.iter().product::<u64>() as usize;
    match &o.plan {
        Plan::Copy { file, info } if info.dtype == o.dtype => {
            f.write_all(slice(maps, sources, *file, info)).map(|()| 0)
        }
        Plan::Copy { file, info } => {
            let mut buf = Vec::with_capacity(1 << 20);
            let mut overflows = 0;
            for chunk in slice(maps, sources, *file, info).chunks(info.dtype.size() as usize * 65536) {
                buf.clear();
                overflows += convert(chunk, info.dtype, o.dtype, &mut buf);
                f.write_all(&buf)?;
            }
            Ok(overflows)
        }
        Plan::Init(p) => {
            let v = match p {
                InitPolicy::Zeros => 0.0,
                InitPolicy::Ones => 1.0,
            };
            let mut buf = Vec::with_capacity(n * o.dtype.size() as usize);
            for _ in 0..n {
                encode(v, o.dtype, &mut buf);
            }
            f.write_all(&buf).map(|()| 0)
        }
        Plan::Mean { a, b } => {
            let (x, y) = (slice(maps, sources, a.0, &a.1), slice(maps, sources, b.0, &b.1));
            let mut buf = Vec::with_capacity(x.len());
            for (p, q) in decode(x, Dtype::F32).zip(decode(y, Dtype::F32)) {
                encode(0.5 * (p + q), Dtype::F32, &mut buf);
            }
            f.write_all(&buf).map(|()| 0)
        }
        Plan::Values(v) => f
            .write_all(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
            .map(|()| 0),
        Plan::Merge { inputs, params } => {
            let values: Vec<Vec<f64>> = inputs
                .iter()
                .map(|(file, info)| decode(slice(maps, sources, *file, info), info.dtype).collect())
                .collect();
            let merged = merge_values(&o.name, &values[0], &values[1..], params);
            let mut buf = Vec::with_capacity(n * o.dtype.size() as usize);
            let mut overflows = 0;
            for v in merged {
                let start = buf.len();
                encode(v, o.dtype, &mut buf);
                overflows +=
                    u64::from(v.is_finite() && decode(&buf[start..], o.dtype).next().is_some_and(f64::is_infinite));
            }
            f.write_all(&buf).map(|()| overflows)
        }
    }
}

/// Appends `bytes` of `from` converted to `to` (round to nearest even) to `out`; returns how
/// many finite values became ±inf. f32 ↔ f16/bf16, the conversions users ask for, get loops
/// of their own: through `decode`/`encode` each value would pass a dtype dispatch twice
/// and an f64, about ten times slower.
fn convert(bytes: &[u8], from: Dtype, to: Dtype, out: &mut Vec<u8>) -> u64 {
    use half::slice::HalfFloatSliceExt;
    // Blocks of 1024 values through `half`'s slice conversions, which check the CPU once and
    // use its F16C instructions where it has them; the blocks live on the stack (a
    // tensor-sized buffer would cost a fresh allocation and its page faults per chunk), and
    // bytes go in and out with plain loops (the source may sit at any alignment).
    const BLOCK: usize = 1024;
    fn narrow<H: Copy + Default>(
        bytes: &[u8],
        out: &mut Vec<u8>,
        convert: impl Fn(&mut [H], &[f32]),
        to_bits: impl Fn(H) -> u16,
        inf: u16,
    ) -> u64 {
        let (mut values, mut halves) = ([0f32; BLOCK], [H::default(); BLOCK]);
        let mut overflows = 0;
        out.reserve(bytes.len() / 2);
        for block in bytes.chunks(4 * BLOCK) {
            let n = block.len() / 4;
            for (v, c) in values.iter_mut().zip(block.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            convert(&mut halves[..n], &values[..n]);
            let start = out.len();
            out.resize(start + 2 * n, 0);
            for ((o, &h), v) in out[start..].chunks_exact_mut(2).zip(&halves[..n]).zip(&values[..n]) {
                let bits = to_bits(h);
                overflows += u64::from(bits & 0x7fff == inf && v.is_finite());
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
        overflows
    }
    fn widen<H: Copy + Default>(
        bytes: &[u8],
        out: &mut Vec<u8>,
        from_bits: impl Fn(u16) -> H,
        convert: impl Fn(&[H], &mut [f32]),
    ) -> u64 {
        let (mut halves, mut values) = ([H::default(); BLOCK], [0f32; BLOCK]);
        out.reserve(bytes.len() * 2);
        for block in bytes.chunks(2 * BLOCK) {
            let n = block.len() / 2;
            for (h, c) in halves.iter_mut().zip(block.chunks_exact(2)) {
                *h = from_bits(u16::from_le_bytes([c[0], c[1]]));
            }
            convert(&halves[..n], &mut values[..n]);
            let start = out.len();
            out.resize(start + 4 * n, 0);
            for (o, v) in out[start..].chunks_exact_mut(4).zip(&values[..n]) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        0
    }
    match (from, to) {
        (Dtype::F32, Dtype::BF16) => narrow(
            bytes,
            out,
            |h: &mut [u16], v: &[f32]| h.iter_mut().zip(v).for_each(|(h, &v)| *h = bf16_bits(v)),
            |h| h,
            0x7f80,
        ),
        (Dtype::F32, Dtype::F16) => narrow(
            bytes,
            out,
            <[half::f16]>::convert_from_f32_slice,
            half::f16::to_bits,
            0x7c00,
        ),
        (Dtype::BF16, Dtype::F32) => widen(bytes, out, half::bf16::from_bits, <[half::bf16]>::convert_to_f32_slice),
        (Dtype::F16, Dtype::F32) => widen(bytes, out, half::f16::from_bits, <[half::f16]>::convert_to_f32_slice),
        _ => {
            let mut overflows = 0;
            for v in decode(bytes, from) {
                let start = out.len();
                encode(v, to, out);
                overflows += u64::from(v.is_finite() && decode(&out[start..], to).next().is_some_and(f64::is_infinite));
            }
            overflows
        }
    }
}

fn decode(bytes: &[u8], dtype: Dtype) -> impl Iterator<Item = f64> + '_ {
    let size = dtype.size() as usize;
    bytes.chunks_exact(size).map(move |c| match dtype {
        Dtype::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")),
        Dtype::F32 => f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
        Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
        Dtype::I64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
        Dtype::I32 => i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
        Dtype::I16 => i16::from_le_bytes([c[0], c[1]]) as f64,
        Dtype::I8 => c[0] as i8 as f64,
        Dtype::U8 | Dtype::Bool => c[0] as f64,
    })
}

fn encode(v: f64, dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
        Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(f32_round_to_odd(v)).to_le_bytes()),
        Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(f32_round_to_odd(v)).to_le_bytes()),
        Dtype::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
        Dtype::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
        Dtype::I16 => out.extend_from_slice(&(v as i16).to_le_bytes()),
        Dtype::I8 => out.push(v as i8 as u8),
        Dtype::U8 | Dtype::Bool => out.push(v as u8),
    }
}

/// f32 → bf16 bits, rounded to nearest even (NaN stays a quiet NaN), without a branch so
/// that the loop vectorises: `half`'s version branches per value, and x86 CPUs before
/// AVX512-BF16 have no instruction for it.
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        (b >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// `v` as an f32 rounded to odd (toward zero, then the last bit set when inexact), so that
/// rounding that to f16 or bf16 (13 and 16 bits narrower) lands where rounding `v` directly
/// would. `half`'s own f64 → bf16 ignores the bits below its rounding bit: 0x7f648004 as
/// an f64 came out 0x7f64 instead of 0x7f65.
fn f32_round_to_odd(v: f64) -> f32 {
    let f = v as f32;
    if !f.is_finite() || f as f64 == v {
        return f;
    }
    let toward_zero = if (f as f64).abs() > v.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

/// The first non-finite value a copied or averaged tensor would carry over, as the
/// rejection's summary.
fn non_finite(o: &Output, sources: &[&Header], maps: &[memmap2::Mmap]) -> Option<String> {
    let inputs: Vec<(usize, &TensorInfo)> = match &o.plan {
        Plan::Copy { file, info } => vec![(*file, info)],
        Plan::Mean { a, b } => vec![(a.0, &a.1), (b.0, &b.1)],
        Plan::Merge { inputs, .. } => inputs.iter().map(|(f, i)| (*f, i)).collect(),
        Plan::Init(_) | Plan::Values(_) => return None,
    };
    inputs.into_iter().find_map(|(file, info)| {
        first_non_finite(slice(maps, sources, file, info), info.dtype).map(|i| {
            format!(
                "tensor `{}` of {} has a non-finite value at element {i}",
                o.name,
                sources[file].path.display()
            )
        })
    })
}

/// Index of the first inf or NaN. Blocks are screened branch-free on the exponent bits
/// (all ones ⇔ inf or NaN, in every IEEE format) so the scan runs at memory speed; only
/// a block that fails is decoded to find the element.
fn first_non_finite(bytes: &[u8], dtype: Dtype) -> Option<usize> {
    const BLOCK: usize = 4096;
    // Written per width so that each folds to a vectorised OR over whole registers.
    fn any16(block: &[u8], mask: u16) -> bool {
        block
            .chunks_exact(2)
            .fold(false, |acc, c| acc | (u16::from_le_bytes([c[0], c[1]]) & mask == mask))
    }
    fn any32(block: &[u8], mask: u32) -> bool {
        block.chunks_exact(4).fold(false, |acc, c| {
            acc | (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & mask == mask)
        })
    }
    fn any64(block: &[u8], mask: u64) -> bool {
        block.chunks_exact(8).fold(false, |acc, c| {
            acc | (u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) & mask == mask)
        })
    }
    let size = dtype.size() as usize;
    for (k, block) in bytes.chunks(size * BLOCK).enumerate() {
        let suspect = match dtype {
            Dtype::F32 => any32(block, 0x7f80_0000),
            Dtype::F16 => any16(block, 0x7c00),
            Dtype::BF16 => any16(block, 0x7f80),
            Dtype::F64 => any64(block, 0x7ff0_0000_0000_0000),
            _ => return None,
        };
        if suspect {
            return decode(block, dtype).position(|v| !v.is_finite()).map(|i| k * BLOCK + i);
        }
    }
    None
}

/// `inspect`: the header only: tensors, parameter counts by module, metadata.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub bytes: u64,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub params_by_module: BTreeMap<String, u64>,
    pub total_params: u64,
    pub metadata: BTreeMap<String, serde_json::Value>,
}

pub fn inspect(path: &Path) -> Result<Inspection> {
    let h = read_header(path)?;
    let bytes = std::fs::metadata(path).map_err(io_err(path))?.len();
    let mut by_module: BTreeMap<String, u64> = BTreeMap::new();
    for (name, t) in &h.tensors {
        let (template, _) = block_template(name);
        // Module = the name without its index and last component: blocks.{}.ffn.up
        let module = template
            .rsplit_once('.')
            .map_or(template.clone(), |(m, _)| m.to_string());
        *by_module.entry(module).or_default() += t.elements();
    }
    let metadata = h
        .metadata
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone())),
            )
        })
        .collect();
    Ok(Inspection {
        path: path.display().to_string(),
        bytes,
        total_params: h.tensors.values().map(TensorInfo::elements).sum(),
        tensors: h.tensors,
        params_by_module: by_module,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the 16-bit float `bits` is `v` rounded to nearest, ties to even, checked in
    /// f64 (where every value involved is exact) against the neighbouring magnitudes.
    fn is_nearest(v: f64, bits: u16, to_f64: fn(u16) -> f64, inf_magnitude: u16) -> bool {
        let (magnitude, negative) = (bits & 0x7fff, bits & 0x8000 != 0);
        if negative != v.is_sign_negative() {
            return false;
        }
        let target = v.abs();
        // Halfway between the largest finite value and the next step: from there on (a tie
        // rounds to the even side, which is infinity) a value overflows.
        let max = to_f64(inf_magnitude - 1);
        let overflow_at = max + (max - to_f64(inf_magnitude - 2)) / 2.0;
        if magnitude == inf_magnitude || target >= overflow_at {
            return magnitude == inf_magnitude && target >= overflow_at;
        }
        let d = (target - to_f64(magnitude)).abs();
        [
            magnitude.checked_sub(1),
            Some(magnitude + 1).filter(|&n| n < inf_magnitude),
        ]
        .into_iter()
        .flatten()
        .all(|n| {
            let dn = (target - to_f64(n)).abs();
            d < dn || (d == dn && magnitude % 2 == 0)
        })
    }

    #[test]
    fn narrowing_rounds_to_nearest_even_and_counts_exact_overflows() {
        // Edges (largest finite values, halfway cases around each format's overflow
        // threshold, subnormals, signed zeros) and 200 000 random finite bit patterns.
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            65504.0,
            65519.0,
            65520.0,
            -65520.0,
            6e-8,
            3e-8,
            3.3895e38,
            3.3896e38,
            1.0 + f32::EPSILON,
            f32::from_bits(0x7f64_8004),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        while values.len() < 200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = f32::from_bits(state as u32);
            if v.is_finite() {
                values.push(v);
            }
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        type Format = (Dtype, fn(u16) -> f64, u16);
        let formats: [Format; 2] = [
            (Dtype::BF16, |b| half::bf16::from_bits(b).to_f64(), 0x7f80),
            (Dtype::F16, |b| half::f16::from_bits(b).to_f64(), 0x7c00),
        ];
        for (to, to_f64, inf_magnitude) in formats {
            let mut out = Vec::new();
            let overflows = convert(&bytes, Dtype::F32, to, &mut out);
            let mut expected_overflows = 0;
            for (v, c) in values.iter().zip(out.chunks_exact(2)) {
                let bits = u16::from_le_bytes([c[0], c[1]]);
                assert!(
                    is_nearest(*v as f64, bits, to_f64, inf_magnitude),
                    "f32 → {to:?}: {v:e} ({:#010x}) gave {bits:#06x}",
                    v.to_bits()
                );
                expected_overflows += u64::from(bits & 0x7fff == inf_magnitude);
            }
            assert_eq!(overflows, expected_overflows, "f32 → {to:?}");
            // Widening back is exact.
            let mut back = Vec::new();
            assert_eq!(convert(&out, to, Dtype::F32, &mut back), 0);
            for (c, b) in out.chunks_exact(2).zip(back.chunks_exact(4)) {
                let wide = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                assert_eq!(wide as f64, to_f64(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        // From f64 (the generic path: initial values, means, f64 sources) the same, on
        // random values spread over both formats' ranges and on the f32 edges above.
        let mut wide: Vec<f64> = values.iter().take(1000).map(|&v| v as f64).collect();
        while wide.len() < 100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let (mantissa, exponent) = (state >> 12, (state % 300) as i32 - 150);
            wide.push(
                f64::from_bits(0x3ff0_0000_0000_0000 | mantissa)
                    * 2f64.powi(exponent)
                    * if state & 1 == 0 { 1.0 } else { -1.0 },
            );
        }
        for (to, to_f64, inf_magnitude) in formats {
            for &v in &wide {
                let mut out = Vec::new();
                encode(v, to, &mut out);
                let bits = u16::from_le_bytes([out[0], out[1]]);
                assert!(
                    is_nearest(v, bits, to_f64, inf_magnitude),
                    "f64 → {to:?}: {v:e} ({:#018x}) gave {bits:#06x}",
                    v.to_bits()
                );
            }
        }
        // 65519 still rounds to f16's largest value; 65520 and -1e6 overflow.
        let mut out = Vec::new();
        let edge: Vec<u8> = [65519f32, 65520.0, -1e6].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(convert(&edge, Dtype::F32, Dtype::F16, &mut out), 2);
    }

    #[test]
    fn finds_the_first_non_finite_value_in_every_float_dtype() {
        let n = 3 * 4096 + 17;
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut values: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin() * 1000.0).collect();
                let mut bytes = Vec::new();
                values.iter().for_each(|&v| encode(v, dtype, &mut bytes));
                assert_eq!(first_non_finite(&bytes, dtype), None, "{dtype:?}");
                for at in [0, 4095, 4096, n - 1] {
                    values[at] = bad;
                    bytes.clear();
                    values.iter().for_each(|&v| encode(v, dtype, &mut bytes));
                    assert_eq!(first_non_finite(&bytes, dtype), Some(at), "{dtype:?} {bad} at {at}");
                    values[at] = 1.0;
                }
            }
        }
    }
}
