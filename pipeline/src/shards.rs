//! Pass 2 of `split`: the inputs are read again, in order, and each planned document goes
//! to its shard as it arrives. Within a domain the planned shards follow input order, so at
//! most one shard per domain is open at a time; a row group is tokenized (in parallel) once
//! its last document has arrived, while the one before it is encoded and written. Memory
//! holds a few input files and row groups, whatever the corpus size.

use std::path::Path;

use mmrec_schemas::atomic::{file_sha256, write_atomic};
use mmrec_schemas::shard::{ShardRow, ShardWriter};
use mmrec_schemas::{Domain, ShardInfo};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::index::{DocEntry, Retained};
use crate::input::{read_file, Document, InputFile, Record};
use crate::options::{Progress, SplitOptions};
use crate::tokenize::LoadedTokenizer;
use crate::DOCS_PER_TASK;

/// One shard of the plan: its documents (indices into the index) in input order, and a
/// fingerprint of everything that decides its bytes.
pub struct PlannedShard {
    pub domain: Domain,
    pub file: String,
    pub docs: Vec<usize>,
    pub fingerprint: u64,
}

/// Consecutive runs of `items`, each closed before it would pass `max_items` items or
/// `max_bytes` bytes; an item larger than `max_bytes` makes a run of its own.
pub(crate) fn bounded_runs(
    items: &[usize],
    max_items: usize,
    max_bytes: u64,
    bytes_of: impl Fn(usize) -> usize,
) -> Vec<&[usize]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (k, &item) in items.iter().enumerate() {
        let b = bytes_of(item) as u64;
        if k > start && (k - start == max_items || bytes + b > max_bytes) {
            runs.push(&items[start..k]);
            (start, bytes) = (k, 0);
        }
        bytes += b;
    }
    if start < items.len() {
        runs.push(&items[start..]);
    }
    runs
}

/// Sidecar proving a shard was completed by a run with the same plan.
#[derive(Debug, Serialize, Deserialize)]
struct ShardState {
    fingerprint: u64,
    info: ShardInfo,
}

/// Everything pass 2 reads from.
pub struct Sources<'a> {
    pub opts: &'a SplitOptions,
    pub tok: &'a LoadedTokenizer,
    pub files: &'a [InputFile],
    /// Each input's sha256 in pass 1: a file that changed since is an error, not a shard
    /// of mixed contents.
    pub sha256: Vec<&'a str>,
    pub docs: &'a [DocEntry],
    /// Per input, its documents when pass 1 kept them in memory.
    pub retained: &'a [Retained],
    pub state_dir: &'a Path,
}

/// Write every planned shard that an earlier run did not already complete; returns each
/// shard's manifest entry and whether it was kept from before.
pub fn write_shards(src: &Sources, plan: &[PlannedShard], progress: &dyn Progress) -> Result<Vec<(ShardInfo, bool)>> {
    let mut outcomes: Vec<Option<(ShardInfo, bool)>> = Vec::with_capacity(plan.len());
    for p in plan {
        let done = completed(src.state_dir, p, &src.opts.out.join(&p.file))?;
        if let Some(info) = &done {
            let bytes = p.docs.iter().map(|&i| src.docs[i].len).sum();
            progress.advance(bytes, p.docs.len() as u64, info.tokens);
        }
        outcomes.push(done.map(|info| (info, true)));
    }
    // Where each document to write goes: (place in its file, shard, index entry), per file.
    let mut routes: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); src.files.len()];
    for (s, p) in plan.iter().enumerate().filter(|(s, _)| outcomes[*s].is_none()) {
        for &i in &p.docs {
            routes[src.docs[i].file].push((src.docs[i].ordinal, s, i));
        }
    }
    routes.iter_mut().for_each(|r| r.sort_unstable());
    let mut open: Vec<Option<OpenShard>> = (0..plan.len()).map(|_| None).collect();
    std::thread::scope(|scope| -> Result<()> {
        // One file ahead: the next input is read and parsed while this one's documents are
        // tokenized.
        let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<(usize, usize, Document)>>>(1);
        let routes = &routes;
        let reader = scope.spawn(move || {
            for (f, route) in routes.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                if tx.send(routed_documents(src, f, route)).is_err() {
                    return;
                }
            }
        });
        for batch in rx {
            for (s, i, doc) in batch? {
                let shard = match &mut open[s] {
                    Some(shard) => shard,
                    slot => slot.insert(OpenShard::create(src, &plan[s])?),
                };
                if shard.push(src, i, doc, progress)? {
                    let info = open[s].take().expect("open").finish(src)?;
                    write_state(src.state_dir, &plan[s], &info)?;
                    outcomes[s] = Some((info, false));
                }
            }
        }
        reader.join().expect("the reader thread does not panic");
        Ok(())
    })?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every planned shard was kept or written"))
        .collect())
}

/// The documents of input `f` that `route` (sorted by place) names: kept from pass 1, or
/// read again.
fn routed_documents(src: &Sources, f: usize, route: &[(usize, usize, usize)]) -> Result<Vec<(usize, usize, Document)>> {
    let kept = src.retained[f].lock().map_or(None, |mut r| r.take());
    let docs: Vec<(usize, Document)> = match kept {
        Some(docs) => docs,
        None => reread(src, f)?,
    };
    let mut wanted = route.iter().peekable();
    let mut out = Vec::with_capacity(route.len());
    for (ordinal, doc) in docs {
        if let Some(&(_, s, i)) = wanted.next_if(|(o, _, _)| *o == ordinal) {
            out.push((s, i, doc));
        }
    }
    Ok(out)
}

/// Input `f`'s documents with their places, read again; an error if the file changed.
fn reread(src: &Sources, f: usize) -> Result<Vec<(usize, Document)>> {
    let file = &src.files[f];
    let read = read_file(file, &src.opts.read)?;
    if read.sha256 != src.sha256[f] {
        return Err(Error::Invalid(format!(
            "{} changed while split was reading it (sha256 {} at first, {} now): run split again",
            file.path.display(),
            src.sha256[f],
            read.sha256
        )));
    }
    let docs = read.records.into_iter().filter_map(|r| match r {
        Record::Doc(d) => Some(d),
        Record::Bad(_) => None,
    });
    Ok(docs.enumerate().collect())
}

/// A row group's documents (with their index entries) and their tokens.
type TokenizedGroup = (Vec<(usize, Document)>, Vec<Vec<u32>>);

/// A shard being written: its planned row groups, the documents of the one filling up, and
/// the tokenized one waiting to be written.
struct OpenShard {
    writer: ShardWriter,
    /// Sizes of the row groups still to fill, in order.
    groups: std::collections::VecDeque<usize>,
    pending: Vec<(usize, Document)>,
    ready: Option<TokenizedGroup>,
    domain: Domain,
    file: String,
}

impl OpenShard {
    fn create(src: &Sources, p: &PlannedShard) -> Result<Self> {
        let path = src.opts.out.join(&p.file);
        std::fs::create_dir_all(path.parent().expect("shard paths have a domain directory")).at(&path)?;
        let groups = bounded_runs(&p.docs, src.opts.row_group_docs, src.opts.row_group_bytes, |i| {
            src.docs[i].len as usize
        });
        Ok(OpenShard {
            writer: ShardWriter::create(&path, src.tok.info.token_width)?,
            groups: groups.iter().map(|g| g.len()).collect(),
            pending: Vec::new(),
            ready: None,
            domain: p.domain,
            file: p.file.clone(),
        })
    }

    /// Add the next document; when it completes a row group, tokenize that group while the
    /// previous one is written. True once the shard's last document is in.
    fn push(&mut self, src: &Sources, i: usize, doc: Document, progress: &dyn Progress) -> Result<bool> {
        self.pending.push((i, doc));
        if Some(&self.pending.len()) != self.groups.front() {
            return Ok(false);
        }
        self.groups.pop_front();
        let group = std::mem::take(&mut self.pending);
        let (ready, domain, writer) = (self.ready.take(), self.domain, &mut self.writer);
        let (tokens, written) = rayon::join(
            || tokenize(src.tok, &group, progress),
            || ready.map_or(Ok(()), |(docs, tokens)| write_group(writer, src, domain, &docs, tokens)),
        );
        written?;
        self.ready = Some((group, tokens?));
        Ok(self.groups.is_empty())
    }

    /// Write the last row group and close the shard: its manifest entry.
    fn finish(mut self, src: &Sources) -> Result<ShardInfo> {
        if let Some((docs, tokens)) = self.ready.take() {
            write_group(&mut self.writer, src, self.domain, &docs, tokens)?;
        }
        let w = self.writer.finish()?;
        Ok(ShardInfo {
            file: self.file,
            rows: w.rows,
            tokens: w.tokens,
            bytes: w.bytes,
            sha256: w.sha256,
        })
    }
}

fn tokenize(tok: &LoadedTokenizer, group: &[(usize, Document)], progress: &dyn Progress) -> Result<Vec<Vec<u32>>> {
    group
        .par_iter()
        .with_max_len(DOCS_PER_TASK)
        .map(|(_, d)| {
            let tokens = tok
                .encode(&d.text)
                .map_err(|e| Error::Invalid(format!("tokenizing {}: {e}", d.id)))?;
            progress.advance(d.text.len() as u64, 1, tokens.len() as u64);
            Ok(tokens)
        })
        .collect()
}

fn write_group(
    writer: &mut ShardWriter,
    src: &Sources,
    domain: Domain,
    docs: &[(usize, Document)],
    tokens: Vec<Vec<u32>>,
) -> Result<()> {
    let rows: Vec<ShardRow> = docs
        .iter()
        .zip(tokens)
        .map(|((i, d), tokens)| ShardRow {
            id: &d.id,
            domain,
            lang: d.lang.as_deref(),
            source: &d.source,
            text: &d.text,
            tokens,
            hash: src.docs[*i].hash,
        })
        .collect();
    Ok(writer.write(&rows)?)
}

fn state_path(state_dir: &Path, p: &PlannedShard) -> std::path::PathBuf {
    state_dir.join(format!("{}.json", p.file.replace('/', "-")))
}

fn write_state(state_dir: &Path, p: &PlannedShard, info: &ShardInfo) -> Result<()> {
    let state = ShardState {
        fingerprint: p.fingerprint,
        info: info.clone(),
    };
    Ok(write_atomic(
        &state_path(state_dir, p),
        &serde_json::to_vec(&state).expect("state serialises"),
    )?)
}

/// The shard's recorded info when an earlier run finished exactly this shard and the
/// file on disk still has the checksum it was written with.
fn completed(state_dir: &Path, p: &PlannedShard, path: &Path) -> Result<Option<ShardInfo>> {
    let Ok(bytes) = std::fs::read(state_path(state_dir, p)) else {
        return Ok(None);
    };
    let Ok(state) = serde_json::from_slice::<ShardState>(&bytes) else {
        return Ok(None);
    };
    if state.fingerprint != p.fingerprint || !path.exists() {
        return Ok(None);
    }
    let (sha256, bytes) = file_sha256(path)?;
    Ok((sha256 == state.info.sha256 && bytes == state.info.bytes).then_some(state.info))
}

#[cfg(test)]
mod tests {
    use super::bounded_runs;

    #[test]
    fn runs_close_before_either_bound_would_be_passed() {
        let sizes = [3usize, 4, 1, 9, 2, 2, 2, 2, 2];
        let items: Vec<usize> = (0..sizes.len()).collect();
        let runs = |max_items, max_bytes| {
            bounded_runs(&items, max_items, max_bytes, |i| sizes[i])
                .into_iter()
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        };
        // 8 bytes: 3+4+1 fits exactly; 9 alone is over and still gets a run of its own.
        assert_eq!(runs(100, 8), [vec![0, 1, 2], vec![3], vec![4, 5, 6, 7], vec![8]]);
        assert_eq!(runs(2, 100), [vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7], vec![8]]);
        assert_eq!(
            runs(3, 5),
            [vec![0], vec![1, 2], vec![3], vec![4, 5], vec![6, 7], vec![8]]
        );
        assert!(bounded_runs(&[], 1, 1, |_| 0).is_empty());
    }
}
