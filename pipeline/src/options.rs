//! What a `split` run is asked to do, and the progress hooks it reports through.

use std::path::PathBuf;

use mmrec_schemas::{NearDupSettings, Partition};

use crate::input::{InputSpec, ReadOptions};

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
    /// Bytes of document text kept in memory between the two passes: inputs whose
    /// documents fit are not read again (faster); the rest are (bounded memory).
    pub keep_text_bytes: u64,
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
            keep_text_bytes: 512 << 20,
        }
    }
}

/// Hooks for a progress display; the library itself never prints.
pub trait Progress: Sync {
    fn phase(&self, _name: &'static str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64, _docs: u64, _tokens: u64) {}
}

impl Progress for () {}
