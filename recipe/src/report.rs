//! The morning report: `report.json` and `report.md` in the run directory — perplexity per
//! domain for the base, the control, each expert and the fused model, deltas against the
//! control and against the previous run, token counts, durations, tool versions, the
//! loss curves (PNG, drawn by `mmrec-train plot`), and the gates' verdicts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::PipelineConfig;
use crate::plan::{models, output_dir};
use crate::run::{run_order, StageRecord};
use crate::{Error, Result};

const DOMAINS: [&str; 4] = ["text", "code", "mixed", "all"];

pub fn write_stages(run: &Path, records: &[StageRecord]) -> Result<()> {
    let text = serde_json::to_string_pretty(records).expect("records serialise") + "\n";
    atomic(&run.join("stages.json"), &text)
}

fn atomic(path: &Path, text: &str) -> Result<()> {
    mmrec_schemas::atomic::write_atomic(path, text.as_bytes()).map_err(|e| Error::Config(e.to_string()))
}

/// Write the report; returns the gates that failed.
pub fn write(
    cfg: &PipelineConfig,
    run: &Path,
    records: &[StageRecord],
    versions: &BTreeMap<String, String>,
    bin_dir: &Path,
) -> Result<Vec<String>> {
    let key = |stage: &str| records.iter().find(|r| r.stage == stage).map(|r| r.key.clone());
    let names = models(cfg);
    let mut losses = BTreeMap::new();
    for (model, _) in &names {
        let stage = format!("eval-{model}");
        let path = output_dir(&cfg.pipeline.work, &stage, &key(&stage).unwrap_or_default()).join("eval.json");
        let eval: Value = read_json(&path)?;
        losses.insert(model.clone(), eval["domains"].clone());
    }
    let loss = |m: &str, d: &str| losses.get(m).and_then(|v| v[d]["loss"].as_f64());
    let previous = previous_report(&cfg.pipeline.runs, run);
    let prev_loss = |m: &str, d: &str| previous.as_ref().and_then(|p| p["models"][m][d]["loss"].as_f64());
    let gates = check_gates(cfg, &loss);
    let tokens: BTreeMap<String, Option<u64>> = names
        .iter()
        .map(|(m, stage)| (m.clone(), last_tokens(&run.join("outputs").join(stage))))
        .collect();
    let curves = draw_curves(run, bin_dir);
    let report = json!({
        "run": run.file_name().map(|n| n.to_string_lossy().into_owned()),
        "models": losses,
        "tokens_trained": tokens,
        "stages": records,
        "tool_versions": versions,
        "previous_run": previous.as_ref().map(|p| p["run"].clone()),
        "gates": gates.iter().map(|(name, ok, detail)| json!({"gate": name, "ok": ok, "detail": detail})).collect::<Vec<_>>(),
        "curves": curves,
    });
    atomic(
        &run.join("report.json"),
        &(serde_json::to_string_pretty(&report).expect("serialises") + "\n"),
    )?;
    let order: Vec<String> = names.into_iter().map(|(m, _)| m).collect();
    let md = markdown(&report, &order, &loss, &prev_loss, records, &gates);
    atomic(&run.join("report.md"), &md)?;
    Ok(gates
        .into_iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, detail)| format!("{name}: {detail}"))
        .collect())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Input {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The newest earlier run's report, if any.
fn previous_report(runs: &Path, current: &Path) -> Option<Value> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p != current && p.join("report.json").exists())
        .collect();
    dirs.sort_by_key(|p| run_order(p));
    let text = std::fs::read_to_string(dirs.last()?.join("report.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Tokens a training stage saw, from the last record of its metrics.
fn last_tokens(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|r| r["tokens_seen"].as_u64())
}

/// `curves.png`: every training stage's loss against tokens (a failure to draw is noted
/// in the report, not fatal).
fn draw_curves(run: &Path, bin_dir: &Path) -> Value {
    let out = run.join("curves.png");
    let dirs = ["pretrain", "control", "finetune-text", "finetune-code", "fusion"].map(|s| run.join("outputs").join(s));
    let drawn = std::process::Command::new(bin_dir.join("mmrec-train"))
        .args(["plot", "--x", "tokens", "--out"])
        .arg(&out)
        .args(dirs)
        .output();
    match drawn {
        Ok(o) if o.status.success() => json!("curves.png"),
        Ok(o) => json!({"error": String::from_utf8_lossy(&o.stderr).trim().to_string()}),
        Err(e) => json!({"error": e.to_string()}),
    }
}

type Gate = (&'static str, bool, String);

fn check_gates(cfg: &PipelineConfig, loss: &dyn Fn(&str, &str) -> Option<f64>) -> Vec<Gate> {
    let mut out = Vec::new();
    let mut worse = |name: &'static str, a: &str, b: &str, domains: &[&str], margin: Option<f64>| {
        let Some(margin) = margin else { return };
        let over: Vec<String> = domains
            .iter()
            .filter_map(|d| Some((d, loss(a, d)? - loss(b, d)?)))
            .filter(|(_, diff)| *diff > margin)
            .map(|(d, diff)| format!("{d} +{diff:.4}"))
            .collect();
        let detail = if over.is_empty() {
            format!("{a} within {margin} nats of {b} on {}", domains.join(", "))
        } else {
            format!("{a} worse than {b} by more than {margin} nats: {}", over.join(", "))
        };
        out.push((name, over.is_empty(), detail));
    };
    let g = &cfg.gates;
    worse("fused_vs_base", "fused", "base", &DOMAINS, g.fused_vs_base);
    worse("fused_vs_control", "fused", "control", &DOMAINS, g.fused_vs_control);
    worse("expert_vs_control", "text", "control", &["text"], g.expert_vs_control);
    worse("expert_vs_control", "code", "control", &["code"], g.expert_vs_control);
    out
}

fn markdown(
    report: &Value,
    models: &[String],
    loss: &dyn Fn(&str, &str) -> Option<f64>,
    prev_loss: &dyn Fn(&str, &str) -> Option<f64>,
    records: &[StageRecord],
    gates: &[Gate],
) -> String {
    let mut md = String::new();
    let run = report["run"].as_str().unwrap_or("?");
    let _ = writeln!(md, "# Run {run}\n");
    let _ = writeln!(
        md,
        "Held-out perplexity per domain (loss in nats; Δ against the control, and against the previous run {}):\n",
        report["previous_run"].as_str().unwrap_or("(none)")
    );
    let _ = writeln!(md, "| model | {} | tokens trained |", DOMAINS.join(" | "));
    let _ = writeln!(md, "|---|{}---|", "---|".repeat(DOMAINS.len()));
    for m in models {
        let m = m.as_str();
        let cells: Vec<String> = DOMAINS
            .iter()
            .map(|d| match loss(m, d) {
                Some(l) => {
                    let vs_control = loss("control", d)
                        .filter(|_| m != "control")
                        .map(|c| format!(", Δc {:+.3}", l - c));
                    let vs_prev = prev_loss(m, d).map(|p| format!(", Δp {:+.3}", l - p));
                    format!(
                        "{:.2} ({l:.3}{}{})",
                        l.exp(),
                        vs_control.unwrap_or_default(),
                        vs_prev.unwrap_or_default()
                    )
                }
                None => "-".into(),
            })
            .collect();
        let tokens = report["tokens_trained"][m]
            .as_u64()
            .map_or("-".into(), |t| t.to_string());
        let _ = writeln!(md, "| {m} | {} | {tokens} |", cells.join(" | "));
    }
    let _ = writeln!(md, "\nGates:\n");
    if gates.is_empty() {
        let _ = writeln!(md, "- none configured");
    }
    for (name, ok, detail) in gates {
        let _ = writeln!(md, "- {} {name}: {detail}", if *ok { "PASS" } else { "FAIL" });
    }
    let _ = writeln!(md, "\nStages:\n\n| stage | status | seconds | key |\n|---|---|---|---|");
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {} |",
            r.stage,
            r.status,
            r.seconds,
            &r.key[..12]
        );
    }
    let _ = writeln!(
        md,
        "\nTools: {}\n",
        report["tool_versions"].as_object().map_or(String::new(), |v| v
            .values()
            .filter_map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "))
    );
    if report["curves"] == "curves.png" {
        let _ = writeln!(md, "![loss curves](curves.png)");
    }
    md
}
