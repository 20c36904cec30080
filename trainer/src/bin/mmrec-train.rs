//! `mmrec-train`: train and evaluate MM-Rec models.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mmrec_loader::{LoaderConfig, Split};
use mmrec_schemas::checkpoint::saved_config;
use mmrec_schemas::{ModelMeta, Role};
use mmrec_trainer::train::{evaluate_net, load_net, Init, Precision, Session, TrainConfig};

#[derive(Parser)]
#[command(
    name = "mmrec-train",
    version,
    about = "Train and evaluate MM-Rec models (benchmarks: mmrec-bench model)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to run: cpu, cuda (GPU 0), cuda:N, or auto (a GPU when this binary has CUDA
    /// and one is present, else the CPU).
    #[arg(long, global = true, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a base model from scratch on mixed data.
    Pretrain(RunArgs),
    /// Fine-tune a transferred expert (its `frozen` metadata is honoured).
    Finetune {
        /// The expert (or base) model file to start from.
        #[arg(long)]
        init: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Train only the fusion layer of a fused model; everything else is frozen.
    Fusion {
        #[arg(long)]
        init: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// The benchmark suite: block, layer and model times, training tokens/s and peak
    /// memory per preset, precision and sequence length; fused against separate
    /// projections; scaling with sequence length and batch; the memory plan. Writes
    /// OUT/benchmark_results.json and charts beside it.
    Bench(BenchArgs),
    /// Data parallelism on this host: start `--procs` copies of an `mmrec-train` training
    /// command, one per rank (each with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    /// MASTER_PORT, as torchrun sets them), forward SIGINT and SIGTERM to them, and exit
    /// with the status of the first rank that fails (stopping the others).
    Launch {
        /// Ranks (one per GPU on a GPU machine: rank r trains on cuda:r with --device cuda).
        #[arg(long, visible_alias = "gpus")]
        procs: usize,
        /// The port rank 0 waits for the others on (default: a free one).
        #[arg(long)]
        master_port: Option<u16>,
        /// The training command, after `--`: `-- pretrain --data D --out O ...`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Write a freshly initialised base model (seeded) without training it.
    Init {
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        vocab: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss and perplexity per domain on the held-out split of shard directories.
    Eval(EvalArgs),
    /// Draw runs' training and validation loss and learning rate (from each run's
    /// metrics.jsonl) on one PNG.
    Plot {
        /// Run directories (or metrics.jsonl files); each is one coloured curve.
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        #[arg(long, default_value = "loss.png")]
        out: PathBuf,
        /// The horizontal axis: optimiser steps, training tokens seen, or training wall
        /// time (to compare runs whose steps differ in size or speed).
        #[arg(long, value_enum, default_value = "step")]
        x: mmrec_trainer::plot::XAxis,
    },
    /// Write text with a model: the prompt through the parallel scan once, then one token
    /// at a time with the carried state (O(1) per token), streamed to stdout.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// A base, expert or fused model file.
    #[arg(long)]
    model: PathBuf,
    /// The tokenizer the model was trained with (its sha256 is checked against the model's).
    #[arg(long)]
    tokenizer: PathBuf,
    /// The text to continue.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// A file whose text to continue.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Draw from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Draw from the most likely tokens holding this much probability (1: all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate although the model records another tokenizer.
    #[arg(long)]
    allow_tokenizer_mismatch: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long = "data", required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Held-out share in per mille: must match training's data.val_permille.
    #[arg(long, default_value_t = 20)]
    val_permille: u32,
    /// Domains to evaluate.
    #[arg(long, default_value = "text=1,code=1,mixed=1")]
    domains: String,
    /// At most this many batches per domain (0: the whole held-out split).
    #[arg(long, default_value_t = 0)]
    max_batches: usize,
    #[arg(long)]
    json: bool,
    /// Evaluate although the model was trained with another tokenizer (of the same
    /// size) than the shards were made with.
    #[arg(long)]
    allow_tokenizer_mismatch: bool,
    /// Instead of packed rows: stream each held-out document (up to this many tokens)
    /// through the model with the state carried, and report the loss per position bucket
    /// (0-512, 512-2k, 2k-8k, 8k-32k, 32k-128k, beyond).
    #[arg(long, default_value_t = 0)]
    context_len: usize,
    /// With --context-len: draw loss against position (log scale) into this PNG.
    #[arg(long, requires = "context_len")]
    plot: Option<PathBuf>,
    /// With --context-len: only documents of at least this many tokens (long ones, to see
    /// whether a longer context helps).
    #[arg(long, requires = "context_len", default_value_t = 0)]
    min_doc_tokens: usize,
}

#[derive(Args)]
struct RunArgs {
    /// TOML config (sections model, data, optim, run); every field has a default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config field, e.g. --set optim.lr=1e-4 --set run.steps=200.
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    set: Vec<String>,
    /// Shard directories (shorthand for data.dirs).
    #[arg(long = "data", num_args = 1..)]
    data: Vec<PathBuf>,
    /// Output directory (shorthand for run.out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the latest checkpoint under the output directory, if any.
    #[arg(long)]
    resume: bool,
    /// Print one JSON line per step instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Compute precision (shorthand for run.precision): f32, or bf16 mixed precision.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Go on although the model was trained with another tokenizer (of the same size) than
    /// the shards were made with (shorthand for run.allow_tokenizer_mismatch).
    #[arg(long)]
    allow_tokenizer_mismatch: bool,
}

impl RunArgs {
    /// The shorthand flags, on top of the config file and `--set`.
    fn apply(&self, cfg: &mut TrainConfig) {
        if !self.data.is_empty() {
            cfg.data.dirs = self.data.clone();
        }
        if let Some(out) = &self.out {
            cfg.run.out = out.clone();
        }
        if let Some(p) = self.precision {
            cfg.run.precision = p;
        }
        cfg.run.allow_tokenizer_mismatch |= self.allow_tokenizer_mismatch;
    }
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
    if let Command::Launch {
        procs,
        master_port,
        command,
    } = &cli.command
    {
        return launch(*procs, *master_port, command);
    }
    let dev = mmrec_model::device::parse(&rank_device(&cli.device)).map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Launch { .. } => unreachable!("handled above"),
        Command::Pretrain(run) => train(run, Init::Fresh, &dev),
        Command::Finetune { init, run } => train(run, Init::Model(init), &dev),
        Command::Fusion { init, run } => train(run, Init::Fused(init), &dev),
        Command::Eval(args) => eval_command(args, &dev),
        Command::Generate(args) => generate_command(args, &dev),
        Command::Plot { runs, out, x } => {
            let curves = runs
                .iter()
                .map(|r| mmrec_trainer::plot::read_run(r, x))
                .collect::<Result<Vec<_>, _>>()?;
            mmrec_trainer::plot::loss_chart(&curves, x, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench_command(args, &dev),
        Command::Init {
            preset,
            vocab,
            seed,
            out,
        } => {
            let cfg = mmrec_model::preset(&preset, vocab)
                .ok_or_else(|| anyhow::anyhow!("unknown preset {preset:?} ({})", mmrec_model::PRESETS.join(", ")))?;
            let vm = candle_nn::VarMap::new();
            mmrec_model::MMRecModel::new(
                &cfg,
                mmrec_model::model::seeded_builder(&vm, seed, candle_core::DType::F32, &dev),
            )?;
            mmrec_model::initialise(&vm, &cfg)?;
            let tensors = mmrec_model::io::varmap_tensors(&vm);
            let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
            let meta = ModelMeta {
                role: Role::Base,
                domain: None,
                config: cfg,
                frozen: vec![],
                lineage: serde_json::json!({"tool": format!("mmrec-train {}", env!("CARGO_PKG_VERSION")), "init_seed": seed}),
                fusion: None,
                tokenizer: None,
            };
            mmrec_model::io::save(&out, &tensors, &meta)?;
            eprintln!("wrote {} ({params} parameters)", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn eval_command(args: EvalArgs, dev: &Device) -> Result<ExitCode> {
    let EvalArgs {
        model,
        data,
        seq_len,
        batch_size,
        val_permille,
        domains,
        max_batches,
        json,
        allow_tokenizer_mismatch,
        context_len,
        plot,
        min_doc_tokens,
    } = args;
    let meta = mmrec_schemas::safetensors::read_meta(&model)?;
    mmrec_trainer::train::check_tokenizer(&meta, &model, &data, allow_tokenizer_mismatch)?;
    let net = load_net(&model, dev).with_context(|| format!("loading {}", model.display()))?;
    let weights = mmrec_loader::parse_weights(&domains).map_err(anyhow::Error::msg)?;
    if context_len > 0 {
        let domains: Vec<_> = weights.keys().copied().collect();
        let at_length = AtLength {
            context_len,
            segment: seq_len,
            val_permille,
            min_doc_tokens,
            plot,
            json,
        };
        return eval_at_length(&net, &model, &data, &domains, &at_length, dev);
    }
    let cfg = LoaderConfig {
        seq_len,
        batch_size,
        val_permille,
        weights,
        split: Split::Validation,
        workers: 2,
        ..LoaderConfig::default()
    };
    let started = std::time::Instant::now();
    let (losses, tokens) = evaluate_net(&net, &data, &cfg, max_batches, dev)?;
    // Scoring throughput: loading, forward passes and the loss, one synchronisation per batch.
    let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let unigram = mmrec_trainer::train::unigram_entropy(&data, &cfg, max_batches)?;
    let report: serde_json::Map<String, serde_json::Value> = losses
        .iter()
        .map(|(d, l)| {
            (
                d.clone(),
                serde_json::json!({"loss": l, "perplexity": l.exp(), "unigram_entropy": unigram.get(d)}),
            )
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": model, "domains": report, "tokens": tokens, "tokens_per_s": tokens_per_s})
            )?
        );
    } else {
        println!(
            "{}   (loss in nats/token; unigram = entropy of the held-out tokens' own unigram distribution)",
            model.display()
        );
        for (d, l) in &losses {
            println!(
                "  {d:<6} loss {l:.4}  perplexity {:>9.2}  unigram {:.4}",
                l.exp(),
                unigram.get(d).copied().unwrap_or(f64::NAN)
            );
        }
        println!("  {tokens} tokens scored at {tokens_per_s:.0} tokens/s");
    }
    Ok(ExitCode::SUCCESS)
}

/// How `eval --context-len` reads documents and reports.
struct AtLength {
    context_len: usize,
    segment: usize,
    val_permille: u32,
    min_doc_tokens: usize,
    plot: Option<PathBuf>,
    json: bool,
}

/// `eval --context-len`: loss per position bucket, per domain and over all of them.
fn eval_at_length(
    net: &mmrec_trainer::train::Net,
    model: &std::path::Path,
    data: &[PathBuf],
    domains: &[mmrec_schemas::Domain],
    how: &AtLength,
    dev: &Device,
) -> Result<ExitCode> {
    use mmrec_trainer::context::{buckets, curve, position_losses};
    let mut docs = mmrec_loader::held_out_documents(data, domains, how.val_permille)?;
    docs.retain(|(_, tokens)| tokens.len() >= how.min_doc_tokens);
    if docs.is_empty() {
        anyhow::bail!(
            "no held-out documents of at least {} tokens in {}",
            how.min_doc_tokens,
            data.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!(
        "{} held-out documents of at least {} tokens",
        docs.len(),
        how.min_doc_tokens
    );
    let mut report = serde_json::Map::new();
    let mut curves = Vec::new();
    let mut all = Vec::new();
    for d in domains.iter().map(Some).chain([None]) {
        let raw = match d {
            Some(d) => {
                let mine: Vec<Vec<u32>> = docs.iter().filter(|(x, _)| x == d).map(|(_, t)| t.clone()).collect();
                let raw = position_losses(net, &mine, how.context_len, how.segment, dev)?;
                all.extend_from_slice(&raw);
                raw
            }
            None => std::mem::take(&mut all),
        };
        let name = d.map_or_else(|| "all".to_string(), |d| d.to_string());
        let c = curve(&raw);
        report.insert(name.clone(), serde_json::to_value(buckets(&raw))?);
        curves.push((name, c.points()));
    }
    if let Some(path) = &how.plot {
        mmrec_trainer::plot::position_chart(&curves, path)?;
    }
    if how.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": model, "context_len": how.context_len, "segment": how.segment,
                    "min_doc_tokens": how.min_doc_tokens, "documents": docs.len(), "by_position": report})
            )?
        );
    } else {
        println!(
            "{}: held-out loss (nats/token) by tokens of context before the predicted token",
            model.display()
        );
        for (name, buckets) in &report {
            let cells: Vec<String> = serde_json::from_value::<Vec<serde_json::Value>>(buckets.clone())?
                .iter()
                .filter(|b| b["tokens"].as_u64() > Some(0))
                .map(|b| {
                    format!(
                        "{}-{}: {:.3} ({} tok)",
                        b["from"],
                        b["to"],
                        b["loss"].as_f64().unwrap_or(f64::NAN),
                        b["tokens"]
                    )
                })
                .collect();
            println!("  {name:<6} {}", cells.join("  "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn generate_command(a: GenerateArgs, dev: &Device) -> Result<ExitCode> {
    use std::io::Write;
    let meta = mmrec_schemas::safetensors::read_meta(&a.model)?;
    let (sha, _) = mmrec_schemas::atomic::file_sha256(&a.tokenizer)?;
    if meta.tokenizer.as_ref().is_some_and(|t| *t != sha) && !a.allow_tokenizer_mismatch {
        anyhow::bail!(
            "{} was trained with another tokenizer than {} (sha256 {} against {sha}); --allow-tokenizer-mismatch goes on anyway",
            a.model.display(),
            a.tokenizer.display(),
            meta.tokenizer.as_deref().unwrap_or("")
        );
    }
    let tok = tokenizers::Tokenizer::from_file(&a.tokenizer)
        .map_err(|e| anyhow::anyhow!("reading the tokenizer {}: {e}", a.tokenizer.display()))?;
    if tok.get_vocab_size(true) != meta.config.vocab_size {
        anyhow::bail!(
            "{} has {} tokens, the model a vocabulary of {}",
            a.tokenizer.display(),
            tok.get_vocab_size(true),
            meta.config.vocab_size
        );
    }
    let text = match (a.prompt, &a.prompt_file) {
        (Some(p), _) => p,
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => anyhow::bail!("give the text to continue: --prompt TEXT or --prompt-file FILE"),
    };
    // Training documents follow a separator: so does the prompt.
    let eot = tok.token_to_id("<|endoftext|>");
    let encoded = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    let prompt: Vec<u32> = eot.into_iter().chain(encoded.get_ids().iter().copied()).collect();
    let net = load_net(&a.model, dev).with_context(|| format!("loading {}", a.model.display()))?;
    let sampling = mmrec_trainer::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{text}")?;
    // Each token's text is the growth of the decoded whole: a character split over two
    // tokens decodes to U+FFFD until its second token arrives.
    let (mut ids, mut shown, mut failed) = (Vec::new(), String::new(), None);
    let done = mmrec_trainer::generate::generate(&net, &prompt, a.max_tokens, &sampling, eot, |t| {
        if Some(t) == eot {
            return std::ops::ControlFlow::Continue(());
        }
        ids.push(t);
        let shown_now = match tok.decode(&ids, false) {
            Ok(s) => s,
            Err(e) => {
                failed = Some(anyhow::anyhow!("decoding: {e}"));
                return std::ops::ControlFlow::Break(());
            }
        };
        if !shown_now.ends_with('\u{FFFD}') {
            if let Some(new) = shown_now.strip_prefix(shown.as_str()) {
                if let Err(e) = write!(out, "{new}").and_then(|()| out.flush()) {
                    failed = Some(e.into());
                    return std::ops::ControlFlow::Break(());
                }
            }
            shown = shown_now;
        }
        std::ops::ControlFlow::Continue(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    writeln!(out)?;
    eprintln!(
        "{} prompt tokens in {:.2} s; {} tokens generated at {:.1} tokens/s (seed {})",
        done.prompt_tokens,
        done.prompt_secs,
        done.tokens.len(),
        done.tokens.len().saturating_sub(1) as f64 / done.decode_secs.max(1e-9),
        a.seed
    );
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(total: u64, at: u64, hidden: bool) -> ProgressBar {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("{pos}/{len} [{bar:30}] ETA {eta} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(at);
    bar
}

/// One metrics record: a JSON line with `--json`, else the progress bar's position and
/// message, with validations and events printed above it.
fn show_record(rec: &serde_json::Value, bar: &ProgressBar, json: bool) {
    if json {
        println!("{rec}");
    } else if let Some(val) = rec.get("val") {
        bar.println(format!("step {} validation {}", rec["step"], val));
    } else if let Some(t) = rec.get("batch_trial") {
        bar.println(format!(
            "batch search: {} rows{}: {} ({}, {} MB)",
            t["rows"],
            if t["grad_checkpointing"] == true {
                " with checkpointing"
            } else {
                ""
            },
            t["tokens_per_s"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0} tok/s")),
            t["outcome"].as_str().unwrap_or("?"),
            t["memory_mb"]
        ));
    } else {
        bar.set_position(rec["step"].as_u64().unwrap_or(0));
        let tps = rec
            .get("tokens_per_s")
            .and_then(|v| v.as_f64())
            .map(|v| format!(" {v:.0} tok/s"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4} lr {:.2e}{tps}",
            rec["loss"].as_f64().unwrap_or(f64::NAN),
            rec["lr"].as_f64().unwrap_or(0.0)
        ));
        if let Some(ev) = rec.get("event") {
            bar.println(format!("step {}: {}", rec["step"], ev));
        }
    }
}

fn train(args: RunArgs, init: Init, dev: &Device) -> Result<ExitCode> {
    let mut cfg = TrainConfig::load(args.config.as_deref(), &args.set)?;
    if args.resume {
        // Resume from the directory this run names, with its config and this run's
        // overrides on top (changes to what is being trained are refused).
        let out = args.out.as_deref().unwrap_or(&cfg.run.out);
        if let Some(saved) = saved_config(out)? {
            cfg = TrainConfig::for_resume(&saved, args.config.as_deref(), &args.set)?;
        }
    }
    args.apply(&mut cfg);
    let mut session = Session::new(cfg, init, args.resume, dev)?;
    let mc = &session.meta.config;
    // A finetune or fusion takes its shape from the init file, not from [model] preset.
    let shape = match session.state.mode.as_str() {
        "pretrain" => String::new(),
        _ => format!(
            "; the model's shape from the init file: d_model {}, {} layers, vocabulary {} ([model] preset does not apply)",
            mc.d_model, mc.n_layers, mc.vocab_size
        ),
    };
    let ranks = match session.data_parallel() {
        Some((rank, size, backend)) => format!("; data parallel: rank {rank} of {size}, {backend:?}"),
        None => String::new(),
    };
    eprintln!(
        "# {} from step {} ({} trainable tensors, frozen: {:?}{shape}{ranks})\n{}",
        session.state.mode,
        session.state.step,
        session.opt.params.len(),
        session.meta.frozen,
        session.cfg.to_toml()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)
            .context("installing the signal handler")?;
    }
    let bar = progress_bar(session.cfg.run.steps, session.state.step, args.json);
    let json = args.json;
    let summary = session.train(&stop, &|rec| show_record(rec, &bar, json))?;
    bar.finish_and_clear();
    eprintln!(
        "{} steps, {} tokens in {:.1} s{}{}; best validation loss {}; model: {}",
        summary.steps,
        summary.tokens,
        summary.seconds,
        if summary.stopped_early { " (stopped early)" } else { "" },
        if summary.interrupted {
            " (interrupted: checkpoint saved, --resume continues)"
        } else {
            ""
        },
        summary.best_val.map_or("-".into(), |v| format!("{v:.4}")),
        match (&summary.final_model, summary.interrupted) {
            (Some(path), _) => path.display().to_string(),
            (None, true) => "none written (interrupted)".into(),
            (None, false) => "written by rank 0".into(),
        }
    );
    // Interrupted work is not success: 128 + the signal, as shells report it.
    Ok(match signal.load(Ordering::Relaxed) {
        0 => ExitCode::SUCCESS,
        sig => ExitCode::from(128 + sig as u8),
    })
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    presets: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    precision: Vec<Precision>,
    /// Sequence lengths of the per-preset figures and of the scaling series (the first
    /// is also the memory plan's and the batch series').
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    seq_lens: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per batch while the sequence length varies.
    #[arg(long, default_value_t = 4096)]
    scaling_tokens: usize,
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Memory (MB) the memory plan's micro-batches may use (default: the device's).
    #[arg(long, default_value_t = 0)]
    memory_mb: u64,
    /// Measure nothing: draw the charts of an earlier run's benchmark_results.json into OUT.
    #[arg(long)]
    charts_from: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

fn bench_command(a: BenchArgs, dev: &Device) -> Result<ExitCode> {
    if let Some(path) = &a.charts_from {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let results =
            serde_json::from_str(&text).with_context(|| format!("{}: not a benchmark_results.json", path.display()))?;
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        for chart in mmrec_trainer::plot::bench_charts(&results, &a.out)? {
            eprintln!("wrote {}", chart.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = mmrec_trainer::suite::SuiteConfig {
        presets: a.presets,
        precisions: a.precision,
        seq_lens: a.seq_lens,
        batch: a.batch,
        scaling_tokens: a.scaling_tokens,
        vocab: a.vocab,
        repeats: a.repeats,
        memory: a.memory_mb * 1_000_000,
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let results = mmrec_trainer::suite::run(&cfg, dev, command, &|m| eprintln!("bench: {m}"))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let json = a.out.join("benchmark_results.json");
    let text = serde_json::to_string_pretty(&results)? + "\n";
    mmrec_schemas::atomic::write_atomic(&json, text.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    for chart in mmrec_trainer::plot::bench_charts(&results, &a.out)? {
        eprintln!("wrote {}", chart.display());
    }
    eprintln!("wrote {}", json.display());
    Ok(ExitCode::SUCCESS)
}

/// A data-parallel rank's GPU for `--device cuda` (or `auto` on a GPU machine): its local
/// rank (torchrun's LOCAL_RANK or Slurm's SLURM_LOCALID) among the host's GPUs, or the
/// one GPU it sees when the launcher binds one per task through CUDA_VISIBLE_DEVICES.
fn rank_device(device: &str) -> String {
    let local = std::env::var("LOCAL_RANK").or_else(|_| std::env::var("SLURM_LOCALID"));
    let bound_to_one = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.contains(','));
    let gpu = device == "cuda" || (device == "auto" && mmrec_model::device::gpu_present());
    match local {
        Ok(local) if gpu && !bound_to_one => format!("cuda:{local}"),
        _ => device.to_string(),
    }
}

/// `mmrec-train launch`: the ranks as child processes of this one.
fn launch(procs: usize, master_port: Option<u16>, command: &[String]) -> Result<ExitCode> {
    anyhow::ensure!(procs >= 1, "--procs must be at least 1");
    let port = match master_port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    let exe = std::env::current_exe().context("finding this program")?;
    let mut ranks = Vec::with_capacity(procs);
    for rank in 0..procs {
        let child = std::process::Command::new(&exe)
            .args(command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", procs.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            // Rank 0 speaks for the job; the others' errors still reach stderr.
            .stdout(if rank == 0 {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        ranks.push(child);
    }
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)
            .context("installing the signal handler")?;
    }
    let (failed, forwarded) = supervise(&mut ranks, &signal)?;
    Ok(match (failed, forwarded) {
        (Some((rank, status)), _) => {
            eprintln!("rank {rank} failed ({status}): the other ranks were stopped");
            ExitCode::from(exit_byte(status))
        }
        (None, Some(sig)) => ExitCode::from(128 + sig as u8),
        (None, None) => ExitCode::SUCCESS,
    })
}

/// Wait for every rank: forward a signal to all of them, and when one fails stop the rest
/// (SIGTERM, then SIGKILL after 60 s). The first failure, and the signal forwarded.
type Failure = Option<(usize, std::process::ExitStatus)>;
fn supervise(ranks: &mut [std::process::Child], signal: &AtomicUsize) -> Result<(Failure, Option<usize>)> {
    let send = |child: &std::process::Child, sig: i32| {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
    };
    let mut done: Vec<Option<std::process::ExitStatus>> = vec![None; ranks.len()];
    let (mut failed, mut forwarded, mut deadline) = (None, None, None);
    while done.iter().any(Option::is_none) {
        let sig = signal.load(Ordering::Relaxed);
        // Only ranks still running: a reaped child's pid may belong to another process.
        let running = |done: &[Option<std::process::ExitStatus>], sig: i32| {
            ranks
                .iter()
                .zip(done)
                .filter(|(_, d)| d.is_none())
                .for_each(|(c, _)| send(c, sig));
        };
        if sig != 0 && forwarded.is_none() {
            running(&done, sig as i32);
            forwarded = Some(sig);
        }
        if let (Some(f), None, None) = (first_failure(&done), failed, forwarded) {
            failed = Some(f);
            deadline = Some(std::time::Instant::now() + std::time::Duration::from_secs(60));
            running(&done, libc::SIGTERM);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            running(&done, libc::SIGKILL);
        }
        for (i, child) in ranks.iter_mut().enumerate() {
            if done[i].is_none() {
                done[i] = child.try_wait().with_context(|| format!("waiting for rank {i}"))?;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Ranks that all ended in the same interval: the first failing one.
    Ok((
        failed.or(first_failure(&done).filter(|_| forwarded.is_none())),
        forwarded,
    ))
}

/// The lowest rank that ended with a failure, and its status.
fn first_failure(done: &[Option<std::process::ExitStatus>]) -> Failure {
    done.iter()
        .enumerate()
        .find_map(|(i, s)| s.filter(|s| !s.success()).map(|s| (i, s)))
}

/// A child's exit status as this process's exit byte (128 + N for a signal).
fn exit_byte(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(1, 255) as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    }
}
