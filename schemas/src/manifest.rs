//! `manifest.json` (DESIGN §4): what a directory of shards holds, how it was made, and the
//! counts that must add up; with its one reader and one writer.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{atomic, Domain, Error, Result, TokenWidth, SCHEMA_VERSION};

pub const MANIFEST: &str = "manifest.json";
/// Beside the manifest: the records set aside, and what dedup removed.
pub const QUARANTINE: &str = "quarantine.jsonl";
pub const DUPLICATES: &str = "duplicates.jsonl";

/// `manifest.json`, written beside the shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub tool_version: String,
    pub tokenizer: TokenizerInfo,
    pub inputs: Vec<InputInfo>,
    /// Shards per domain; a domain with no documents has an empty list.
    pub domains: BTreeMap<Domain, Vec<ShardInfo>>,
    pub totals: Totals,
    pub rejected: Rejected,
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub path: String,
    pub sha256: String,
    pub vocab_size: usize,
    pub token_width: TokenWidth,
    /// Special tokens and their ids, e.g. `<|endoftext|>`.
    pub special_tokens: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputInfo {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// The domain the user declared (`--text`, `--code`, `--mixed`), or `auto`.
    pub declared: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Path relative to the manifest's directory.
    pub file: String,
    pub rows: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Every record read from the inputs (for a partitioned run: those of this part).
    pub records_in: u64,
    pub written: u64,
    pub exact_duplicates: u64,
    pub near_duplicates: u64,
    pub quarantined: u64,
    pub tokens: u64,
    pub text_bytes: u64,
    pub per_domain: BTreeMap<Domain, DomainTotals>,
}

impl Totals {
    /// The accounting identity every run must satisfy: nothing is lost silently.
    pub fn balances(&self) -> bool {
        self.records_in == self.written + self.exact_duplicates + self.near_duplicates + self.quarantined
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainTotals {
    pub documents: u64,
    pub tokens: u64,
    pub text_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub count: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Path of the quarantine file relative to the manifest, one JSON object per record.
    pub quarantine_file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub classifier: String,
    pub near_dup: Option<NearDupSettings>,
    pub max_bytes: u64,
    pub shard_docs: usize,
    pub row_group_docs: usize,
    /// Text bytes at which a shard, or a row group, is closed before its document count is
    /// reached (0 in manifests written before these bounds existed: none).
    #[serde(default)]
    pub shard_bytes: u64,
    #[serde(default)]
    pub row_group_bytes: u64,
    pub text_field: Option<String>,
    pub seed: u64,
    /// `i/n`: this manifest covers partition `i` of `n` (`0/1` for an unpartitioned run).
    pub partition: Partition,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NearDupSettings {
    pub threshold: f64,
    pub num_perm: usize,
    pub bands: usize,
    pub shingle_words: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    /// Which partition a 64-bit key belongs to. Keys are content hashes, so exact duplicates
    /// always meet in the same partition and per-partition dedup is global dedup.
    pub fn owns(self, key: u64) -> bool {
        // Multiply-shift spreads keys evenly even when `count` is not a power of two.
        ((key as u128 * self.count as u128) >> 64) as u32 == self.index
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("partition {s:?} must look like i/n, e.g. 0/4"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("partition index {i:?} is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("partition count {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("partition {s:?}: need 0 <= i < n"));
        }
        Ok(Partition { index, count })
    }
}

/// One line of `duplicates.jsonl`: what dedup removed and the document it kept instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DuplicateRecord {
    pub id: String,
    pub kind: String,
    pub kept: String,
}

/// One line of `quarantine.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub file: String,
    /// 1-based line for line-oriented inputs, row index for Parquet, 0 for a whole file.
    pub line: u64,
    pub reason: String,
    pub detail: String,
}

pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    json.push(b'\n');
    atomic::write_atomic(&dir.join(MANIFEST), &json)
}

/// Read and check `dir/manifest.json`: its version, and that every shard path stays inside
/// `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|source| Error::Missing {
        path: path.clone(),
        source,
    })?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(&path, format!("not a valid manifest: {e}")))?;
    if m.schema_version > SCHEMA_VERSION {
        return Err(Error::format(
            &path,
            format!(
                "schema_version {} is newer than this tool's {SCHEMA_VERSION}",
                m.schema_version
            ),
        ));
    }
    // Shard paths are relative and stay inside the directory: a forged entry such as
    // `../../x.parquet` would make merge write, and validate read, outside it.
    let escapes = |f: &str| {
        Path::new(f)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    };
    if let Some(s) = m
        .domains
        .values()
        .flatten()
        .find(|s| s.file.is_empty() || escapes(&s.file))
    {
        return Err(Error::format(
            &path,
            format!("shard path {:?} must be relative and inside the directory", s.file),
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_every_key_exactly_once() {
        for n in [1u32, 2, 3, 7] {
            for key in (0..1000u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
                let owners = (0..n).filter(|&i| Partition { index: i, count: n }.owns(key)).count();
                assert_eq!(owners, 1, "key {key} n {n}");
            }
        }
    }

    #[test]
    fn partition_parse_rejects_out_of_range() {
        assert_eq!("1/4".parse::<Partition>().unwrap(), Partition { index: 1, count: 4 });
        assert!("4/4".parse::<Partition>().is_err());
        assert!("0/0".parse::<Partition>().is_err());
        assert!("x".parse::<Partition>().is_err());
    }
}
