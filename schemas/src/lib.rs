//! Every on-disk contract of the MM-Rec toolkit (DESIGN.md §2, §4, §5), each with its one
//! reader and one writer: the shard schema and shards (feature `shards`), `manifest.json`,
//! quarantine records, model files (safetensors with the toolkit's `__metadata__`), the run
//! config and the checkpoint's `state.json`; plus the crash-safe write and hashing helpers
//! every writer uses. No candle here: the data tools and `mmrec-transfer` build without it.
//!
//! Every format carries [`SCHEMA_VERSION`]; a reader refuses a newer version instead of
//! guessing at it.

pub mod atomic;
pub mod checkpoint;
mod error;
pub mod manifest;
pub mod model_file;
pub mod rng;
pub mod run_config;
pub mod safetensors;
#[cfg(feature = "shards")]
pub mod shard;

pub use error::{Error, IoContext, Result};
pub use manifest::*;
pub use model_file::{FusionMethod, ModelConfig, ModelMeta, Role};

use std::fmt;
use std::str::FromStr;

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

    #[cfg(feature = "shards")]
    pub fn data_type(self) -> arrow_schema::DataType {
        use arrow_schema::DataType;
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

/// The special tokens every tokenizer the toolkit trains or accepts carries: documents end
/// with [`EOT`]; packed batches pad with [`PAD`].
pub mod special {
    pub const EOT: &str = "<|endoftext|>";
    pub const PAD: &str = "<|pad|>";
}

/// The Arrow schema of a shard (DESIGN §4).
#[cfg(feature = "shards")]
pub fn shard_schema(width: TokenWidth) -> std::sync::Arc<arrow_schema::Schema> {
    use arrow_schema::{DataType, Field, Schema};
    use columns::*;
    use std::sync::Arc;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_width_follows_vocabulary_size() {
        assert_eq!(TokenWidth::for_vocab(65_536), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65_537), TokenWidth::U32);
    }
}
