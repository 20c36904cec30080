//! Running the stages: the lock, the run directory, each stage as a child process with its
//! log (signals forwarded, so an interrupted run leaves no finished marker behind), then
//! the report and the pruning of old runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Executor, PipelineConfig};
use crate::plan::{keys, output_dir, stages, Arg, Stage};
use crate::{report, Error, Result};

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Done { run: PathBuf },
    StageFailed { run: PathBuf, stage: String, log: PathBuf },
    GateFailed { run: PathBuf, failed: Vec<String> },
    Interrupted { signal: i32 },
}

/// What one stage did in this run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub key: String,
    /// `ran`, `skipped` (its key's output was finished), `failed` or `interrupted`.
    pub status: String,
    pub seconds: f64,
    pub output: PathBuf,
}

pub struct Runner {
    pub cfg: PipelineConfig,
    /// Where mmrec-data, mmrec-train and mmrec-transfer are.
    pub bin_dir: PathBuf,
}

impl Runner {
    pub fn run(&self, progress: &dyn Fn(&str)) -> Result<Outcome> {
        let p = &self.cfg.pipeline;
        for dir in [&p.work, &p.runs] {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let _lock = Lock::take(&p.runs.join(".lock"))?;
        let stop = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_usize(sig, stop.clone(), sig as usize).map_err(io(&p.runs))?;
        }
        let run = new_run_dir(&p.runs)?;
        std::fs::create_dir_all(run.join("logs")).map_err(io(&run))?;
        progress(&format!("run {}", run.display()));
        let plan = stages(&self.cfg);
        let versions = self.versions()?;
        let keys = keys(&plan, &versions)?;
        for stage in &plan {
            link(
                &run.join("outputs").join(&stage.name),
                &output_dir(&p.work, &stage.name, &keys[&stage.name]),
            )?;
        }
        let flow = match p.executor {
            Executor::Local => self.run_local(&plan, &keys, &run, &stop, progress)?,
            Executor::Slurm => self.run_slurm(&plan, &keys, &run, &stop, progress)?,
        };
        let records = match flow {
            Flow::Finished(records) => records,
            Flow::Stopped(outcome) => return Ok(outcome),
        };
        report::write_stages(&run, &records)?;
        let failed = report::write(&self.cfg, &run, &records, &versions, &self.bin_dir)?;
        prune(&p.runs, p.keep_runs, &run)?;
        Ok(if failed.is_empty() {
            Outcome::Done { run }
        } else {
            Outcome::GateFailed { run, failed }
        })
    }

    /// The stages one after the other, each as a child process.
    fn run_local(
        &self,
        plan: &[Stage],
        keys: &BTreeMap<String, String>,
        run: &Path,
        stop: &AtomicUsize,
        progress: &dyn Fn(&str),
    ) -> Result<Flow> {
        let mut records = Vec::new();
        for stage in plan {
            let key = &keys[&stage.name];
            let out = output_dir(&self.cfg.pipeline.work, &stage.name, key);
            let log = run.join("logs").join(format!("{}.log", stage.name));
            let started = Instant::now();
            let status = if out.join(DONE).exists() {
                progress(&format!("{}: unchanged (key {}), skipped", stage.name, &key[..12]));
                write_file(
                    &log,
                    format!("skipped: the output of key {key} is finished ({})\n", out.display()),
                )?;
                "skipped"
            } else {
                progress(&format!("{}: running (key {})", stage.name, &key[..12]));
                let exit = self.execute(stage, keys, &out, &log, stop)?;
                let status = match exit {
                    Exit::Ok => "ran",
                    Exit::Failed => "failed",
                    Exit::Signal(_) => "interrupted",
                };
                if let Exit::Ok = exit {
                    let done = serde_json::json!({"key": key, "seconds": started.elapsed().as_secs_f64()});
                    mmrec_schemas::atomic::write_atomic(&out.join(DONE), done.to_string().as_bytes())
                        .map_err(|e| Error::Config(e.to_string()))?;
                } else {
                    records.push(record(stage, key, status, started.elapsed().as_secs_f64(), &out));
                    report::write_stages(run, &records)?;
                    return Ok(Flow::Stopped(match exit {
                        Exit::Signal(signal) => Outcome::Interrupted { signal },
                        _ => Outcome::StageFailed {
                            run: run.to_path_buf(),
                            stage: stage.name.clone(),
                            log,
                        },
                    }));
                }
                status
            };
            records.push(record(stage, key, status, started.elapsed().as_secs_f64(), &out));
        }
        Ok(Flow::Finished(records))
    }

    /// The unfinished stages as one sbatch chain; then what each job left behind.
    fn run_slurm(
        &self,
        plan: &[Stage],
        keys: &BTreeMap<String, String>,
        run: &Path,
        stop: &AtomicUsize,
        progress: &dyn Fn(&str),
    ) -> Result<Flow> {
        let work = &self.cfg.pipeline.work;
        let done = |s: &Stage| output_dir(work, &s.name, &keys[&s.name]).join(DONE).exists();
        let pending: Vec<bool> = plan.iter().map(|s| !done(s)).collect();
        let jobs = crate::slurm::submit(&self.cfg.slurm, plan, &pending, keys, work, &self.bin_dir, run)?;
        for j in &jobs {
            progress(&format!("{}: submitted as Slurm job {}", j.stage, j.job));
        }
        if let Some(signal) = crate::slurm::wait(&jobs, stop, progress)? {
            return Ok(Flow::Stopped(Outcome::Interrupted { signal }));
        }
        let mut records = Vec::new();
        for (stage, ran) in plan.iter().zip(&pending) {
            let key = &keys[&stage.name];
            let out = output_dir(work, &stage.name, key);
            let status = match (ran, done(stage)) {
                (false, _) => "skipped",
                (true, true) => "ran",
                (true, false) => "failed",
            };
            // The job wrote its own run time into the marker.
            let seconds = std::fs::read_to_string(out.join(DONE))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|m| m["seconds"].as_f64())
                .filter(|_| *ran)
                .unwrap_or(0.0);
            records.push(record(stage, key, status, seconds, &out));
            if status == "failed" {
                report::write_stages(run, &records)?;
                let log = run.join("logs").join(format!("{}.log", stage.name));
                return Ok(Flow::Stopped(Outcome::StageFailed {
                    run: run.to_path_buf(),
                    stage: stage.name.clone(),
                    log,
                }));
            }
        }
        Ok(Flow::Finished(records))
    }

    fn versions(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for tool in ["mmrec-data", "mmrec-train", "mmrec-transfer"] {
            let bin = self.bin_dir.join(tool);
            let o = Command::new(&bin).arg("--version").output().map_err(io(&bin))?;
            out.insert(tool.to_string(), String::from_utf8_lossy(&o.stdout).trim().to_string());
        }
        Ok(out)
    }

    /// Run `stage` into `out` (created; an interrupted earlier attempt's files stay, so a
    /// training stage resumes from its checkpoint), its stderr (and stdout, unless the
    /// stage keeps it) into `log`.
    fn execute(
        &self,
        stage: &Stage,
        keys: &BTreeMap<String, String>,
        out: &Path,
        log: &Path,
        stop: &AtomicUsize,
    ) -> Result<Exit> {
        std::fs::create_dir_all(out).map_err(io(out))?;
        let work = &self.cfg.pipeline.work;
        let args: Vec<PathBuf> = stage
            .args
            .iter()
            .map(|a| match a {
                Arg::Lit(s) => PathBuf::from(s),
                Arg::File(p) => p.clone(),
                Arg::Out(s, rel) => output_dir(work, s, &keys[s]).join(rel),
                Arg::Own(rel) => out.join(rel),
            })
            .collect();
        let log_file = std::fs::File::create(log).map_err(io(log))?;
        let tmp = stage.stdout.map(|f| out.join(format!("{f}.tmp")));
        let stdout = match &tmp {
            Some(t) => Stdio::from(std::fs::File::create(t).map_err(io(t))?),
            None => Stdio::from(log_file.try_clone().map_err(io(log))?),
        };
        let bin = self.bin_dir.join(stage.tool);
        let mut child = Command::new(&bin)
            .args(&args)
            .stdout(stdout)
            .stderr(log_file)
            .spawn()
            .map_err(io(&bin))?;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io(&bin))? {
                break status;
            }
            let signal = stop.load(Ordering::Relaxed);
            if signal != 0 {
                // The child may have had it already (a terminal's Ctrl-C reaches the group).
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, signal as i32) };
                let _ = child.wait();
                return Ok(Exit::Signal(signal as i32));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.success() {
            return Ok(Exit::Failed);
        }
        if let (Some(t), Some(f)) = (&tmp, stage.stdout) {
            std::fs::rename(t, out.join(f)).map_err(io(t))?;
        }
        Ok(Exit::Ok)
    }
}

enum Exit {
    Ok,
    Failed,
    Signal(i32),
}

/// The stages' records, or how the run stopped early.
enum Flow {
    Finished(Vec<StageRecord>),
    Stopped(Outcome),
}

/// The marker of a finished stage output.
pub const DONE: &str = ".done";

fn record(stage: &Stage, key: &str, status: &str, seconds: f64, out: &Path) -> StageRecord {
    StageRecord {
        stage: stage.name.clone(),
        key: key.to_string(),
        status: status.to_string(),
        seconds,
        output: out.to_path_buf(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, text: String) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(path, text).map_err(io(path))
}

fn link(at: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = at.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let target = std::path::absolute(to).map_err(io(to))?;
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(&target, at).map_err(io(at))
}

/// `runs/<date>-<n>/`, n one more than the day's last.
fn new_run_dir(runs: &Path) -> Result<PathBuf> {
    let date = today();
    let n = std::fs::read_dir(runs)
        .map_err(io(runs))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix(&format!("{date}-"))?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let dir = runs.join(format!("{date}-{n}"));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir)
}

/// Today's UTC date as YYYY-MM-DD (days to civil date, Howard Hinnant's algorithm).
fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Keep the newest `keep` run directories (by name: date, then number), never `current`.
fn prune(runs: &Path, keep: usize, current: &Path) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .map_err(io(runs))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.join("stages.json").exists())
        .collect();
    dirs.sort_by_key(|p| run_order(p));
    let excess = dirs.len().saturating_sub(keep.max(1));
    for old in dirs.into_iter().take(excess).filter(|d| d != current) {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// (date, number) of a run directory's name, for ordering.
pub fn run_order(dir: &Path) -> (String, u32) {
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    match name.rsplit_once('-') {
        Some((date, n)) => (date.to_string(), n.parse().unwrap_or(0)),
        None => (name, 0),
    }
}

/// An exclusive lock on the runs directory: a file holding the owner's pid. A lock whose
/// process is gone is taken over.
struct Lock(PathBuf);

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    use std::io::Write;
                    writeln!(f, "{}", std::process::id()).map_err(io(path))?;
                    return Ok(Lock(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid: i32 = std::fs::read_to_string(path)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0);
                    // SAFETY: kill(pid, 0) only asks whether the process exists.
                    if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                        return Err(Error::Locked {
                            path: path.to_path_buf(),
                            pid,
                        });
                    }
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => {
                    return Err(Error::Io {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
            }
        }
        Err(Error::Locked {
            path: path.to_path_buf(),
            pid: 0,
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
