//! `mmrec-data split`: inputs → read → partition → dedup → classify → tokenize → shards.
//!
//! Every step before tokenizing is cheap and deterministic, so the whole shard plan is
//! known before any token is computed. That makes resuming simple and exact: a planned
//! shard whose file still matches the checksum recorded when it was finished is kept, and
//! every other one is (re)written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mmrec_schemas::{
    Domain, DomainTotals, InputInfo, Manifest, NearDupSettings, Partition, QuarantineRecord, Rejected, Settings,
    ShardInfo, Totals, SCHEMA_VERSION,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::classify::{classify, CLASSIFIER_NAME};
use crate::dedup::{normalized_hash, ExactDedup, MinHasher, NearDedup};
use crate::error::{Error, IoContext, Result};
use crate::global_dedup::{order_key, write_signatures, SignatureRecord, SIGNATURES};
use crate::input::{expand_inputs, read_file, Document, InputSpec, ReadOptions, Record};
use crate::tokenize::LoadedTokenizer;
use crate::DOCS_PER_TASK;
use mmrec_schemas::atomic::{file_sha256, is_temp_name, write_atomic};
use mmrec_schemas::shard::{ShardRow, ShardWriter};
use mmrec_schemas::{write_manifest, MANIFEST};

pub const QUARANTINE: &str = "quarantine.jsonl";
pub const DUPLICATES: &str = "duplicates.jsonl";
const STATE_DIR: &str = ".state";

#[derive(Debug, Clone)]
pub struct SplitOptions {
    pub inputs: Vec<InputSpec>,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub read: ReadOptions,
    pub near_dup: Option<NearDupSettings>,
    pub shard_docs: usize,
    pub row_group_docs: usize,
    /// Text bytes at which a shard or row group closes early: source files can be large, and
    /// a row group is held in memory twice over (tokens, Arrow batch, encoded pages) while
    /// it is written.
    pub shard_bytes: u64,
    pub row_group_bytes: u64,
    pub partition: Partition,
    pub seed: u64,
    /// Read what symbolic links inside input directories point to (off: they are
    /// quarantined as `symlink`).
    pub follow_symlinks: bool,
}

impl SplitOptions {
    /// The defaults of `mmrec-data split`: 4 MiB records, one document per plain-text file,
    /// shards of 50 000 documents or 256 MiB of text in row groups of 2048 documents or
    /// 8 MiB of text, exact dedup only, no partition.
    pub fn new(inputs: Vec<InputSpec>, tokenizer: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        SplitOptions {
            inputs,
            tokenizer: tokenizer.into(),
            out: out.into(),
            read: ReadOptions {
                field: None,
                max_bytes: 4 << 20,
                plain_split: crate::input::PlainSplit::File,
            },
            near_dup: None,
            shard_docs: 50_000,
            row_group_docs: 2048,
            shard_bytes: 256 << 20,
            row_group_bytes: 8 << 20,
            partition: Partition::WHOLE,
            seed: 0,
            follow_symlinks: false,
        }
    }
}

/// Hooks for a progress display; the library itself never prints.
pub trait Progress: Sync {
    fn phase(&self, _name: &'static str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64, _docs: u64, _tokens: u64) {}
}

impl Progress for () {}

#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub manifest: Manifest,
    pub out: PathBuf,
    pub shards_written: usize,
    pub shards_kept: usize,
    pub input_bytes: u64,
    pub seconds: f64,
    pub tokenize_seconds: f64,
}

/// One line of `duplicates.jsonl`: what dedup removed and the document it kept instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DuplicateRecord {
    pub id: String,
    pub kind: String,
    pub kept: String,
}

struct PlannedShard {
    domain: Domain,
    file: String,
    docs: Vec<usize>,
    fingerprint: u64,
}

/// What one input file gives this part: its documents with their dedup hashes, its
/// quarantined records, and its manifest entry.
struct FileShare {
    /// This part's documents with their content hash and input-order key.
    docs: Vec<(Document, u64, u64)>,
    bad: Vec<QuarantineRecord>,
    info: InputInfo,
}

/// Sidecar proving a shard was completed by a run with the same plan.
#[derive(Debug, Serialize, Deserialize)]
struct ShardState {
    fingerprint: u64,
    info: ShardInfo,
}

pub fn split(opts: &SplitOptions, progress: &dyn Progress) -> Result<SplitReport> {
    let started = Instant::now();
    if opts.shard_docs == 0 || opts.row_group_docs == 0 || opts.shard_bytes == 0 || opts.row_group_bytes == 0 {
        return Err(Error::Invalid(
            "--shard-docs, --row-group-docs, --shard-mb and --row-group-mb must be above 0".into(),
        ));
    }
    let tok = LoadedTokenizer::load(&opts.tokenizer)?;
    let files = expand_inputs(&opts.inputs, opts.follow_symlinks)?;
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;

    // Read and checksum every input (parallel over files; records stay in file order).
    // Each file's documents are hashed and cut to this part as soon as they are parsed, so
    // that a part holds only its own documents in memory.
    let input_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.phase("read", input_bytes);
    let read: Vec<FileShare> = files
        .par_iter()
        .enumerate()
        .map(|(file_index, f)| {
            let read = read_file(f, &opts.read)?;
            progress.advance(read.bytes, 0, 0);
            let mut bad = Vec::new();
            let docs: Vec<Document> = read
                .records
                .into_iter()
                .filter_map(|r| match r {
                    Record::Doc(d) => Some(d),
                    Record::Bad(q) => {
                        if opts
                            .partition
                            .owns(xxh3_64(format!("{}:{}", q.file, q.line).as_bytes()))
                        {
                            bad.push(q);
                        }
                        None
                    }
                })
                .collect();
            // Partition by content hash, so that copies of a document always meet in one part.
            let hashes: Vec<u64> = docs
                .par_iter()
                .with_max_len(DOCS_PER_TASK)
                .map(|d| normalized_hash(&d.text))
                .collect();
            // Each document's place in the input order goes with it: a partitioned run's
            // global near-dedup replays the single run's order from it.
            let owned = docs
                .into_iter()
                .zip(hashes)
                .enumerate()
                .filter(|(_, (_, h))| opts.partition.owns(*h))
                .map(|(k, (d, h))| (d, h, order_key(file_index, k)))
                .collect();
            let declared = f.declared.map_or("auto".to_string(), |d| d.to_string());
            Ok(FileShare {
                docs: owned,
                bad,
                info: InputInfo {
                    path: f.path.to_string_lossy().into_owned(),
                    bytes: read.bytes,
                    sha256: read.sha256,
                    declared,
                },
            })
        })
        .collect::<Result<_>>()?;

    let mut inputs = Vec::with_capacity(read.len());
    let mut docs: Vec<Document> = Vec::new();
    let mut hashes: Vec<u64> = Vec::new();
    let mut orders: Vec<u64> = Vec::new();
    let mut quarantine: Vec<QuarantineRecord> = Vec::new();
    for FileShare { docs: owned, bad, info } in read {
        inputs.push(info);
        for (d, h, o) in owned {
            docs.push(d);
            hashes.push(h);
            orders.push(o);
        }
        quarantine.extend(bad);
    }
    let records_in = (docs.len() + quarantine.len()) as u64;

    // Exact, then near duplicates; the first occurrence in input order is kept.
    let mut duplicates = Vec::new();
    let mut exact = ExactDedup::default();
    let mut keep: Vec<usize> = Vec::with_capacity(docs.len());
    for (i, &h) in hashes.iter().enumerate() {
        match exact.insert(h, i) {
            None => keep.push(i),
            Some(first) => duplicates.push(DuplicateRecord {
                id: docs[i].id.clone(),
                kind: "exact".into(),
                kept: docs[first].id.clone(),
            }),
        }
    }
    let exact_duplicates = duplicates.len() as u64;
    // One part of several cannot see the others' documents: it keeps its near-duplicates
    // and leaves their signatures for `merge`, which removes them across all parts.
    let mut deferred: Option<Vec<Vec<u32>>> = None;
    if let Some(nd) = &opts.near_dup {
        let hasher = MinHasher::new(nd, opts.seed);
        let sigs: Vec<Vec<u32>> = keep
            .par_iter()
            .with_max_len(DOCS_PER_TASK)
            .map(|&i| hasher.signature(&docs[i].text))
            .collect();
        if opts.partition.count > 1 {
            deferred = Some(sigs);
        } else {
            keep = near_dedup(*nd, keep, sigs, &docs, &mut duplicates);
        }
    }
    let near_duplicates = duplicates.len() as u64 - exact_duplicates;

    // Metadata first, content classifier for the rest.
    let domains: Vec<Domain> = keep
        .par_iter()
        .with_max_len(DOCS_PER_TASK)
        .map(|&i| docs[i].domain_hint.unwrap_or_else(|| classify(&docs[i].text)))
        .collect();

    let plan = plan_shards(opts, &tok, &docs, &keep, &domains);
    if let (Some(sigs), Some(nd)) = (deferred, &opts.near_dup) {
        write_part_signatures(
            opts,
            nd.num_perm,
            &plan,
            &docs,
            &orders,
            keep.iter().copied().zip(sigs).collect(),
        )?;
    }
    let state_dir = opts.out.join(STATE_DIR);
    std::fs::create_dir_all(&state_dir).at(&state_dir)?;
    remove_stale(opts, &plan)?;

    let total_bytes: u64 = plan
        .iter()
        .flat_map(|p| &p.docs)
        .map(|&i| docs[i].text.len() as u64)
        .sum();
    progress.phase("tokenize", total_bytes);
    let tokenize_started = Instant::now();
    let width = tok.info.token_width;
    let outcomes: Vec<(ShardInfo, bool)> = plan
        .par_iter()
        .map(|p| {
            let path = opts.out.join(&p.file);
            if let Some(info) = completed(&state_dir, p, &path)? {
                progress.advance(
                    p.docs.iter().map(|&i| docs[i].text.len() as u64).sum(),
                    p.docs.len() as u64,
                    info.tokens,
                );
                return Ok((info, true));
            }
            let tokenize = |group: &[usize]| -> Result<Vec<ShardRow>> {
                group
                    .par_iter()
                    .with_max_len(DOCS_PER_TASK)
                    .map(|&i| {
                        let d = &docs[i];
                        let tokens = tok
                            .encode(&d.text)
                            .map_err(|e| Error::Invalid(format!("tokenizing {}: {e}", d.id)))?;
                        progress.advance(d.text.len() as u64, 1, tokens.len() as u64);
                        Ok(ShardRow {
                            id: &d.id,
                            domain: p.domain,
                            lang: d.lang.as_deref(),
                            source: &d.source,
                            text: &d.text,
                            tokens,
                            hash: hashes[i],
                        })
                    })
                    .collect()
            };
            std::fs::create_dir_all(path.parent().expect("shard paths have a domain directory")).at(&path)?;
            let mut writer = ShardWriter::create(&path, width)?;
            // Row group k is encoded and compressed while k + 1 is tokenized.
            let mut ready: Option<Vec<ShardRow>> = None;
            for group in bounded_runs(&p.docs, opts.row_group_docs, opts.row_group_bytes, |i| {
                docs[i].text.len()
            }) {
                let (next, written) = rayon::join(
                    || tokenize(group),
                    || ready.take().map_or(Ok(()), |rows| writer.write(&rows)),
                );
                written?;
                ready = Some(next?);
            }
            if let Some(rows) = ready {
                writer.write(&rows)?;
            }
            let w = writer.finish()?;
            let info = ShardInfo {
                file: p.file.clone(),
                rows: w.rows,
                tokens: w.tokens,
                bytes: w.bytes,
                sha256: w.sha256,
            };
            let state = ShardState {
                fingerprint: p.fingerprint,
                info: info.clone(),
            };
            write_atomic(
                &state_path(&state_dir, p),
                &serde_json::to_vec(&state).expect("state serialises"),
            )?;
            Ok((info, false))
        })
        .collect::<Result<_>>()?;
    let tokenize_seconds = tokenize_started.elapsed().as_secs_f64();

    write_jsonl(&opts.out.join(QUARANTINE), &quarantine)?;
    write_jsonl(&opts.out.join(DUPLICATES), &duplicates)?;

    let mut by_domain: BTreeMap<Domain, Vec<ShardInfo>> = Domain::ALL.iter().map(|d| (*d, Vec::new())).collect();
    let mut totals = Totals {
        records_in,
        exact_duplicates,
        near_duplicates,
        quarantined: quarantine.len() as u64,
        ..Totals::default()
    };
    for d in Domain::ALL {
        totals.per_domain.insert(d, DomainTotals::default());
    }
    for (p, (info, _)) in plan.iter().zip(&outcomes) {
        let dt = totals.per_domain.get_mut(&p.domain).expect("every domain has totals");
        dt.documents += info.rows;
        dt.tokens += info.tokens;
        dt.text_bytes += p.docs.iter().map(|&i| docs[i].text.len() as u64).sum::<u64>();
        by_domain
            .get_mut(&p.domain)
            .expect("every domain has a list")
            .push(info.clone());
    }
    totals.written = totals.per_domain.values().map(|d| d.documents).sum();
    totals.tokens = totals.per_domain.values().map(|d| d.tokens).sum();
    totals.text_bytes = totals.per_domain.values().map(|d| d.text_bytes).sum();
    debug_assert!(totals.balances());

    let mut by_reason = BTreeMap::new();
    for q in &quarantine {
        *by_reason.entry(q.reason.clone()).or_insert(0u64) += 1;
    }
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool_version: format!("mmrec-data {}", env!("CARGO_PKG_VERSION")),
        tokenizer: tok.info.clone(),
        inputs,
        domains: by_domain,
        totals,
        rejected: Rejected {
            count: quarantine.len() as u64,
            by_reason,
            quarantine_file: QUARANTINE.into(),
        },
        settings: Settings {
            classifier: CLASSIFIER_NAME.into(),
            near_dup: opts.near_dup,
            max_bytes: opts.read.max_bytes,
            shard_docs: opts.shard_docs,
            row_group_docs: opts.row_group_docs,
            shard_bytes: opts.shard_bytes,
            row_group_bytes: opts.row_group_bytes,
            text_field: opts.read.field.clone(),
            seed: opts.seed,
            partition: opts.partition,
        },
    };
    write_manifest(&opts.out, &manifest)?;
    let shards_kept = outcomes.iter().filter(|(_, kept)| *kept).count();
    Ok(SplitReport {
        manifest,
        out: opts.out.clone(),
        shards_written: outcomes.len() - shards_kept,
        shards_kept,
        input_bytes,
        seconds: started.elapsed().as_secs_f64(),
        tokenize_seconds,
    })
}

fn plan_shards(
    opts: &SplitOptions,
    tok: &LoadedTokenizer,
    docs: &[Document],
    keep: &[usize],
    domains: &[Domain],
) -> Vec<PlannedShard> {
    let mut plan = Vec::new();
    for domain in Domain::ALL {
        let members: Vec<usize> = keep
            .iter()
            .zip(domains)
            .filter(|(_, d)| **d == domain)
            .map(|(i, _)| *i)
            .collect();
        for (k, chunk) in bounded_runs(&members, opts.shard_docs, opts.shard_bytes, |i| docs[i].text.len())
            .into_iter()
            .enumerate()
        {
            let mut h = Xxh3::new();
            h.update(&SCHEMA_VERSION.to_le_bytes());
            h.update(tok.info.sha256.as_bytes());
            h.update(&(opts.row_group_docs as u64).to_le_bytes());
            h.update(&opts.row_group_bytes.to_le_bytes());
            h.update(domain.as_str().as_bytes());
            for &i in chunk {
                let d = &docs[i];
                h.update(d.id.as_bytes());
                h.update(&xxh3_64(d.text.as_bytes()).to_le_bytes());
                h.update(d.lang.as_deref().unwrap_or("").as_bytes());
                h.update(b"\0");
            }
            plan.push(PlannedShard {
                domain,
                file: format!("{domain}/part-{:05}-{k:05}.parquet", opts.partition.index),
                docs: chunk.to_vec(),
                fingerprint: h.digest(),
            });
        }
    }
    plan
}

/// Greedy near-dedup in input order over `keep` (with `sigs` aligned to it): the rule a
/// single run applies, and `merge` applies across parts.
fn near_dedup(
    nd: NearDupSettings,
    keep: Vec<usize>,
    sigs: Vec<Vec<u32>>,
    docs: &[Document],
    duplicates: &mut Vec<DuplicateRecord>,
) -> Vec<usize> {
    let mut index = NearDedup::new(nd);
    let mut kept = Vec::with_capacity(keep.len());
    for (i, sig) in keep.into_iter().zip(sigs) {
        match index.insert(i, sig) {
            None => kept.push(i),
            Some(first) => duplicates.push(DuplicateRecord {
                id: docs[i].id.clone(),
                kind: "near".into(),
                kept: docs[first].id.clone(),
            }),
        }
    }
    kept
}

/// A part's signature file: each written document's input-order key, shard and row.
fn write_part_signatures(
    opts: &SplitOptions,
    num_perm: usize,
    plan: &[PlannedShard],
    docs: &[Document],
    orders: &[u64],
    mut sigs: HashMap<usize, Vec<u32>>,
) -> Result<()> {
    let mut records = Vec::with_capacity(sigs.len());
    for p in plan {
        for (row, &i) in p.docs.iter().enumerate() {
            let signature = sigs.remove(&i).expect("every planned document was signed");
            records.push(SignatureRecord {
                order: orders[i],
                shard: p.file.clone(),
                row: row as u32,
                id: docs[i].id.clone(),
                signature,
            });
        }
    }
    write_signatures(&opts.out.join(SIGNATURES), num_perm, &records)
}

/// Consecutive runs of `items`, each closed before it would pass `max_items` items or
/// `max_bytes` bytes; an item larger than `max_bytes` makes a run of its own.
fn bounded_runs(items: &[usize], max_items: usize, max_bytes: u64, bytes_of: impl Fn(usize) -> usize) -> Vec<&[usize]> {
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

fn state_path(state_dir: &Path, p: &PlannedShard) -> PathBuf {
    state_dir.join(format!("{}.json", p.file.replace('/', "-")))
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

/// Delete leftovers a killed or different earlier run left in this part's namespace:
/// temporary files, and shards that are not in the current plan.
fn remove_stale(opts: &SplitOptions, plan: &[PlannedShard]) -> Result<()> {
    // An earlier run's manifest goes first: if this run fails after replacing some
    // shards, no manifest may describe the mix of old and new ones.
    match std::fs::remove_file(opts.out.join(MANIFEST)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(mmrec_schemas::Error::Io {
                path: opts.out.join(MANIFEST),
                source: e,
            }
            .into())
        }
        _ => {}
    }
    let prefix = format!("part-{:05}-", opts.partition.index);
    for domain in Domain::ALL {
        let dir = opts.out.join(domain.as_str());
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.at(&dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let planned = plan.iter().any(|p| p.file == format!("{domain}/{name}"));
            if is_temp_name(&name) || (name.starts_with(&prefix) && !planned) {
                std::fs::remove_file(entry.path()).at(entry.path())?;
            }
        }
    }
    Ok(())
}

pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r).expect("records serialise");
        buf.push(b'\n');
    }
    Ok(write_atomic(path, &buf)?)
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
