//! Pass 1 of `split`: every input read once into an index of its documents without their
//! text (content hash, input-order key, length, domain, location, MinHash signature), then
//! exact and near dedup over the index. Memory grows with the number of documents, not
//! with their size: the text is read again, file by file, when the shards are written.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mmrec_schemas::{Domain, DuplicateRecord, InputInfo, NearDupSettings, QuarantineRecord};
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::classify::classify;
use crate::dedup::{normalized_hash, ExactDedup, MinHasher, NearDedup};
use crate::error::Result;
use crate::global_dedup::order_key;
use crate::input::{read_file, Document, InputFile, Record};
use crate::options::{Progress, SplitOptions};
use crate::DOCS_PER_TASK;

/// One document of this part, without its text.
pub struct DocEntry {
    pub id: Arc<str>,
    pub lang: Option<String>,
    /// The input file, and the document's place among that file's documents.
    pub file: usize,
    pub ordinal: usize,
    /// Normalized content hash: exact dedup, partitioning, the shard's `hash` column.
    pub hash: u64,
    /// Hash of the exact text, for the shard plan's fingerprints.
    pub text_hash: u64,
    pub len: u64,
    pub domain: Domain,
    /// MinHash signature, with `--near-dup` only.
    pub signature: Option<Vec<u32>>,
}

impl DocEntry {
    /// The key that orders documents as the inputs do, across files.
    pub fn order(&self) -> u64 {
        order_key(self.file, self.ordinal)
    }
}

/// A file's documents kept from pass 1 for pass 2 (by their place among the file's
/// documents), so that pass 2 need not read the file again.
pub type Retained = std::sync::Mutex<Option<Vec<(usize, Document)>>>;

/// What pass 1 found: the index of this part's documents in input order, its quarantined
/// records, each input's manifest entry, and per input the documents kept in memory.
pub struct Index {
    pub docs: Vec<DocEntry>,
    pub quarantine: Vec<QuarantineRecord>,
    pub inputs: Vec<InputInfo>,
    pub retained: Vec<Retained>,
}

/// Read every input (parallel over files; records stay in file order) into the index.
/// Each file's documents are hashed, classified and cut to this part as soon as they are
/// parsed. Their text is kept for pass 2 while `keep_text_bytes` allows (which files fit
/// depends on timing; the output does not), and dropped otherwise.
pub fn index_inputs(opts: &SplitOptions, files: &[InputFile], progress: &dyn Progress) -> Result<Index> {
    let hasher = opts.near_dup.as_ref().map(|nd| MinHasher::new(nd, opts.seed));
    let budget = std::sync::atomic::AtomicU64::new(opts.keep_text_bytes);
    let per_file: Vec<(Vec<DocEntry>, Vec<QuarantineRecord>, InputInfo, Retained)> = files
        .par_iter()
        .enumerate()
        .map(|(file_index, f)| {
            let read = read_file(f, &opts.read)?;
            progress.advance(read.bytes, 0, 0);
            let (docs, bad) = owned_records(opts, read.records);
            let (entries, docs): (Vec<DocEntry>, Vec<(usize, Document)>) = docs
                .into_par_iter()
                .with_max_len(DOCS_PER_TASK)
                .filter(|(_, _, hash)| opts.partition.owns(*hash))
                .map(|(ordinal, d, hash)| {
                    let entry = DocEntry {
                        domain: d.domain_hint.unwrap_or_else(|| classify(&d.text)),
                        signature: hasher.as_ref().map(|h| h.signature(&d.text)),
                        text_hash: xxh3_64(d.text.as_bytes()),
                        len: d.text.len() as u64,
                        id: Arc::from(d.id.as_str()),
                        lang: d.lang.clone(),
                        file: file_index,
                        ordinal,
                        hash,
                    };
                    (entry, (ordinal, d))
                })
                .unzip();
            let size: u64 = docs.iter().map(|(_, d)| (d.text.len() + d.id.len()) as u64).sum();
            let fits = budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(size))
                .is_ok();
            let info = InputInfo {
                path: f.path.to_string_lossy().into_owned(),
                bytes: read.bytes,
                sha256: read.sha256,
                declared: f.declared.map_or("auto".to_string(), |d| d.to_string()),
            };
            Ok((entries, bad, info, std::sync::Mutex::new(fits.then_some(docs))))
        })
        .collect::<Result<_>>()?;
    let mut index = Index {
        docs: Vec::new(),
        quarantine: Vec::new(),
        inputs: Vec::with_capacity(per_file.len()),
        retained: Vec::with_capacity(per_file.len()),
    };
    for (docs, bad, info, retained) in per_file {
        index.docs.extend(docs);
        index.quarantine.extend(bad);
        index.inputs.push(info);
        index.retained.push(retained);
    }
    Ok(index)
}

/// A file's documents with their place among its documents and content hash, and the
/// quarantined records this part owns (by file and line, so each lands in one part).
fn owned_records(opts: &SplitOptions, records: Vec<Record>) -> (Vec<(usize, Document, u64)>, Vec<QuarantineRecord>) {
    let mut bad = Vec::new();
    let docs: Vec<Document> = records
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
    let docs = docs
        .into_iter()
        .zip(hashes)
        .enumerate()
        .map(|(k, (d, h))| (k, d, h))
        .collect();
    (docs, bad)
}

/// What dedup keeps and why it dropped the rest.
pub struct Dedup {
    /// Indices into the index of the documents kept, in input order.
    pub keep: Vec<usize>,
    pub duplicates: Vec<DuplicateRecord>,
    pub exact: u64,
    pub near: u64,
    /// A part of several cannot see the others' documents: it keeps its near-duplicates
    /// and leaves the signatures of what it keeps (aligned with `keep`) for `merge`.
    pub deferred: Option<Vec<Vec<u32>>>,
}

/// Exact, then near duplicates; the first occurrence in input order is kept. Takes the
/// signatures out of the index (they are not needed after this).
pub fn deduplicate(opts: &SplitOptions, docs: &mut [DocEntry]) -> Dedup {
    let mut duplicates = Vec::new();
    let mut exact = ExactDedup::default();
    let mut keep: Vec<usize> = Vec::with_capacity(docs.len());
    for (i, d) in docs.iter().enumerate() {
        match exact.insert(d.hash, i) {
            None => keep.push(i),
            Some(first) => duplicates.push(duplicate(d, &docs[first], "exact")),
        }
    }
    let exact_count = duplicates.len() as u64;
    let mut deferred = None;
    if let Some(nd) = &opts.near_dup {
        let sigs: Vec<Vec<u32>> = keep
            .iter()
            .map(|&i| docs[i].signature.take().expect("signed in pass 1"))
            .collect();
        if opts.partition.count > 1 {
            deferred = Some(sigs);
        } else {
            keep = near_dedup(*nd, keep, sigs, docs, &mut duplicates);
        }
        docs.iter_mut().for_each(|d| d.signature = None);
    }
    Dedup {
        near: duplicates.len() as u64 - exact_count,
        exact: exact_count,
        keep,
        duplicates,
        deferred,
    }
}

fn duplicate(removed: &DocEntry, kept: &DocEntry, kind: &str) -> DuplicateRecord {
    DuplicateRecord {
        id: removed.id.to_string(),
        kind: kind.into(),
        kept: kept.id.to_string(),
    }
}

/// Greedy near-dedup in input order over `keep` (with `sigs` aligned to it): the rule a
/// single run applies, and `merge` applies across parts.
fn near_dedup(
    nd: NearDupSettings,
    keep: Vec<usize>,
    sigs: Vec<Vec<u32>>,
    docs: &[DocEntry],
    duplicates: &mut Vec<DuplicateRecord>,
) -> Vec<usize> {
    let mut index = NearDedup::new(nd);
    let mut kept = Vec::with_capacity(keep.len());
    for (i, sig) in keep.into_iter().zip(sigs) {
        match index.insert(i, sig) {
            None => kept.push(i),
            Some(first) => duplicates.push(duplicate(&docs[i], &docs[first], "near")),
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-document cost the README states for pass 1's index: the entry itself, before
    /// its id, language and (with `--near-dup`) signature on the heap.
    #[test]
    fn an_index_entry_takes_112_bytes_before_its_strings_and_signature() {
        assert_eq!(std::mem::size_of::<DocEntry>(), 112);
    }
}
