//! `mmrec-transfer`: base → expert, experts → fused model, and header inspection.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use mmrec_schemas::safetensors::Dtype;
use mmrec_schemas::FusionMethod;
use mmrec_transfer::{
    fuse, inspect, merge, to_expert, EmbedChoice, Error, ExpertOptions, FuseOptions, InitPolicy, LayerMap, MergeMethod,
    MergeOptions, Persist, Report,
};

/// Exit codes: 0 done, 2 usage or I/O error, 3 shape mismatch, 4 missing tensors,
/// 5 unexpected tensors, 6 non-finite values.
#[derive(Parser)]
#[command(
    name = "mmrec-transfer",
    version,
    about = "Move MM-Rec weights between roles: base → expert, experts → fused or merged",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    expert: ExpertArgs,
}

#[derive(clap::Args)]
struct ExpertArgs {
    /// The base (or expert) model to copy from.
    source: Option<PathBuf>,
    /// Target role (only `expert` here; use the `fuse` subcommand for fused models).
    #[arg(long, value_enum)]
    to: Option<Target>,
    /// The expert's domain, recorded in its metadata.
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Source blocks to keep, in order: `0-5,8` (target block i ← the i-th listed).
    #[arg(long, conflicts_with = "map")]
    layers: Option<String>,
    /// Affine block mapping, e.g. 'blocks.{i} <- blocks.{2*i}', with --n-layers target blocks.
    #[arg(long, requires = "n_layers")]
    map: Option<String>,
    #[arg(long)]
    n_layers: Option<usize>,
    /// Glob patterns written into the output's `frozen` metadata; `{0-5}` matches a
    /// number range: 'blocks.{0-5}.*'. A pattern that matches nothing is an error.
    #[arg(long)]
    freeze: Vec<String>,
    /// Output dtype (default: keep each tensor's).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Allow target tensors the source lacks, each created by an --init policy.
    #[arg(long)]
    allow_partial: bool,
    /// PATTERN=zeros|ones for tensors missing from the source (with --allow-partial).
    #[arg(long = "init", value_name = "PATTERN=POLICY")]
    init: Vec<String>,
    #[command(flatten)]
    write: WriteArgs,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Args)]
struct WriteArgs {
    /// Check and report only; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Flush the output to disk before renaming it into place, so that it survives a
    /// power loss too (costs the disk's write time). Without it the output is still
    /// atomic: a failed or killed run never leaves a partial file.
    #[arg(long, conflicts_with = "dry_run")]
    sync: bool,
}

impl WriteArgs {
    fn persist(&self) -> Persist {
        match (self.dry_run, self.sync) {
            (true, _) => Persist::DryRun,
            (false, true) => Persist::Durable,
            (false, false) => Persist::Atomic,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    Expert,
}

#[derive(Subcommand)]
enum Command {
    /// Build a fused model from a text and a code expert.
    Fuse {
        #[arg(long)]
        text: PathBuf,
        #[arg(long)]
        code: PathBuf,
        #[arg(long, value_enum, default_value = "concat")]
        method: FusionMethod,
        /// The shared embedding: the experts' mean, or one of them.
        #[arg(long, value_enum, default_value = "mean")]
        embed: EmbedChoice,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Merge experts fine-tuned from one base into one model of the base's size (a base
    /// file): every tensor, embedding and norms included, by the same rule.
    Merge {
        /// The base the experts were fine-tuned from.
        #[arg(long)]
        base: PathBuf,
        /// The experts (each must name the base's sha256 in its lineage, or --force).
        #[arg(long, num_args = 1.., required = true)]
        experts: Vec<PathBuf>,
        /// linear: Σ wᵢθᵢ / Σ wᵢ; task-arithmetic: base + λ Σ wᵢ(θᵢ − base); ties: task
        /// vectors trimmed to the top --density, signs elected, agreeing values averaged;
        /// dare: entries dropped with probability 1 − density, the rest scaled by 1/density.
        #[arg(long, value_enum)]
        method: MergeMethod,
        /// One weight per expert, comma-separated (default: 1 each).
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<f64>>,
        /// Fraction of each task vector kept (ties, dare), in (0, 1].
        #[arg(long, default_value_t = 0.2)]
        density: f64,
        /// Scale of the merged task vector (task-arithmetic, ties, dare).
        #[arg(long, default_value_t = 1.0)]
        lambda: f64,
        /// DARE's random seed: the same seed gives the same model.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Merge experts whose lineage does not name the base.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Header only (fast on any size): tensors, shapes, dtypes, parameters by module,
    /// metadata and lineage.
    Inspect { file: PathBuf },
}

fn main() -> ExitCode {
    // Die quietly like other Unix tools when the reader goes away (`| head`), instead of
    // panicking on the failed write.
    sigpipe::reset();
    let cli = Cli::parse();
    let json = cli.expert.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(Error::Rejected { kind, report, summary }) = e.downcast_ref::<Error>() {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"error": summary, "kind": kind, "report": report})
                    );
                } else {
                    print!("{}", report.render());
                    eprintln!("error: {summary}; nothing written");
                }
                return ExitCode::from(kind.exit_code());
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn show(report: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(report).expect("report serialises"));
    } else {
        print!("{}", report.render());
        match &report.out {
            Some(out) if report.written => eprintln!("wrote {out}"),
            _ => eprintln!("dry run: nothing written"),
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.expert.json;
    match cli.command {
        Some(Command::Inspect { file }) => inspect_command(&file, json),
        Some(Command::Fuse {
            text,
            code,
            method,
            embed,
            out,
            write,
        }) => {
            show(
                &fuse(&FuseOptions {
                    text,
                    code,
                    method,
                    embed,
                    out,
                    persist: write.persist(),
                })?,
                json,
            );
            Ok(())
        }
        Some(Command::Merge {
            base,
            experts,
            method,
            weights,
            density,
            lambda,
            seed,
            force,
            out,
            write,
        }) => {
            show(
                &merge(&MergeOptions {
                    base,
                    experts,
                    weights,
                    method,
                    density,
                    lambda,
                    seed,
                    force,
                    out,
                    persist: write.persist(),
                })?,
                json,
            );
            Ok(())
        }
        None => expert_command(cli.expert, json),
    }
}

fn inspect_command(file: &Path, json: bool) -> Result<()> {
    let ins = inspect(file)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
        return Ok(());
    }
    println!(
        "{}: {} bytes, {} tensors, {} parameters",
        ins.path,
        ins.bytes,
        ins.tensors.len(),
        ins.total_params
    );
    for (k, v) in &ins.metadata {
        println!("  {k}: {v}");
    }
    println!("parameters by module:");
    for (m, n) in &ins.params_by_module {
        println!("  {m:<40} {n:>12}");
    }
    Ok(())
}

/// `mmrec-transfer SOURCE --to expert ...`: the arguments checked and turned into options.
fn expert_command(a: ExpertArgs, json: bool) -> Result<()> {
    let source = a.source.ok_or_else(|| {
        anyhow::anyhow!(
            "give a source model (mmrec-transfer base.safetensors --to expert ...) or a subcommand; see --help"
        )
    })?;
    if a.to.is_none() {
        anyhow::bail!("--to expert is required");
    }
    let out = a.out.ok_or_else(|| anyhow::anyhow!("--out is required"))?;
    let domain = a
        .domain
        .ok_or_else(|| anyhow::anyhow!("--domain is required (text, code, ...)"))?;
    let layers = match (a.layers, a.map) {
        (Some(l), _) => LayerMap::parse_layers(&l)?,
        (None, Some(m)) => LayerMap::parse_map(&m, a.n_layers.unwrap_or(0))?,
        (None, None) => LayerMap::Identity,
    };
    if !a.init.is_empty() && !a.allow_partial {
        anyhow::bail!("--init needs --allow-partial");
    }
    let init = a
        .init
        .iter()
        .map(|s| {
            let (p, v) = s
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--init {s:?} must be PATTERN=zeros|ones"))?;
            let policy = match v {
                "zeros" => InitPolicy::Zeros,
                "ones" => InitPolicy::Ones,
                other => anyhow::bail!("--init policy {other:?}: zeros or ones"),
            };
            Ok((p.to_string(), policy))
        })
        .collect::<Result<Vec<_>>>()?;
    show(
        &to_expert(&ExpertOptions {
            source,
            out,
            domain,
            layers,
            freeze: a.freeze,
            dtype: a.dtype,
            init,
            persist: a.write.persist(),
        })?,
        json,
    );
    Ok(())
}
