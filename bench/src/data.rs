//! `mmrec-data bench`: pipeline throughput against the tokenizer alone and a Python
//! reference, on one machine in one run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mmrec_schemas::{Domain, NearDupSettings};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use anyhow::{anyhow, Context, Result};
use mmrec_pipeline::dedup::DEFAULT_NEAR_DUP;
use mmrec_pipeline::input::{read_texts, InputSpec, PlainSplit, ReadOptions};
use mmrec_pipeline::split::{split, SplitOptions, SplitReport};
use mmrec_pipeline::tokenize::LoadedTokenizer;

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub threads: usize,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub docs_per_s: f64,
    pub tokens_per_s: f64,
}

impl Throughput {
    fn new(threads: usize, seconds: f64, bytes: u64, docs: u64, tokens: u64) -> Self {
        Throughput {
            threads,
            seconds,
            mb_per_s: bytes as f64 / 1e6 / seconds,
            docs_per_s: docs as f64 / seconds,
            tokens_per_s: tokens as f64 / seconds,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    /// Runs per measurement; the fastest is reported.
    pub repeats: usize,
    pub corpus_bytes: u64,
    pub corpus_docs: u64,
    pub corpus_tokens: u64,
    pub pipeline: Vec<Throughput>,
    /// The same with `--near-dup` (default settings). The corpus is made of prefixed copies,
    /// so nearly every document is removed as a near-duplicate: documents/s counts the
    /// documents read, tokens/s the few written.
    pub pipeline_near_dup: Vec<Throughput>,
    /// The pipeline's own encoder (word-cached) alone on the same documents.
    pub tokenizer_alone: Vec<Throughput>,
    /// HF tokenizers' `encode` alone on the same documents: the baseline the cache beats.
    pub hf_encode_alone: Vec<Throughput>,
    /// Pipeline tokens/s over tokenizer-alone tokens/s at the same thread count.
    pub pipeline_vs_tokenizer: Vec<f64>,
    pub python_reference: Option<Value>,
    /// Pipeline at the most threads over the Python reference, in input MB/s.
    pub pipeline_vs_python: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gb: f64,
    pub os: String,
}

pub fn machine() -> Machine {
    Machine {
        cpu: mmrec_model::host::cpu_name(),
        cores: mmrec_model::host::cores(),
        memory_gb: mmrec_model::host::meminfo_bytes("MemTotal").unwrap_or(0) as f64 / 1e9,
        os: std::env::consts::OS.into(),
    }
}

/// Write a corpus of at least `min_bytes` from the given inputs as `{"text": ...}` JSONL,
/// one file per domain. Each pass prefixes its copy number so that no document is an
/// exact duplicate of another (dedup would otherwise skip the repeats' tokenizing).
pub fn build_corpus(sources: &[InputSpec], min_bytes: u64, dir: &Path) -> Result<Vec<InputSpec>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let opts = ReadOptions {
        field: None,
        max_bytes: u64::MAX,
        plain_split: PlainSplit::File,
    };
    let mut per_domain: Vec<(Domain, Vec<String>)> = Vec::new();
    for spec in sources {
        let domain = spec
            .declared
            .ok_or_else(|| anyhow!("bench source {} needs a declared domain", spec.path.display()))?;
        per_domain.push((domain, read_texts(std::slice::from_ref(spec), &opts)?.0));
    }
    let one_pass: u64 = per_domain
        .iter()
        .flat_map(|(_, t)| t)
        .map(|t| t.len() as u64 + 16)
        .sum();
    let passes = min_bytes.div_ceil(one_pass.max(1));
    let mut out = Vec::new();
    for (i, (domain, texts)) in per_domain.iter().enumerate() {
        // One file per source: two sources of one domain must not overwrite each other.
        let path = dir.join(format!("{domain}-{i}.jsonl"));
        let mut buf = Vec::new();
        for pass in 0..passes {
            for t in texts {
                serde_json::to_writer(&mut buf, &serde_json::json!({ "text": format!("[{pass}] {t}") })).expect("json");
                buf.push(b'\n');
            }
        }
        std::fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
        out.push(InputSpec {
            path,
            declared: Some(*domain),
        });
    }
    Ok(out)
}

/// Each measurement is repeated `repeats` times, interleaved (pipeline, tokenizer,
/// pipeline, ...), and the fastest run is reported: on a shared VM the slow outliers are
/// other tenants, not the code.
pub fn run(
    corpus: &[InputSpec],
    tokenizer: &Path,
    work: &Path,
    python: Option<(&Path, &Path)>,
    threads: &[usize],
    repeats: usize,
) -> Result<BenchReport> {
    let texts = read_texts(corpus, &BENCH_READ)?.0;
    let mut report = BenchReport {
        machine: machine(),
        repeats,
        corpus_bytes: corpus
            .iter()
            .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
            .sum(),
        corpus_docs: 0,
        corpus_tokens: 0,
        pipeline: Vec::new(),
        pipeline_near_dup: Vec::new(),
        tokenizer_alone: Vec::new(),
        hf_encode_alone: Vec::new(),
        pipeline_vs_tokenizer: Vec::new(),
        python_reference: None,
        pipeline_vs_python: None,
    };
    for &n in threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| anyhow!(e.to_string()))?;
        let mut best_pipeline: Option<Throughput> = None;
        let mut best_tokenizer: Option<Throughput> = None;
        let mut best_hf: Option<Throughput> = None;
        let mut best_near_dup: Option<Throughput> = None;
        let timer = Timer {
            pool: &pool,
            corpus,
            tokenizer,
            work,
            threads: n,
            corpus_bytes: report.corpus_bytes,
        };
        for _ in 0..repeats.max(1) {
            let (secs, r) = timer.split(None)?;
            let t = &r.manifest.totals;
            (report.corpus_docs, report.corpus_tokens) = (t.written, t.tokens);
            keep_fastest(&mut best_pipeline, timer.throughput(secs, t.written, t.tokens));
            let (secs, r) = timer.split(Some(DEFAULT_NEAR_DUP))?;
            let t = &r.manifest.totals;
            keep_fastest(&mut best_near_dup, timer.throughput(secs, t.records_in, t.tokens));
            let ours = timer.encode(&texts, &|tok, t| tok.encode(t).map_or(0, |v| v.len() as u64))?;
            keep_fastest(&mut best_tokenizer, ours);
            let hf = timer.encode(&texts, &|tok, t| {
                tok.tokenizer.encode_fast(t, false).map_or(0, |e| e.len() as u64)
            })?;
            keep_fastest(&mut best_hf, hf);
        }
        report.hf_encode_alone.extend(best_hf);
        report.pipeline.extend(best_pipeline);
        report.pipeline_near_dup.extend(best_near_dup);
        report.tokenizer_alone.extend(best_tokenizer);
    }
    report.pipeline_vs_tokenizer = report
        .pipeline
        .iter()
        .zip(&report.tokenizer_alone)
        .map(|(p, t)| p.tokens_per_s / t.tokens_per_s)
        .collect();
    if let Some((python, script)) = python {
        let out = work.join("python-out");
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script)
            .arg(tokenizer)
            .arg(&out)
            .args(corpus.iter().map(|s| &s.path));
        let v = python_reference_json(cmd)?;
        let py_mb_s = v["input_bytes"].as_f64().unwrap_or(0.0) / 1e6 / v["seconds"].as_f64().unwrap_or(f64::INFINITY);
        report.pipeline_vs_python = report.pipeline.last().map(|p| p.mb_per_s / py_mb_s);
        report.python_reference = Some(v);
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(report)
}

/// Times one thread count's runs over one corpus.
struct Timer<'a> {
    pool: &'a rayon::ThreadPool,
    corpus: &'a [InputSpec],
    tokenizer: &'a Path,
    work: &'a Path,
    threads: usize,
    corpus_bytes: u64,
}

impl Timer<'_> {
    fn throughput(&self, secs: f64, docs: u64, tokens: u64) -> Throughput {
        Throughput::new(self.threads, secs, self.corpus_bytes, docs, tokens)
    }

    /// One `split` of the corpus into a scratch directory: seconds and its report.
    fn split(&self, near_dup: Option<NearDupSettings>) -> Result<(f64, SplitReport)> {
        let out = self.work.join(format!("shards-{}", self.threads));
        let _ = std::fs::remove_dir_all(&out);
        let opts = SplitOptions {
            near_dup,
            read: BENCH_READ,
            ..SplitOptions::new(self.corpus.to_vec(), self.tokenizer.to_path_buf(), out.clone())
        };
        let started = Instant::now();
        let r = self.pool.install(|| split(&opts, &()))?;
        let secs = started.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&out);
        Ok((secs, r))
    }

    /// A tokenizer alone on the same documents, already in memory, freshly loaded as
    /// `split` loads it (so its word cache starts cold).
    fn encode(&self, texts: &[String], count: &(dyn Fn(&LoadedTokenizer, &str) -> u64 + Sync)) -> Result<Throughput> {
        let tok = LoadedTokenizer::load(self.tokenizer)?;
        let started = Instant::now();
        let tokens: u64 = self.pool.install(|| {
            texts
                .par_iter()
                .with_max_len(mmrec_pipeline::DOCS_PER_TASK)
                .map(|t| count(&tok, t))
                .sum()
        });
        Ok(self.throughput(started.elapsed().as_secs_f64(), texts.len() as u64, tokens))
    }
}

/// Run a Python reference script and parse the JSON it prints.
fn python_reference_json(mut cmd: std::process::Command) -> Result<Value> {
    let o = cmd
        .output()
        .map_err(|e| anyhow!("running {}: {e}", cmd.get_program().to_string_lossy()))?;
    if !o.status.success() {
        return Err(anyhow!(
            "python reference failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    serde_json::from_slice(o.stdout.trim_ascii()).map_err(|e| anyhow!("python reference printed no JSON: {e}"))
}

fn keep_fastest(best: &mut Option<Throughput>, t: Throughput) {
    if best.as_ref().is_none_or(|b| t.seconds < b.seconds) {
        *best = Some(t);
    }
}

/// How the bench reads its corpus, in `split` and for the tokenizers alone alike.
const BENCH_READ: ReadOptions = ReadOptions {
    field: None,
    max_bytes: 64 << 20,
    plain_split: PlainSplit::File,
};

pub fn default_work_dir() -> PathBuf {
    std::env::temp_dir().join("mmrec-data-bench")
}

#[derive(Debug, Serialize)]
pub struct LoaderBench {
    pub machine: Machine,
    pub shard_tokens: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    pub tokens_per_run: u64,
    pub rust: Vec<Value>,
    pub python_reference: Option<Value>,
    /// Rust at the most workers over the Python reference, in tokens/s.
    pub rust_vs_python: Option<f64>,
}

/// Tokens/s the loader delivers to a consumer that does nothing else, per worker count.
pub fn loader_bench(
    dir: &Path,
    seq_len: usize,
    batch_size: usize,
    workers: &[usize],
    tokens: u64,
    python: Option<(&Path, &Path)>,
) -> Result<LoaderBench> {
    use mmrec_loader::{Loader, LoaderConfig};
    let manifest = mmrec_schemas::read_manifest(dir)?;
    let mut rust = Vec::new();
    for &w in workers {
        let cfg = LoaderConfig {
            seq_len,
            batch_size,
            workers: w,
            prefetch: 16,
            lookahead: 2 * w.max(1),
            ..LoaderConfig::default()
        };
        let mut loader = Loader::open(&[dir.to_path_buf()], cfg, None)?;
        let started = Instant::now();
        let mut got = 0u64;
        while got < tokens {
            let b = loader.next_batch().ok_or_else(|| anyhow!("loader ended"))??;
            got += b.tokens.len() as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        rust.push(serde_json::json!({"workers": w, "tokens": got, "seconds": secs, "tokens_per_s": got as f64 / secs, "consumer_wait_pct": 100.0 * loader.waited().as_secs_f64() / secs}));
    }
    let mut python_reference = None;
    let mut rust_vs_python = None;
    if let Some((py, script)) = python {
        let mut cmd = std::process::Command::new(py);
        cmd.arg(script).arg(dir).args([
            seq_len.to_string(),
            batch_size.to_string(),
            "2".into(),
            tokens.to_string(),
        ]);
        let v = python_reference_json(cmd)?;
        rust_vs_python = rust
            .last()
            .and_then(|r| Some(r["tokens_per_s"].as_f64()? / v["tokens_per_s"].as_f64()?));
        python_reference = Some(v);
    }
    Ok(LoaderBench {
        machine: machine(),
        shard_tokens: manifest.totals.tokens,
        seq_len,
        batch_size,
        tokens_per_run: tokens,
        rust,
        python_reference,
        rust_vs_python,
    })
}
