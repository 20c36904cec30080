//! `mmrec-data`: turn raw corpora into tokenized Parquet shards, and check them.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mmrec_pipeline::catalog::{inspect, merge, validate};
use mmrec_pipeline::dedup::DEFAULT_NEAR_DUP;
use mmrec_pipeline::input::{read_texts, DeclaredInputs};
use mmrec_pipeline::tokenize::train_bpe;
use mmrec_pipeline::{split, InputSpec, PlainSplit, Progress, ReadOptions, SplitOptions};
use mmrec_schemas::{Domain, NearDupSettings, Partition};

#[derive(Parser)]
#[command(
    name = "mmrec-data",
    version,
    about = "Raw corpora to validated, classified, tokenized Parquet shards for MM-Rec"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Read, validate, classify, deduplicate and tokenize inputs into shards/{text,code,mixed}/.
    ///
    /// Inputs may be JSONL (a JSON string, an object with a text field, or a chat object
    /// with "messages" per line), plain text, Parquet with a text column, or a directory
    /// (a source tree: every file is one document), each optionally .gz or .zst.
    Split(SplitArgs),
    /// Summarise a shard directory: totals, per-domain counts, sample documents.
    Inspect {
        dir: PathBuf,
        /// Sample documents shown per domain.
        #[arg(long, default_value_t = 2)]
        samples: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a shard directory: checksums, schema, per-row invariants and counts.
    /// Exits 1 on any mismatch.
    Validate {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Combine the output directories of a partitioned run (--part i/n for every i); with
    /// --near-dup parts, also remove near-duplicates across parts (rewriting the shards
    /// that lose documents).
    Merge {
        /// The part directories, in any order.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE with <|endoftext|> and <|pad|> specials, offline.
    Train {
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        out: PathBuf,
        /// Text field of JSONL objects (default: text, then content).
        #[arg(long)]
        field: Option<String>,
        /// Corpora to learn from, in any format `split` reads.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct SplitArgs {
    #[command(flatten)]
    declared: DeclaredInputs,
    /// Inputs classified per document (metadata first, then content).
    #[arg(long, num_args = 1.., value_name = "PATH")]
    auto: Vec<PathBuf>,
    /// tokenizer.json (any HF tokenizers file).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Text field of JSONL objects and Parquet files (default: text, then content).
    #[arg(long)]
    field: Option<String>,
    /// Documents and source files larger than this many bytes are quarantined.
    #[arg(long, default_value_t = 4 << 20)]
    max_bytes: u64,
    /// Read what symbolic links inside input directories point to (default: quarantine
    /// them as `symlink`; links that loop are quarantined either way).
    #[arg(long)]
    follow_symlinks: bool,
    /// Document text (MB) kept in memory between split's two passes: inputs that fit are not
    /// read a second time. Kept text costs more memory than its size (262 MB of it added
    /// 0.45 GB of peak RSS in one measurement); 0 re-reads everything.
    #[arg(long, default_value_t = 512)]
    keep_text_mb: u64,
    /// How plain-text files are cut into documents.
    #[arg(long, value_enum, default_value_t = PlainSplit::File)]
    plain_split: PlainSplit,
    /// Also remove near-duplicates (MinHash + LSH over word 3-grams).
    #[arg(long)]
    near_dup: bool,
    /// Estimated Jaccard similarity at which a document counts as a near-duplicate.
    #[arg(long, default_value_t = DEFAULT_NEAR_DUP.threshold)]
    near_dup_threshold: f64,
    /// Documents per shard file, at most.
    #[arg(long, default_value_t = 50_000)]
    shard_docs: usize,
    /// MiB of text per shard file, at most (a larger document gets a shard of its own).
    #[arg(long, default_value_t = 256)]
    shard_mb: u64,
    /// Documents per Parquet row group, at most.
    #[arg(long, default_value_t = 2048)]
    row_group_docs: usize,
    /// MiB of text per row group, at most. A row group is held in memory while it is
    /// written (about three times its text), two at a time per shard being written.
    #[arg(long, default_value_t = 8)]
    row_group_mb: u64,
    /// Process only partition i of n (by document hash), e.g. 0/4, for multi-machine runs.
    #[arg(long, default_value = "0/1")]
    part: Partition,
    /// Worker threads (default: all cores). Output is identical for any value.
    #[arg(long)]
    threads: Option<usize>,
    /// Seed for the near-duplicate hash family.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Exit with status 3 if any record was quarantined.
    #[arg(long)]
    strict: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // Die quietly like other Unix tools when the reader goes away (`| head`), instead of
    // panicking on the failed write.
    sigpipe::reset();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Tokenizer(TokenizerCommand::Train {
            vocab_size,
            min_frequency,
            out,
            field,
            inputs,
        }) => train_tokenizer(inputs, field, vocab_size, min_frequency, &out),
        Command::Split(args) => split_command(args),
        Command::Inspect { dir, samples, json } => inspect_command(&dir, samples, json),
        Command::Validate { dir, json } => {
            let v = validate(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for p in &v.problems {
                    println!("problem: {p}");
                }
                println!(
                    "{}: {} shards, {} documents, {} tokens: {}",
                    dir.display(),
                    v.shards,
                    v.rows,
                    v.tokens,
                    if v.ok() { "OK" } else { "INVALID" }
                );
            }
            Ok(if v.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Merge { parts, out } => {
            let m = merge(&parts, &out)?;
            println!(
                "merged {} parts into {}: {} documents, {} tokens; {} exact + {} near duplicates removed in all",
                parts.len(),
                out.display(),
                m.totals.written,
                m.totals.tokens,
                m.totals.exact_duplicates,
                m.totals.near_duplicates
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn train_tokenizer(
    inputs: Vec<PathBuf>,
    field: Option<String>,
    vocab_size: usize,
    min_frequency: u64,
    out: &Path,
) -> Result<ExitCode> {
    let specs: Vec<InputSpec> = inputs
        .into_iter()
        .map(|path| InputSpec { path, declared: None })
        .collect();
    let opts = ReadOptions {
        field,
        max_bytes: u64::MAX,
        plain_split: PlainSplit::File,
    };
    let (texts, files) = read_texts(&specs, &opts)?;
    let n = texts.len();
    train_bpe(texts.into_iter(), vocab_size, min_frequency, out)
        .with_context(|| format!("training a tokenizer into {}", out.display()))?;
    // The trainer stops early when the corpus has fewer merges to offer: report
    // what was written, not what was asked for.
    let written = mmrec_pipeline::tokenize::LoadedTokenizer::load(out)?.info.vocab_size;
    let short = if written < vocab_size {
        format!(" (asked for {vocab_size}: the corpus offers no more merges at --min-frequency {min_frequency})")
    } else {
        String::new()
    };
    eprintln!(
        "trained a {written}-entry byte-level BPE{short} on {n} documents from {files} files: {}",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect_command(dir: &Path, samples: usize, json: bool) -> Result<ExitCode> {
    let ins = inspect(dir, samples, 300)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
        return Ok(ExitCode::SUCCESS);
    }
    let m = &ins.manifest;
    let t = &m.totals;
    println!(
        "{}: {} documents, {} tokens, {} text bytes (schema v{}, {})",
        dir.display(),
        t.written,
        t.tokens,
        t.text_bytes,
        m.schema_version,
        m.tool_version
    );
    println!(
        "tokenizer {} (vocab {}, {:?} tokens, sha256 {})",
        m.tokenizer.path,
        m.tokenizer.vocab_size,
        m.tokenizer.token_width,
        &m.tokenizer.sha256[..12]
    );
    println!(
        "records in {} = written {} + exact duplicates {} + near duplicates {} + quarantined {}",
        t.records_in, t.written, t.exact_duplicates, t.near_duplicates, t.quarantined
    );
    for (reason, n) in &m.rejected.by_reason {
        println!("  quarantined {reason}: {n}");
    }
    println!(
        "{:<6} {:>6} {:>10} {:>12} {:>12}",
        "domain", "shards", "documents", "tokens", "text bytes"
    );
    for (d, dt) in &t.per_domain {
        println!(
            "{:<6} {:>6} {:>10} {:>12} {:>12}",
            d.as_str(),
            m.domains.get(d).map_or(0, Vec::len),
            dt.documents,
            dt.tokens,
            dt.text_bytes
        );
    }
    for (d, samples) in &ins.samples {
        for s in samples {
            println!(
                "\n--- {d} sample {} (lang {}, {} tokens)\n{}",
                s.id,
                s.lang.as_deref().unwrap_or("-"),
                s.n_tokens,
                s.text
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn split_command(a: SplitArgs) -> Result<ExitCode> {
    let mut inputs = a.declared.specs();
    inputs.extend(a.auto.into_iter().map(|path| InputSpec { path, declared: None }));
    if inputs.is_empty() {
        bail!("no inputs: give at least one of --text, --code, --mixed, --auto");
    }
    if !(0.0..=1.0).contains(&a.near_dup_threshold) {
        bail!("--near-dup-threshold must be between 0 and 1");
    }
    let opts = SplitOptions {
        inputs,
        tokenizer: a.tokenizer,
        out: a.out,
        read: ReadOptions {
            field: a.field,
            max_bytes: a.max_bytes,
            plain_split: a.plain_split,
        },
        near_dup: a.near_dup.then_some(NearDupSettings {
            threshold: a.near_dup_threshold,
            ..DEFAULT_NEAR_DUP
        }),
        shard_docs: a.shard_docs,
        row_group_docs: a.row_group_docs,
        shard_bytes: a.shard_mb << 20,
        row_group_bytes: a.row_group_mb << 20,
        partition: a.part,
        seed: a.seed,
        follow_symlinks: a.follow_symlinks,
        keep_text_bytes: a.keep_text_mb << 20,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads.unwrap_or(0))
        .build()?;
    let bar = Bar::new(!a.json && std::io::stderr().is_terminal());
    let report = pool
        .install(|| split(&opts, &bar))
        .with_context(|| format!("splitting into {}", opts.out.display()))?;
    bar.bar.finish_and_clear();
    let t = &report.manifest.totals;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mb = report.input_bytes as f64 / 1e6;
        eprintln!(
            "{}: {} documents ({} text, {} code, {} mixed), {} tokens; {} exact + {} near duplicates removed, {} quarantined ({}); {} shards written, {} kept from an earlier run; {:.1} MB in {:.1} s ({:.1} MB/s, {:.0} tokens/s)",
            report.out.display(),
            t.written,
            t.per_domain.get(&Domain::Text).map_or(0, |d| d.documents),
            t.per_domain.get(&Domain::Code).map_or(0, |d| d.documents),
            t.per_domain.get(&Domain::Mixed).map_or(0, |d| d.documents),
            t.tokens,
            t.exact_duplicates,
            t.near_duplicates,
            t.quarantined,
            report.out.join(&report.manifest.rejected.quarantine_file).display(),
            report.shards_written,
            report.shards_kept,
            mb,
            report.seconds,
            mb / report.seconds,
            t.tokens as f64 / report.seconds,
        );
        let settings = &report.manifest.settings;
        if settings.near_dup.is_some() && settings.partition.count > 1 {
            eprintln!(
                "near-duplicates across parts are removed by `mmrec-data merge` (signatures in {})",
                report.out.join(mmrec_pipeline::global_dedup::SIGNATURES).display()
            );
        }
    }
    if a.strict && t.quarantined > 0 {
        eprintln!("error: --strict: {} records were quarantined", t.quarantined);
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// indicatif bar: bytes with MB/s and ETA, plus documents/s and tokens/s in the message.
struct Bar {
    bar: ProgressBar,
    started: std::sync::Mutex<Instant>,
    docs: AtomicU64,
    tokens: AtomicU64,
}

impl Bar {
    fn new(visible: bool) -> Self {
        let bar = if visible {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        Bar {
            bar,
            started: std::sync::Mutex::new(Instant::now()),
            docs: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        }
    }
}

impl Progress for Bar {
    fn phase(&self, name: &'static str, total_bytes: u64) {
        *self.started.lock().expect("progress lock") = Instant::now();
        self.docs.store(0, Ordering::Relaxed);
        self.tokens.store(0, Ordering::Relaxed);
        self.bar.set_prefix(name);
        self.bar.set_length(total_bytes);
        self.bar.set_position(0);
    }

    fn advance(&self, bytes: u64, docs: u64, tokens: u64) {
        self.bar.inc(bytes);
        let d = self.docs.fetch_add(docs, Ordering::Relaxed) + docs;
        let t = self.tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        if docs > 0 && d % 64 == 0 {
            let secs = self
                .started
                .lock()
                .expect("progress lock")
                .elapsed()
                .as_secs_f64()
                .max(1e-9);
            self.bar.set_message(format!(
                "{:.0} docs/s {:.2} Mtok/s",
                d as f64 / secs,
                t as f64 / secs / 1e6
            ));
        }
    }
}
