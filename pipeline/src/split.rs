//! `mmrec-data split`: inputs → index (read, partition, classify, hash; pass 1) → dedup →
//! shard plan → re-read, tokenize, write (pass 2) → manifest.
//!
//! Every step before tokenizing is cheap and deterministic, so the whole shard plan is
//! known before any token is computed. That makes resuming simple and exact: a planned
//! shard whose file still matches the checksum recorded when it was finished is kept, and
//! every other one is (re)written. Pass 1 keeps no text, so memory follows the number of
//! documents, not the size of the corpus.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mmrec_schemas::{Domain, DomainTotals, Manifest, Rejected, Settings, ShardInfo, Totals, SCHEMA_VERSION};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::classify::CLASSIFIER_NAME;
use crate::error::{Error, IoContext, Result};
use crate::global_dedup::{write_signatures, SignatureRecord, SIGNATURES};
use crate::index::{deduplicate, index_inputs, Dedup, DocEntry, Index};
use crate::input::expand_inputs;
pub use crate::options::{Progress, SplitOptions};
use crate::shards::{bounded_runs, write_shards, PlannedShard, Sources};
use crate::tokenize::LoadedTokenizer;
use mmrec_schemas::atomic::{is_temp_name, write_atomic};
use mmrec_schemas::{write_manifest, DUPLICATES, MANIFEST, QUARANTINE};

const STATE_DIR: &str = ".state";

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
    let input_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.phase("read", input_bytes);
    let mut index = index_inputs(opts, &files, progress)?;
    let dedup = deduplicate(opts, &mut index.docs);
    let plan = plan_shards(opts, &tok, &index.docs, &dedup.keep);
    if let (Some(sigs), Some(nd)) = (&dedup.deferred, &opts.near_dup) {
        write_part_signatures(opts, nd.num_perm, &plan, &index.docs, &dedup.keep, sigs)?;
    }
    let state_dir = opts.out.join(STATE_DIR);
    std::fs::create_dir_all(&state_dir).at(&state_dir)?;
    remove_stale(opts, &plan)?;

    let planned_bytes = plan.iter().flat_map(|p| &p.docs).map(|&i| index.docs[i].len).sum();
    progress.phase("tokenize", planned_bytes);
    let tokenize_started = Instant::now();
    let sources = Sources {
        opts,
        tok: &tok,
        files: &files,
        sha256: index.inputs.iter().map(|i| i.sha256.as_str()).collect(),
        docs: &index.docs,
        retained: &index.retained,
        state_dir: &state_dir,
    };
    let outcomes = write_shards(&sources, &plan, progress)?;
    let tokenize_seconds = tokenize_started.elapsed().as_secs_f64();

    write_jsonl(&opts.out.join(QUARANTINE), &index.quarantine)?;
    write_jsonl(&opts.out.join(DUPLICATES), &dedup.duplicates)?;
    let manifest = build_manifest(opts, &tok, &index, &dedup, &plan, &outcomes);
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

/// The manifest: totals per domain from the written shards, and the counts that must add
/// up (records in = written + duplicates + quarantined).
fn build_manifest(
    opts: &SplitOptions,
    tok: &LoadedTokenizer,
    index: &Index,
    dedup: &Dedup,
    plan: &[PlannedShard],
    outcomes: &[(ShardInfo, bool)],
) -> Manifest {
    let quarantined = index.quarantine.len() as u64;
    let mut by_domain: BTreeMap<Domain, Vec<ShardInfo>> = Domain::ALL.iter().map(|d| (*d, Vec::new())).collect();
    let mut totals = Totals {
        records_in: index.docs.len() as u64 + quarantined,
        exact_duplicates: dedup.exact,
        near_duplicates: dedup.near,
        quarantined,
        per_domain: Domain::ALL.iter().map(|d| (*d, DomainTotals::default())).collect(),
        ..Totals::default()
    };
    for (p, (info, _)) in plan.iter().zip(outcomes) {
        let dt = totals.per_domain.get_mut(&p.domain).expect("every domain has totals");
        dt.documents += info.rows;
        dt.tokens += info.tokens;
        dt.text_bytes += p.docs.iter().map(|&i| index.docs[i].len).sum::<u64>();
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
    for q in &index.quarantine {
        *by_reason.entry(q.reason.clone()).or_insert(0u64) += 1;
    }
    Manifest {
        schema_version: SCHEMA_VERSION,
        tool_version: format!("mmrec-data {}", env!("CARGO_PKG_VERSION")),
        tokenizer: tok.info.clone(),
        inputs: index.inputs.clone(),
        domains: by_domain,
        totals,
        rejected: Rejected {
            count: quarantined,
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
    }
}

/// Per domain, the kept documents in input order cut into shards of at most
/// `shard_docs` documents and `shard_bytes` of text.
fn plan_shards(opts: &SplitOptions, tok: &LoadedTokenizer, docs: &[DocEntry], keep: &[usize]) -> Vec<PlannedShard> {
    let mut plan = Vec::new();
    for domain in Domain::ALL {
        let members: Vec<usize> = keep.iter().copied().filter(|&i| docs[i].domain == domain).collect();
        for (k, chunk) in bounded_runs(&members, opts.shard_docs, opts.shard_bytes, |i| docs[i].len as usize)
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
                h.update(&d.text_hash.to_le_bytes());
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

/// A part's signature file: each written document's input-order key, shard and row.
/// `sigs` is aligned with `keep`.
fn write_part_signatures(
    opts: &SplitOptions,
    num_perm: usize,
    plan: &[PlannedShard],
    docs: &[DocEntry],
    keep: &[usize],
    sigs: &[Vec<u32>],
) -> Result<()> {
    let by_doc: HashMap<usize, &Vec<u32>> = keep.iter().copied().zip(sigs).collect();
    let mut records = Vec::with_capacity(sigs.len());
    for p in plan {
        for (row, &i) in p.docs.iter().enumerate() {
            records.push(SignatureRecord {
                order: docs[i].order(),
                shard: p.file.clone(),
                row: row as u32,
                id: docs[i].id.to_string(),
                signature: by_doc[&i].clone(),
            });
        }
    }
    write_signatures(&opts.out.join(SIGNATURES), num_perm, &records)
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
