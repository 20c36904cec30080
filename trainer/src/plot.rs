//! Charts of training runs (`mmrec-train plot`): PNGs drawn with plotters. Text is set in
//! DejaVu Sans embedded in the binary (`trainer/assets`, with its licence), so a machine
//! without system fonts renders the same chart.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}: no training records (a metrics.jsonl with step and loss)")]
    Empty(PathBuf),
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// What the loss charts' horizontal axis counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XAxis {
    /// Optimiser steps.
    #[default]
    Step,
    /// Training tokens seen (compares runs whose steps differ in size).
    Tokens,
    /// Training wall time in seconds, over resumes.
    Time,
}

impl XAxis {
    /// The metrics field that holds it.
    fn field(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Tokens => "tokens_seen",
            XAxis::Time => "elapsed_s",
        }
    }

    /// Tick labels: millions of tokens, else whole numbers.
    fn tick(self, v: &f64) -> String {
        match self {
            XAxis::Tokens => format!("{:.1}M", v / 1e6),
            _ => format!("{v:.0}"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Tokens => "tokens seen",
            XAxis::Time => "seconds of training",
        }
    }
}

/// One run's curves from its `metrics.jsonl`, against the chosen axis.
#[derive(Debug, Clone, Default)]
pub struct RunCurves {
    pub label: String,
    pub train: Vec<(f64, f64)>,
    /// The token-weighted validation loss over all domains.
    pub val: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
}

/// The curves of a run directory (its `metrics.jsonl`) or of a metrics file, labelled by
/// the directory's name (or the file's, when it is not `metrics.jsonl`). Records without
/// the axis' field (metrics of older versions have no time) are left out.
pub fn read_run(path: &Path, axis: XAxis) -> Result<RunCurves, PlotError> {
    let file = if path.is_dir() {
        path.join("metrics.jsonl")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| PlotError::Io {
        path: file.clone(),
        source,
    })?;
    let named = match file.file_stem() {
        Some(stem) if stem != "metrics" => Some(stem),
        _ => file.parent().and_then(Path::file_name),
    };
    let mut run = RunCurves {
        label: named.map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
        ..RunCurves::default()
    };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let rec: serde_json::Value = serde_json::from_str(line).map_err(|e| PlotError::Format {
            path: file.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        let Some(x) = rec[axis.field()].as_f64() else { continue };
        if let Some(loss) = rec["loss"].as_f64() {
            run.train.push((x, loss));
        }
        if let Some(lr) = rec["lr"].as_f64() {
            run.lr.push((x, lr));
        }
        if let Some(val) = rec["val"]["all"].as_f64() {
            run.val.push((x, val));
        }
    }
    if run.train.is_empty() {
        return Err(PlotError::Empty(file));
    }
    Ok(run)
}

/// Training loss (thin), validation loss (thick, with points) and learning rate of every
/// run on one PNG, two panels sharing the step axis. Written under a temporary name and
/// renamed.
pub fn loss_chart(runs: &[RunCurves], axis: XAxis, out: &Path) -> Result<(), PlotError> {
    write_png(out, |tmp| draw(runs, axis, tmp))
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let font: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The bytes are a valid TTF (a test draws with them); nothing to recover otherwise.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    });
}

fn draw(runs: &[RunCurves], axis: XAxis, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(600);
    let x_max = runs
        .iter()
        .flat_map(|r| r.train.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let (y_min, y_max) = loss_range(runs);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "loss (nats per token): training thin, validation thick",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, y_min..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(axis.label())
        .x_label_formatter(&|v| axis.tick(v))
        .y_desc("loss")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in runs.iter().enumerate() {
        let color = run_color(i);
        chart
            .draw_series(LineSeries::new(
                r.train.iter().copied(),
                color.mix(0.45).stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{} train", r.label))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.mix(0.45)));
        if !r.val.is_empty() {
            chart
                .draw_series(LineSeries::new(r.val.iter().copied(), color.stroke_width(3)))
                .map_err(|e| err(&e))?
                .label(format!("{} validation", r.label))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
            chart
                .draw_series(r.val.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    draw_legend(&mut chart)?;
    let lr_max = runs.iter().flat_map(|r| r.lr.iter().map(|p| p.1)).fold(0.0, f64::max);
    let mut lr_chart = ChartBuilder::on(&bottom)
        .caption("learning rate", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..(lr_max * 1.05).max(1e-12))
        .map_err(|e| err(&e))?;
    lr_chart
        .configure_mesh()
        .x_desc(axis.label())
        .x_label_formatter(&|v| axis.tick(v))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in runs.iter().enumerate() {
        let color = run_color(i);
        lr_chart
            .draw_series(LineSeries::new(r.lr.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Mean loss against the context before the predicted token (log scale), one line per
/// named curve (`mmrec-train eval --context-len`). Written under a temporary name and renamed.
pub fn position_chart(curves: &[(String, Vec<(f64, f64)>)], out: &Path) -> Result<(), PlotError> {
    write_png(out, |tmp| draw_positions(curves, tmp))
}

fn draw_positions(curves: &[(String, Vec<(f64, f64)>)], path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let points = || curves.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(2.0, f64::max) * 1.2;
    let (lo, hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !(lo.is_finite() && hi.is_finite()) {
        // An empty range would send the axis labelling into an endless loop.
        return Err("no finite losses to draw".into());
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("held-out loss against position in the document", ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((1f64..x_max).log_scale(), (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("tokens of context before the predicted token")
        .y_desc("loss (nats per token)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (label, p)) in curves.iter().enumerate() {
        let color = run_color(i);
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(p.iter().map(|&q| Circle::new(q, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    draw_legend(&mut chart)?;
    root.present().map_err(|e| err(&e))
}

/// The series' labels, boxed in the chart's upper right.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| e.to_string())
}

/// `draw` into a temporary PNG next to `out`, renamed into place once complete (removed
/// after a failure).
fn write_png(out: &Path, draw: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), PlotError> {
    register_font();
    let name = out
        .file_name()
        .map_or_else(|| "chart".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}.png", std::process::id()));
    let written = draw(&tmp)
        .map_err(|message| PlotError::Draw {
            path: out.to_path_buf(),
            message,
        })
        .and_then(|()| {
            std::fs::rename(&tmp, out).map_err(|source| PlotError::Io {
                path: out.to_path_buf(),
                source,
            })
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Matplotlib's ten categorical colours ("tab10"), which stay apart on white.
fn run_color(i: usize) -> RGBAColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b).to_rgba()
}

/// The loss axis: from the lowest loss to the 95th percentile of the training losses (or
/// the highest validation loss), so that the first steps' ln V does not flatten the rest.
fn loss_range(runs: &[RunCurves]) -> (f64, f64) {
    let mut train: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.train.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .collect();
    train.sort_by(f64::total_cmp);
    let val = runs
        .iter()
        .flat_map(|r| r.val.iter().map(|p| p.1))
        .filter(|v| v.is_finite());
    let lo = train
        .first()
        .copied()
        .into_iter()
        .chain(val.clone())
        .fold(f64::INFINITY, f64::min);
    let hi = train
        .get(train.len() * 95 / 100)
        .copied()
        .into_iter()
        .chain(val)
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// One named line of a chart: (x, y) points.
type Series = (String, Vec<(f64, f64)>);
/// What a scaling panel reads from a figure.
type Measure<'a> = &'a dyn Fn(&crate::suite::ScalingFigure) -> f64;

/// `bench`'s charts in `dir`: `hem.png` (training tokens/s with the fused projection and
/// with four separate ones) and `scaling.png` (tokens/s and peak memory against sequence
/// length at fixed tokens per batch, and against batch size). Returns the files written.
pub fn bench_charts(results: &crate::suite::BenchmarkResults, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let hem = dir.join("hem.png");
    write_png(&hem, |tmp| draw_hem(&results.hem, tmp))?;
    let scaling = dir.join("scaling.png");
    write_png(&scaling, |tmp| draw_scaling(&results.scaling, tmp))?;
    Ok(vec![hem, scaling])
}

fn draw_hem(figures: &[crate::suite::HemFigure], path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let tps = |f: &crate::suite::HemFigure, ms: f64| (f.batch * f.seq_len) as f64 / (ms / 1e3);
    let names: Vec<String> = figures
        .iter()
        .map(|f| format!("{} {:?} T={}", f.preset, f.precision, f.seq_len).to_lowercase())
        .collect();
    let top = figures
        .iter()
        .map(|f| tps(f, f.fused.median_ms).max(tps(f, f.separate.median_ms)))
        .fold(1.0, f64::max);
    // Room for every label: 160 px a comparison.
    let width = (160 * names.len() as u32).max(1000);
    let root = BitMapBackend::new(path, (width, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "training step, fused QKVZ projection (blue) vs four separate (orange)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..names.len().max(1) as f64, 0f64..top * 1.1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("training tokens per second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, f) in figures.iter().enumerate() {
        let x = i as f64;
        for (k, ms) in [f.fused.median_ms, f.separate.median_ms].into_iter().enumerate() {
            let (x0, x1) = (x + 0.1 + 0.4 * k as f64, x + 0.5 + 0.4 * k as f64);
            chart
                .draw_series([Rectangle::new([(x0, 0.0), (x1, tps(f, ms))], run_color(k).filled())])
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))
}

fn draw_scaling(figures: &[crate::suite::ScalingFigure], path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let series = |varies: &str, y: Measure| -> Vec<Series> {
        let mut out: Vec<Series> = Vec::new();
        for f in figures.iter().filter(|f| f.varies == varies) {
            let name = format!("{} {:?}", f.preset, f.precision).to_lowercase();
            let x = if varies == "seq_len" { f.seq_len } else { f.batch } as f64;
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, points)) => points.push((x, y(f))),
                None => out.push((name, vec![(x, y(f))])),
            }
        }
        out
    };
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((2, 2));
    let specs: [(&str, &str, &str, Measure); 4] = [
        (
            "seq_len",
            "training tokens/s, fixed tokens per batch",
            "sequence length",
            &|f| f.tokens_per_s,
        ),
        (
            "seq_len",
            "peak memory (MB), fixed tokens per batch",
            "sequence length",
            &|f| f.peak_memory_mb,
        ),
        ("batch", "training tokens/s", "batch (rows)", &|f| f.tokens_per_s),
        ("batch", "peak memory (MB)", "batch (rows)", &|f| f.peak_memory_mb),
    ];
    for (area, (varies, title, x_desc, y)) in panels.iter().zip(specs) {
        line_panel(area, title, x_desc, &series(varies, y)).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Lines against a log₂ x axis, one colour per series, with a legend.
fn line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    series: &[Series],
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let points = || {
        series
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .filter(|p| p.1.is_finite())
    };
    let x_max = points().map(|p| p.0).fold(2.0, f64::max);
    let x_min = points().map(|p| p.0).fold(x_max, f64::min).max(1.0);
    let y_max = points().map(|p| p.1).fold(1e-9, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d((x_min..x_max * 1.1).log_scale(), 0f64..y_max * 1.1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, p)) in series.iter().enumerate() {
        let color = run_color(i);
        let mut p: Vec<(f64, f64)> = p.iter().copied().filter(|q| q.1.is_finite()).collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(p.iter().map(|&q| Circle::new(q, 4, color.filled())))
            .map_err(|e| err(&e))?;
    }
    draw_legend(&mut chart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_of_two_runs_is_a_png_and_bad_lines_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for (name, scale) in [("a", 1.0), ("b", 1.2)] {
            let run = dir.path().join(name);
            std::fs::create_dir(&run).unwrap();
            let mut text = String::new();
            for step in 1..=60 {
                let loss = scale * (2.0 + 5.0 / step as f64);
                text.push_str(&format!(
                    "{{\"step\":{step},\"loss\":{loss},\"lr\":{}}}\n",
                    1e-3 * step as f64 / 60.0
                ));
                if step % 20 == 0 {
                    text.push_str(&format!("{{\"step\":{step},\"val\":{{\"all\":{}}}}}\n", loss + 0.1));
                }
            }
            std::fs::write(run.join("metrics.jsonl"), text).unwrap();
            runs.push(read_run(&run, XAxis::Step).unwrap());
        }
        assert_eq!((runs[0].train.len(), runs[0].val.len(), runs[0].lr.len()), (60, 3, 60));
        let out = dir.path().join("loss.png");
        loss_chart(&runs, XAxis::Step, &out).unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 10_000, "a chart with text and lines, not a blank image");
        std::fs::write(
            dir.path().join("a/metrics.jsonl"),
            "{\"step\":1,\"loss\":2}\nnot json\n",
        )
        .unwrap();
        let e = read_run(&dir.path().join("a"), XAxis::Step).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2:"), "{e}");
    }
}
