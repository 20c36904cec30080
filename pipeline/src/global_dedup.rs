//! Near-duplicates removed across the parts of a partitioned run (`split --part i/n`),
//! as datatrove's multi-stage MinHash does: each part writes its documents' MinHash
//! signatures beside its shards instead of deduplicating alone, and `merge` runs the one
//! deterministic rule a single run uses (walk the documents in input order, keep one unless
//! a kept document is estimated at or above the threshold) over every part's signatures,
//! then rewrites only the shards that lose documents. The merged output holds exactly the
//! documents a single run keeps.
//!
//! Signature file (`near_dup_signatures.bin`, little-endian): one JSON header line
//! `{"format": "mmrec-near-dup-signatures", "version": 1, "num_perm": P, "records": N}`,
//! then per document: its input-order key (u64: input file index << 40 | document index
//! in that file), its row in its shard (u32), the shard's path and the document id (each a
//! u32 byte length and UTF-8), and P u32 signature values: 16 + 4·P bytes plus the two
//! strings, 528 + ~60 bytes a document at the default P = 128.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use mmrec_schemas::{Manifest, NearDupSettings, ShardInfo};

use crate::dedup::NearDedup;
use crate::error::{Error, IoContext, Result};
use arrow_array::cast::AsArray;
use arrow_array::Array;
use mmrec_schemas::atomic::write_atomic;
use mmrec_schemas::columns;
use mmrec_schemas::shard::{token_lists, ShardReader, ShardRow, ShardWriter};
use mmrec_schemas::DuplicateRecord;

pub const SIGNATURES: &str = "near_dup_signatures.bin";
const FORMAT: &str = "mmrec-near-dup-signatures";

/// The input-order key of document `index` of input file `file`.
pub fn order_key(file: usize, index: usize) -> u64 {
    ((file as u64) << 40) | index as u64
}

/// One document's entry in a part's signature file.
#[derive(Debug, Clone, PartialEq)]
pub struct SignatureRecord {
    pub order: u64,
    pub shard: String,
    pub row: u32,
    pub id: String,
    pub signature: Vec<u32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    format: String,
    version: u32,
    num_perm: usize,
    records: u64,
}

pub fn write_signatures(path: &Path, num_perm: usize, records: &[SignatureRecord]) -> Result<()> {
    let header = Header {
        format: FORMAT.into(),
        version: 1,
        num_perm,
        records: records.len() as u64,
    };
    let mut out = serde_json::to_vec(&header).expect("header serialises");
    out.push(b'\n');
    for r in records {
        if r.signature.len() != num_perm {
            return Err(Error::Invalid(format!(
                "{}: signature of {} has {} values, not {num_perm}",
                path.display(),
                r.id,
                r.signature.len()
            )));
        }
        out.extend(r.order.to_le_bytes());
        out.extend(r.row.to_le_bytes());
        for s in [&r.shard, &r.id] {
            out.extend((s.len() as u32).to_le_bytes());
            out.extend(s.as_bytes());
        }
        r.signature.iter().for_each(|v| out.extend(v.to_le_bytes()));
    }
    Ok(write_atomic(path, &out)?)
}

pub fn read_signatures(path: &Path) -> Result<(usize, Vec<SignatureRecord>)> {
    let bad = |message: String| Error::Manifest {
        path: path.to_path_buf(),
        message,
    };
    let mut input = BufReader::new(std::fs::File::open(path).at(path)?);
    let mut line = String::new();
    input.read_line(&mut line).at(path)?;
    let header: Header = serde_json::from_str(&line).map_err(|e| bad(format!("header: {e}")))?;
    if header.format != FORMAT || header.version != 1 {
        return Err(bad(format!("not a version-1 {FORMAT} file")));
    }
    let mut records = Vec::new();
    for k in 0..header.records {
        let mut take = |n: usize, what: &str| {
            take_exact(&mut input, n)
                .at(path)?
                .ok_or_else(|| bad(format!("record {k}: truncated in its {what}")))
        };
        let fixed = take(12, "position")?;
        let order = u64::from_le_bytes(fixed[..8].try_into().expect("8 bytes"));
        let row = u32::from_le_bytes(fixed[8..].try_into().expect("4 bytes"));
        let mut text = |what: &str| -> Result<String> {
            let len = u32::from_le_bytes(take(4, what)?.try_into().expect("4 bytes")) as usize;
            String::from_utf8(take(len, what)?).map_err(|_| bad(format!("record {k}: {what} is not UTF-8")))
        };
        let (shard, id) = (text("shard path")?, text("document id")?);
        let signature = take(4 * header.num_perm, "signature")?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        records.push(SignatureRecord {
            order,
            shard,
            row,
            id,
            signature,
        });
    }
    if take_exact(&mut input, 1).at(path)?.is_some() {
        return Err(bad(format!(
            "data after the {} records the header declares",
            header.records
        )));
    }
    Ok((header.num_perm, records))
}

/// Exactly `n` bytes, or None at a premature end; reads only what is there, so a corrupt
/// length cannot make it allocate more than the file holds.
fn take_exact(input: &mut impl Read, n: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    input.take(n as u64).read_to_end(&mut buf)?;
    Ok((buf.len() == n).then_some(buf))
}

/// A document the global pass removes: its shard and row, and the duplicate record to log.
#[derive(Debug, Clone)]
pub struct Removal {
    pub shard: String,
    pub row: u32,
    pub record: DuplicateRecord,
}

/// The single run's rule over all parts' signatures: documents in input order, each kept
/// unless a kept one is estimated at or above the threshold.
pub fn global_removals(settings: NearDupSettings, parts: Vec<Vec<SignatureRecord>>) -> Vec<Removal> {
    let mut all: Vec<SignatureRecord> = parts.into_iter().flatten().collect();
    all.sort_by_key(|r| r.order);
    let mut index = NearDedup::new(settings);
    // The signatures move into the index; only the ids are needed afterwards.
    let mut ids = Vec::with_capacity(all.len());
    let mut removals = Vec::new();
    for (i, r) in all.into_iter().enumerate() {
        match index.insert(i, r.signature) {
            None => ids.push(r.id),
            Some(first) => {
                let record = DuplicateRecord {
                    id: r.id.clone(),
                    kind: "near".into(),
                    kept: ids[first].clone(),
                };
                ids.push(r.id);
                removals.push(Removal {
                    shard: r.shard,
                    row: r.row,
                    record,
                });
            }
        }
    }
    removals
}

/// Apply `removals` to a merged directory: rewrite each shard that loses rows (the rest
/// stay as linked), update the manifest's shard list and totals, and append the removals
/// to `duplicates.jsonl`.
pub fn apply_removals(out: &Path, merged: &mut Manifest, removals: &[Removal]) -> Result<()> {
    let mut by_shard: BTreeMap<&str, HashSet<u32>> = BTreeMap::new();
    for r in removals {
        by_shard.entry(&r.shard).or_default().insert(r.row);
    }
    for (domain, shards) in merged.domains.iter_mut() {
        let mut kept: Vec<ShardInfo> = Vec::with_capacity(shards.len());
        for s in shards.drain(..) {
            let Some(rows) = by_shard.get(s.file.as_str()) else {
                kept.push(s);
                continue;
            };
            let (info, lost) = rewrite_without(&out.join(&s.file), &s.file, rows)?;
            let t = &mut merged.totals;
            t.written -= lost.documents;
            t.near_duplicates += lost.documents;
            t.tokens -= lost.tokens;
            t.text_bytes -= lost.text_bytes;
            let dt = t.per_domain.entry(*domain).or_default();
            dt.documents -= lost.documents;
            dt.tokens -= lost.tokens;
            dt.text_bytes -= lost.text_bytes;
            match info {
                Some(info) => kept.push(info),
                None => std::fs::remove_file(out.join(&s.file)).at(out.join(&s.file))?,
            }
        }
        *shards = kept;
    }
    let log = out.join(mmrec_schemas::DUPLICATES);
    let mut bytes = std::fs::read(&log).at(&log)?;
    for r in removals {
        serde_json::to_writer(&mut bytes, &r.record).expect("duplicate records serialise");
        bytes.write_all(b"\n").expect("writing to memory");
    }
    Ok(write_atomic(&log, &bytes)?)
}

/// Rewrite the shard at `path` (`file` relative to the manifest) without the rows in
/// `drop` (0-based over the whole shard), keeping its row groups. Returns the new shard's
/// manifest entry (None when no row is left, and the file is then left for the caller to
/// remove) and the totals of what was dropped.
pub fn rewrite_without(
    path: &Path,
    file: &str,
    drop: &std::collections::HashSet<u32>,
) -> Result<(Option<mmrec_schemas::ShardInfo>, mmrec_schemas::DomainTotals)> {
    let reader = ShardReader::open(path)?;
    let width = reader.token_width()?;
    let cols = [
        columns::ID,
        columns::DOMAIN,
        columns::LANG,
        columns::SOURCE,
        columns::TEXT,
        columns::TOKENS,
        columns::HASH,
    ];
    let mut writer = ShardWriter::create(path, width)?;
    let mut lost = mmrec_schemas::DomainTotals::default();
    let mut row = 0u32;
    for batch in reader.batches(&cols, None)? {
        let b = batch?;
        let strings = |i: usize| b.column(i).as_string::<i32>();
        let (id, domain, lang, source) = (strings(0), strings(1), strings(2), strings(3));
        let (text, hash) = (
            b.column(4).as_string::<i64>(),
            b.column(6).as_primitive::<arrow_array::types::UInt64Type>(),
        );
        let mut rows = Vec::with_capacity(b.num_rows());
        for (i, tokens) in token_lists(b.column(5).as_ref()).into_iter().enumerate() {
            if drop.contains(&(row + i as u32)) {
                lost.documents += 1;
                lost.tokens += tokens.len() as u64;
                lost.text_bytes += text.value(i).len() as u64;
                continue;
            }
            let domain = domain.value(i).parse().map_err(|e: String| Error::Parquet {
                path: path.to_path_buf(),
                message: format!("row {}: {e}", row + i as u32),
            })?;
            rows.push(ShardRow {
                id: id.value(i),
                domain,
                lang: lang.is_valid(i).then(|| lang.value(i)),
                source: source.value(i),
                text: text.value(i),
                tokens,
                hash: hash.value(i),
            });
        }
        row += b.num_rows() as u32;
        if !rows.is_empty() {
            writer.write(&rows)?;
        }
    }
    let written = writer.finish()?;
    let info = (written.rows > 0).then(|| mmrec_schemas::ShardInfo {
        file: file.to_string(),
        rows: written.rows,
        tokens: written.tokens,
        bytes: written.bytes,
        sha256: written.sha256,
    });
    Ok((info, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(order: u64, id: &str, signature: Vec<u32>) -> SignatureRecord {
        SignatureRecord {
            order,
            shard: "text/part-00001-00000.parquet".into(),
            row: order as u32,
            id: id.into(),
            signature,
        }
    }

    #[test]
    fn signature_files_round_trip_and_truncation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SIGNATURES);
        let records = vec![
            record(order_key(0, 3), "a.jsonl:4", vec![1, 2, 3, 4]),
            record(order_key(2, 0), "b.jsonl:1 ✓", vec![5, 6, 7, 8]),
        ];
        write_signatures(&path, 4, &records).unwrap();
        assert_eq!(read_signatures(&path).unwrap(), (4, records));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_signatures(&path).unwrap_err().to_string();
        assert!(err.contains("record 1: truncated in its signature"), "{err}");
        std::fs::write(&path, [bytes.as_slice(), b"x"].concat()).unwrap();
        assert!(read_signatures(&path)
            .unwrap_err()
            .to_string()
            .contains("data after the 2 records"));
    }

    #[test]
    fn the_global_pass_keeps_the_first_in_input_order_whatever_the_part_order() {
        let s = NearDupSettings {
            threshold: 0.5,
            num_perm: 4,
            bands: 4,
            shingle_words: 5,
        };
        // Part 1 holds the earlier document; part 0 its near copy and an unrelated one.
        let parts = vec![
            vec![
                record(order_key(1, 0), "late", vec![1, 2, 3, 9]),
                record(order_key(1, 1), "other", vec![7, 7, 7, 7]),
            ],
            vec![record(order_key(0, 5), "early", vec![1, 2, 3, 4])],
        ];
        let removed = global_removals(s, parts);
        assert_eq!(removed.len(), 1);
        assert_eq!(
            (removed[0].record.id.as_str(), removed[0].record.kept.as_str()),
            ("late", "early")
        );
    }
}
