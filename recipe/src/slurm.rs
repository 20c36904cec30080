//! The Slurm executor: the same stages as an sbatch chain. Each stage whose output is not
//! finished becomes a batch script that runs its command and, only when it exits 0,
//! writes the `.done` marker; it waits on its upstream stages' jobs with
//! `--dependency=afterok` (and `--kill-on-invalid-dep=yes`, so a failure cancels what
//! depends on it). The split runs as a job array over `--part i/n` followed by
//! `mmrec-data merge`; training stages ask for the configured GPUs. The runner waits for
//! the queue to drain, then reads the markers: what has none failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plan::{output_dir, Arg, Stage};
use crate::run::DONE;
use crate::{Error, Result};

/// `[slurm]` of the pipeline config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    /// `--gres` of training stages, e.g. `gpu:1`.
    pub gres: Option<String>,
    /// Jobs of the split's array (`--part i/n`), merged by `mmrec-data merge`.
    #[serde(default = "one")]
    pub split_parts: usize,
    /// Further `sbatch` arguments for every job (`--time=2:00:00`, `--account=...`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

fn one() -> usize {
    1
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            gres: None,
            split_parts: 1,
            sbatch_args: vec![],
        }
    }
}

/// A stage's submitted job.
pub struct Submitted {
    pub stage: String,
    pub job: String,
}

/// Submit every unfinished stage (in order; `pending[i]` says whether stage i must run).
pub fn submit(
    cfg: &SlurmConfig,
    plan: &[Stage],
    pending: &[bool],
    keys: &BTreeMap<String, String>,
    work: &Path,
    bin_dir: &Path,
    run: &Path,
) -> Result<Vec<Submitted>> {
    let scripts = run.join("slurm");
    std::fs::create_dir_all(&scripts).map_err(io(&scripts))?;
    let mut jobs: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for (stage, _) in plan.iter().zip(pending).filter(|(_, p)| **p) {
        let key = &keys[&stage.name];
        let dir = output_dir(work, &stage.name, key);
        let after: Vec<String> = stage.deps().filter_map(|d| jobs.get(d).cloned()).collect();
        let resolve = |a: &Arg| match a {
            Arg::Lit(s) => s.clone(),
            Arg::File(p) => absolute(p),
            Arg::Out(s, rel) => absolute(&output_dir(work, s, &keys[s]).join(rel)),
            Arg::Own(rel) => absolute(&dir.join(rel)),
        };
        let mut args: Vec<String> = stage.args.iter().map(resolve).collect();
        let tool = absolute(&bin_dir.join(stage.tool));
        let log = absolute(&run.join("logs").join(format!("{}.log", stage.name)));
        let job = if stage.name == "split" && cfg.split_parts > 1 {
            // The parts as an array, each into parts/<i>, then one merge into shards.
            let shards = absolute(&dir.join("shards"));
            let parts = absolute(&dir.join("parts"));
            for a in args.iter_mut().filter(|a| **a == shards) {
                *a = format!("{parts}/$SLURM_ARRAY_TASK_ID");
            }
            args.extend(["--part".into(), format!("$SLURM_ARRAY_TASK_ID/{}", cfg.split_parts)]);
            let body = format!("mkdir -p {}\n{} {}\n", quote(&parts), quote(&tool), words(&args));
            let array = write_script(&scripts, "split-parts", &body)?;
            let mut extra = vec![format!("--array=0-{}", cfg.split_parts - 1)];
            extra.push(format!("--output={}", log.replace(".log", "-part-%a.log")));
            let parts_job = sbatch(cfg, &array, "split-parts", &after, &extra, false)?;
            let merge: Vec<String> = (0..cfg.split_parts).map(|i| format!("{parts}/{i}")).collect();
            let body = format!(
                "{} merge --out {} {}\n{}",
                quote(&absolute(&bin_dir.join("mmrec-data"))),
                quote(&shards),
                words(&merge),
                done_line(&dir, key)
            );
            let script = write_script(&scripts, "split", &body)?;
            sbatch(cfg, &script, "split", &[parts_job], &[format!("--output={log}")], false)?
        } else {
            let command = format!("{} {}", quote(&tool), words(&args));
            let body = match stage.stdout {
                Some(f) => {
                    let target = absolute(&dir.join(f));
                    let tmp = format!("{target}.tmp");
                    format!("{command} > {}\nmv {} {}\n", quote(&tmp), quote(&tmp), quote(&target))
                }
                None => format!("{command}\n"),
            };
            let body = format!("mkdir -p {}\n{body}{}", quote(&absolute(&dir)), done_line(&dir, key));
            let script = write_script(&scripts, &stage.name, &body)?;
            sbatch(
                cfg,
                &script,
                &stage.name,
                &after,
                &[format!("--output={log}")],
                stage.trains,
            )?
        };
        jobs.insert(stage.name.clone(), job.clone());
        out.push(Submitted {
            stage: stage.name.clone(),
            job,
        });
    }
    Ok(out)
}

/// Wait until none of `jobs` is in the queue; on a signal, cancel them all and return it.
pub fn wait(jobs: &[Submitted], stop: &AtomicUsize, progress: &dyn Fn(&str)) -> Result<Option<i32>> {
    let ids: Vec<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
    if ids.is_empty() {
        return Ok(None);
    }
    let mut last = usize::MAX;
    loop {
        let signal = stop.load(Ordering::Relaxed);
        if signal != 0 {
            let _ = Command::new("scancel").args(&ids).status();
            return Ok(Some(signal as i32));
        }
        let o = Command::new("squeue")
            .args(["-h", "-o", "%i", "-j", &ids.join(",")])
            .output()
            .map_err(io(Path::new("squeue")))?;
        // squeue fails for ids that have all left the queue: nothing is waiting then.
        let queued = if o.status.success() {
            String::from_utf8_lossy(&o.stdout).lines().count()
        } else {
            0
        };
        if queued == 0 {
            return Ok(None);
        }
        if queued != last {
            progress(&format!("{queued} Slurm jobs queued or running"));
            last = queued;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn sbatch(
    cfg: &SlurmConfig,
    script: &Path,
    name: &str,
    after: &[String],
    extra: &[String],
    gpu: bool,
) -> Result<String> {
    let mut c = Command::new("sbatch");
    c.args([
        "--parsable",
        "--kill-on-invalid-dep=yes",
        &format!("--job-name=mmrec-{name}"),
    ]);
    if let Some(p) = &cfg.partition {
        c.arg(format!("--partition={p}"));
    }
    if let (true, Some(g)) = (gpu, &cfg.gres) {
        c.arg(format!("--gres={g}"));
    }
    if !after.is_empty() {
        c.arg(format!("--dependency=afterok:{}", after.join(":")));
    }
    let o = c
        .args(&cfg.sbatch_args)
        .args(extra)
        .arg(script)
        .output()
        .map_err(io(Path::new("sbatch")))?;
    if !o.status.success() {
        return Err(Error::Input {
            path: script.to_path_buf(),
            message: format!("sbatch refused it: {}", String::from_utf8_lossy(&o.stderr).trim()),
        });
    }
    // --parsable prints "id" or "id;cluster".
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text.trim().split(';').next().unwrap_or_default().to_string())
}

fn write_script(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.sh"));
    let text = format!("#!/bin/bash\n# mmrec-recipe: stage {name}\nset -euo pipefail\n{body}");
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(path)
}

/// The marker, written only after the command succeeded (set -e), atomically, with the
/// script's run time (bash's `$SECONDS`; the split's merge counts only the merge).
fn done_line(dir: &Path, key: &str) -> String {
    let done = absolute(&dir.join(DONE));
    format!(
        "printf '{{\"key\": \"{key}\", \"slurm_job\": \"%s\", \"seconds\": %s}}\\n' \"$SLURM_JOB_ID\" \"$SECONDS\" > {tmp} && mv {tmp} {done}\n",
        tmp = quote(&format!("{done}.tmp")),
        done = quote(&done)
    )
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// A shell word: single-quoted unless it carries the array index, which must expand.
fn quote(s: &str) -> String {
    if s.contains("$SLURM_ARRAY_TASK_ID") {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn words(args: &[String]) -> String {
    args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell_and_the_array_index_expands() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("/p/$SLURM_ARRAY_TASK_ID"), "\"/p/$SLURM_ARRAY_TASK_ID\"");
        assert_eq!(quote("model.preset=\"tiny\""), "'model.preset=\"tiny\"'");
    }
}
