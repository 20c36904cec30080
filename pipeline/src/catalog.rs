//! Operations on a finished shard directory: validate, inspect, merge partial runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type};
use arrow_array::{Array, ListArray};
use arrow_schema::DataType;
use mmrec_schemas::{columns, Domain, Manifest, Partition, ShardInfo, Totals};
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::global_dedup::{apply_removals, global_removals, read_signatures, SIGNATURES};
use mmrec_schemas::atomic::{file_sha256, write_atomic};
use mmrec_schemas::shard::ShardReader;
use mmrec_schemas::{read_manifest, write_manifest, DUPLICATES, MANIFEST, QUARANTINE};

#[derive(Debug, Default, Serialize)]
pub struct Validation {
    pub shards: usize,
    pub rows: u64,
    pub tokens: u64,
    pub problems: Vec<String>,
}

impl Validation {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check a shard directory against its manifest: checksums, schema, per-row invariants,
/// and that every count adds up. Problems are collected, not stopped at.
pub fn validate(dir: &Path) -> Result<Validation> {
    use rayon::prelude::*;
    let m = read_manifest(dir)?;
    let mut v = Validation::default();
    // Shards are checked in parallel, then reported in manifest order.
    let listed: Vec<(Domain, &ShardInfo)> = m
        .domains
        .iter()
        .flat_map(|(d, shards)| shards.iter().map(move |s| (*d, s)))
        .collect();
    let mut checked = listed
        .par_iter()
        .map(|(domain, s)| check_shard(&dir.join(&s.file), *domain, s, m.tokenizer.vocab_size as u32))
        .collect::<Vec<_>>()
        .into_iter();
    for (domain, shards) in &m.domains {
        let mut docs = 0u64;
        let mut tokens = 0u64;
        for _ in shards {
            v.shards += 1;
            match checked.next().expect("one result per listed shard") {
                Ok((rows, toks, mut problems)) => {
                    docs += rows;
                    tokens += toks;
                    v.problems.append(&mut problems);
                }
                Err(e) => v.problems.push(crate::error::describe(&e)),
            }
        }
        v.rows += docs;
        v.tokens += tokens;
        let dt = m.totals.per_domain.get(domain).copied().unwrap_or_default();
        if dt.documents != docs || dt.tokens != tokens {
            v.problems.push(format!(
                "{domain}: manifest totals say {} documents / {} tokens, shards hold {docs} / {tokens}",
                dt.documents, dt.tokens
            ));
        }
        v.problems.extend(unlisted_files(dir, *domain, shards));
    }
    let t = &m.totals;
    if t.written != v.rows || t.tokens != v.tokens {
        v.problems.push(format!(
            "totals say {} written / {} tokens, shards hold {} / {}",
            t.written, t.tokens, v.rows, v.tokens
        ));
    }
    if !t.balances() {
        v.problems.push(format!(
            "counts do not add up: records_in {} != written {} + exact_duplicates {} + near_duplicates {} + quarantined {}",
            t.records_in, t.written, t.exact_duplicates, t.near_duplicates, t.quarantined
        ));
    }
    let by_reason: u64 = m.rejected.by_reason.values().sum();
    if m.rejected.count != t.quarantined || by_reason != t.quarantined {
        v.problems.push(format!(
            "rejected.count {} and its reasons ({by_reason}) must equal quarantined {}",
            m.rejected.count, t.quarantined
        ));
    }
    for (file, expected) in [
        (m.rejected.quarantine_file.as_str(), t.quarantined),
        (DUPLICATES, t.exact_duplicates + t.near_duplicates),
    ] {
        match count_lines(&dir.join(file)) {
            Ok(n) if n == expected => {}
            Ok(n) => v
                .problems
                .push(format!("{file}: {n} lines, manifest counts {expected}")),
            Err(e) => v.problems.push(crate::error::describe(&e)),
        }
    }
    Ok(v)
}

fn check_shard(path: &Path, domain: Domain, s: &ShardInfo, vocab: u32) -> Result<(u64, u64, Vec<String>)> {
    use rayon::prelude::*;
    let name = path.display();
    let reader = ShardReader::open(path)?;
    reader.token_width()?;
    let groups = reader.num_row_groups();
    // The checksum and the row groups in parallel: a shard can be most of a directory.
    let (sum, checked) = rayon::join(
        || file_sha256(path),
        || {
            (0..groups)
                .into_par_iter()
                .map(|g| check_row_group(path, g, domain, vocab))
                .collect::<Result<Vec<_>>>()
        },
    );
    let (sha, bytes) = sum?;
    let mut problems = Vec::new();
    if sha != s.sha256 || bytes != s.bytes {
        problems.push(format!(
            "{name}: sha256/size {sha}/{bytes} does not match the manifest's {}/{}",
            s.sha256, s.bytes
        ));
    }
    let (mut rows, mut tokens) = (0u64, 0u64);
    for group in checked? {
        problems.extend(
            group
                .problems
                .into_iter()
                .map(|(row, what)| format!("{name}: row {} {what}", rows + row)),
        );
        rows += group.rows;
        tokens += group.tokens;
    }
    if rows != s.rows || tokens != s.tokens {
        problems.push(format!(
            "{name}: holds {rows} rows / {tokens} tokens, manifest says {} / {}",
            s.rows, s.tokens
        ));
    }
    Ok((rows, tokens, problems))
}

/// What checking one row group found.
struct GroupCheck {
    rows: u64,
    tokens: u64,
    /// Row within the group, and what is wrong with it.
    problems: Vec<(u64, String)>,
}

/// Reads one row group of a shard whose schema `check_shard` has checked.
fn check_row_group(path: &Path, group: usize, domain: Domain, vocab: u32) -> Result<GroupCheck> {
    let reader = ShardReader::open(path)?;
    let (mut rows, mut tokens, mut problems) = (0u64, 0u64, Vec::new());
    for batch in reader.batches(
        &[columns::DOMAIN, columns::TOKENS, columns::N_TOKENS],
        Some(vec![group]),
    )? {
        let batch = batch?;
        let domains = batch.column(0).as_string::<i32>();
        let lists = batch.column(1).as_list::<i32>();
        let counts = batch.column(2).as_primitive::<UInt32Type>();
        // Lengths from the list offsets and ids straight from the values buffer: no
        // per-row copies of the tokens.
        for (i, (w, &count)) in lists.value_offsets().windows(2).zip(counts.values()).enumerate() {
            let row = rows + i as u64;
            if domains.value(i) != domain.as_str() {
                problems.push((
                    row,
                    format!("has domain {:?} in the {domain} directory", domains.value(i)),
                ));
            }
            let len = (w[1] - w[0]) as u64;
            if count as u64 != len {
                problems.push((row, format!("n_tokens {count} but {len} tokens")));
            }
            tokens += len;
        }
        for (i, t) in out_of_vocabulary(lists, vocab) {
            problems.push((
                rows + i as u64,
                format!("has token id {t} outside the vocabulary ({vocab})"),
            ));
        }
        rows += batch.num_rows() as u64;
    }
    Ok(GroupCheck { rows, tokens, problems })
}

/// Rows of a `tokens` column holding an id ≥ `vocab`, with the first such id of each. One
/// vectorised pass over all ids; rows are searched only when it finds one.
fn out_of_vocabulary(lists: &ListArray, vocab: u32) -> Vec<(usize, u32)> {
    fn scan<T: Copy + Into<u32>>(ids: &[T], offsets: &[i32], vocab: u32) -> Vec<(usize, u32)> {
        let (first, last) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
        if ids[first..last].iter().all(|&t| t.into() < vocab) {
            return Vec::new();
        }
        let row_ids = |w: &[i32]| ids[w[0] as usize..w[1] as usize].iter().map(|&t| t.into());
        offsets
            .windows(2)
            .enumerate()
            .filter_map(|(row, w)| row_ids(w).find(|&t| t >= vocab).map(|t| (row, t)))
            .collect()
    }
    let values = lists.values();
    match values.data_type() {
        DataType::UInt16 => scan(
            values.as_primitive::<UInt16Type>().values(),
            lists.value_offsets(),
            vocab,
        ),
        _ => scan(
            values.as_primitive::<UInt32Type>().values(),
            lists.value_offsets(),
            vocab,
        ),
    }
}

fn unlisted_files(dir: &Path, domain: Domain, shards: &[ShardInfo]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join(domain.as_str())) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| format!("{domain}/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".parquet") && !shards.iter().any(|s| &s.file == f))
        .map(|f| format!("{f}: shard on disk but not in the manifest"))
        .collect()
}

fn count_lines(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).at(path)?;
    Ok(bytes.iter().filter(|&&b| b == b'\n').count() as u64)
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub manifest: Manifest,
    pub samples: BTreeMap<Domain, Vec<Sample>>,
}

#[derive(Debug, Serialize)]
pub struct Sample {
    pub id: String,
    pub lang: Option<String>,
    pub n_tokens: u32,
    pub text: String,
}

/// The manifest plus the first `per_domain` documents of each domain, text cut to `chars`.
pub fn inspect(dir: &Path, per_domain: usize, chars: usize) -> Result<Inspection> {
    let manifest = read_manifest(dir)?;
    let mut samples = BTreeMap::new();
    for (domain, shards) in &manifest.domains {
        let mut got = Vec::new();
        for s in shards {
            if got.len() >= per_domain {
                break;
            }
            let reader = ShardReader::open(&dir.join(&s.file))?;
            if reader.num_row_groups() == 0 {
                continue;
            }
            for batch in reader.batches(
                &[columns::ID, columns::LANG, columns::TEXT, columns::N_TOKENS],
                Some(vec![0]),
            )? {
                let batch = batch?;
                let ids = batch.column(0).as_string::<i32>();
                let langs = batch.column(1).as_string::<i32>();
                let texts = batch.column(2).as_string::<i64>();
                let counts = batch.column(3).as_primitive::<UInt32Type>();
                for i in 0..batch.num_rows().min(per_domain - got.len()) {
                    got.push(Sample {
                        id: ids.value(i).to_string(),
                        lang: (!langs.is_null(i)).then(|| langs.value(i).to_string()),
                        n_tokens: counts.value(i),
                        text: texts.value(i).chars().take(chars).collect(),
                    });
                }
            }
        }
        samples.insert(*domain, got);
    }
    Ok(Inspection { manifest, samples })
}

/// Combine the directories of a partitioned run (`--part i/n` for every i) into one:
/// shards are hard-linked (copied across file systems), logs concatenated in part order,
/// and counts summed. With `--near-dup`, near-duplicates are then removed across parts
/// from the parts' signatures, rewriting the shards that lose documents, so the result
/// holds exactly the documents one run would keep. Refuses parts that disagree on
/// tokenizer, inputs or settings.
pub fn merge(parts: &[PathBuf], out: &Path) -> Result<Manifest> {
    let mut manifests: Vec<(PathBuf, Manifest)> = parts
        .iter()
        .map(|p| Ok((p.clone(), read_manifest(p)?)))
        .collect::<Result<_>>()?;
    manifests.sort_by_key(|(_, m)| m.settings.partition.index);
    check_parts(&manifests)?;
    let first = &manifests[0].1;
    std::fs::create_dir_all(out).at(out)?;
    let mut merged = first.clone();
    merged.settings.partition = Partition::WHOLE;
    merged.totals = Totals::default();
    merged.rejected.by_reason.clear();
    merged.rejected.count = 0;
    merged.domains.values_mut().for_each(Vec::clear);
    let mut logs: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (dir, m) in &manifests {
        link_shards(dir, m, out, &mut merged)?;
        add_counts(&mut merged, m);
        for file in [QUARANTINE, DUPLICATES] {
            logs.entry(file)
                .or_default()
                .extend(std::fs::read(dir.join(file)).at(dir.join(file))?);
        }
    }
    for (file, bytes) in logs {
        write_atomic(&out.join(file), &bytes)?;
    }
    // Parts of a near-deduplicated run left that to the merge (see `global_dedup`).
    if let (Some(nd), true) = (first.settings.near_dup, first.settings.partition.count > 1) {
        let signatures = manifests
            .iter()
            .map(|(dir, _)| read_signatures(&dir.join(SIGNATURES)).map(|(_, records)| records))
            .collect::<Result<Vec<_>>>()?;
        apply_removals(out, &mut merged, &global_removals(nd, signatures))?;
    }
    write_manifest(out, &merged)?;
    Ok(merged)
}

/// The parts (sorted by index) must be 0..n of one run: each once, with one tokenizer, the
/// same settings and the same inputs.
fn check_parts(manifests: &[(PathBuf, Manifest)]) -> Result<()> {
    let (first_dir, first) = manifests
        .first()
        .ok_or_else(|| Error::Invalid("merge needs at least one part".into()))?;
    let n = first.settings.partition.count;
    let bad = |dir: &Path, message: String| Error::Manifest {
        path: dir.join(MANIFEST),
        message,
    };
    let strip = |m: &Manifest| mmrec_schemas::Settings {
        partition: Partition::WHOLE,
        ..m.settings.clone()
    };
    let shas = |m: &Manifest| m.inputs.iter().map(|i| i.sha256.clone()).collect::<Vec<_>>();
    for (i, (dir, m)) in manifests.iter().enumerate() {
        let expected = Partition {
            index: i as u32,
            count: n,
        };
        if m.settings.partition != expected {
            let found = m.settings.partition;
            return Err(bad(
                dir,
                format!("expected part {i}/{n}, found {found} (parts must be 0..{n}, each once)"),
            ));
        }
        if m.tokenizer.sha256 != first.tokenizer.sha256 {
            return Err(bad(
                dir,
                format!(
                    "tokenizer {} differs from {}'s {}",
                    m.tokenizer.sha256,
                    first_dir.display(),
                    first.tokenizer.sha256
                ),
            ));
        }
        if strip(m) != strip(first) {
            return Err(bad(dir, format!("settings differ from {}'s", first_dir.display())));
        }
        if shas(m) != shas(first) {
            return Err(bad(dir, format!("inputs differ from {}'s", first_dir.display())));
        }
    }
    if manifests.len() as u32 != n {
        return Err(Error::Invalid(format!(
            "{} parts given, the run was split into {n}",
            manifests.len()
        )));
    }
    Ok(())
}

/// Link (or copy) part `dir`'s shards into `out`, each verified against its checksum
/// first: a corrupt part must not be linked into the result.
fn link_shards(dir: &Path, m: &Manifest, out: &Path, merged: &mut Manifest) -> Result<()> {
    for (domain, shards) in &m.domains {
        std::fs::create_dir_all(out.join(domain.as_str())).at(out)?;
        for s in shards {
            let (src, dst) = (dir.join(&s.file), out.join(&s.file));
            let (sha256, _) = file_sha256(&src)?;
            if sha256 != s.sha256 {
                return Err(Error::Manifest {
                    path: dir.join(MANIFEST),
                    message: format!(
                        "shard {} has sha256 {sha256}, the manifest says {} (corrupt or replaced)",
                        s.file, s.sha256
                    ),
                });
            }
            if std::fs::hard_link(&src, &dst).is_err() {
                copy_atomic(&src, &dst)?;
            }
            merged.domains.entry(*domain).or_default().push(s.clone());
        }
    }
    Ok(())
}

/// Copy `src` to `dst` under a temporary name, renamed into place when complete.
fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let mut from = std::fs::File::open(src).at(src)?;
    let mut to = mmrec_schemas::atomic::AtomicFile::create(dst)?;
    std::io::copy(&mut from, to.writer()).at(dst)?;
    Ok(to.commit(true)?)
}

/// Add a part's totals and rejection counts to the merged manifest's.
fn add_counts(merged: &mut Manifest, m: &Manifest) {
    let (t, mt) = (&m.totals, &mut merged.totals);
    mt.records_in += t.records_in;
    mt.written += t.written;
    mt.exact_duplicates += t.exact_duplicates;
    mt.near_duplicates += t.near_duplicates;
    mt.quarantined += t.quarantined;
    mt.tokens += t.tokens;
    mt.text_bytes += t.text_bytes;
    for (d, dt) in &t.per_domain {
        let e = mt.per_domain.entry(*d).or_default();
        e.documents += dt.documents;
        e.tokens += dt.tokens;
        e.text_bytes += dt.text_bytes;
    }
    merged.rejected.count += m.rejected.count;
    for (r, c) in &m.rejected.by_reason {
        *merged.rejected.by_reason.entry(r.clone()).or_default() += c;
    }
}
