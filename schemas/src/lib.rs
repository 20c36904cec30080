//! File formats shared by the MM-Rec crates (DESIGN.md §4–§5), versioned.
//!
//! Every format here carries [`SCHEMA_VERSION`]; a reader refuses a newer major version
//! instead of guessing at it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};

/// Version of the shard, manifest and checkpoint formats written by this build.
pub const SCHEMA_VERSION: u32 = 1;

/// The three document domains of DESIGN §1, in the order shards and reports list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Text,
    Code,
    Mixed,
}

impl Domain {
    pub const ALL: [Domain; 3] = [Domain::Text, Domain::Code, Domain::Mixed];

    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Text => "text",
            Domain::Code => "code",
            Domain::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Domain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "prose" => Ok(Domain::Text),
            "code" => Ok(Domain::Code),
            "mixed" => Ok(Domain::Mixed),
            other => Err(format!("unknown domain {other:?} (expected text, code or mixed)")),
        }
    }
}

/// Token ids are stored as u16 when the vocabulary fits, halving shard size and loader traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            TokenWidth::U16 => DataType::UInt16,
            TokenWidth::U32 => DataType::UInt32,
        }
    }
}

/// Column names of a shard, in schema order.
pub mod columns {
    pub const ID: &str = "id";
    pub const DOMAIN: &str = "domain";
    pub const LANG: &str = "lang";
    pub const SOURCE: &str = "source";
    pub const TEXT: &str = "text";
    pub const TOKENS: &str = "tokens";
    pub const N_TOKENS: &str = "n_tokens";
    pub const HASH: &str = "hash";
}

/// The Arrow schema of a shard (DESIGN §4).
pub fn shard_schema(width: TokenWidth) -> Arc<Schema> {
    use columns::*;
    Arc::new(Schema::new(vec![
        Field::new(ID, DataType::Utf8, false),
        Field::new(DOMAIN, DataType::Utf8, false),
        Field::new(LANG, DataType::Utf8, true),
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(TEXT, DataType::LargeUtf8, false),
        Field::new(
            TOKENS,
            DataType::List(Arc::new(Field::new("item", width.data_type(), false))),
            false,
        ),
        Field::new(N_TOKENS, DataType::UInt32, false),
        Field::new(HASH, DataType::UInt64, false),
    ]))
}

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

/// One line of `quarantine.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub file: String,
    /// 1-based line for line-oriented inputs, row index for Parquet, 0 for a whole file.
    pub line: u64,
    pub reason: String,
    pub detail: String,
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

    #[test]
    fn token_width_follows_vocabulary_size() {
        assert_eq!(TokenWidth::for_vocab(65_536), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65_537), TokenWidth::U32);
    }
}
