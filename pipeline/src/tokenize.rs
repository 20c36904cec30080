//! Tokenizer loading, identity (sha256, specials) and byte-level BPE training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mmrec_schemas::{TokenWidth, TokenizerInfo};
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::error::{Error, IoContext, Result};

pub const EOT: &str = "<|endoftext|>";
pub const PAD: &str = "<|pad|>";

/// A loaded tokenizer and the identity recorded in manifests and checked by the loader.
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub info: TokenizerInfo,
    /// Distinguishes tokenizers in the per-thread word caches.
    id: u64,
    /// Truncation or padding would change ids: then only HF's own `encode` is exact.
    plain: bool,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Entries per thread (≈ 100 bytes each): enough for a corpus's frequent words.
const WORD_CACHE: usize = 1 << 18;

thread_local! {
    static WORDS: std::cell::RefCell<(u64, std::collections::HashMap<String, Vec<u32>>)> = std::cell::RefCell::new((0, std::collections::HashMap::new()));
}

impl LoadedTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::MissingInput { path: path.to_path_buf(), source })?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(path, e))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let special_tokens: BTreeMap<String, u32> = [EOT, PAD]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t).map(|id| (t.to_string(), id)))
            .collect();
        let info = TokenizerInfo {
            path: path.to_string_lossy().into_owned(),
            sha256: sha256_hex(&bytes),
            vocab_size,
            token_width: TokenWidth::for_vocab(vocab_size),
            special_tokens,
        };
        let plain = tokenizer.get_truncation().is_none() && tokenizer.get_padding().is_none();
        Ok(LoadedTokenizer { tokenizer, info, id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed), plain })
    }

    /// Token ids of one document, without special tokens (the loader adds separators).
    ///
    /// The same steps as HF's `encode` (added-token split and normalisation, then the
    /// pre-tokenizer, then the model per word), minus what only costs: no `Encoding` (a
    /// `String` per token, offsets, masks), and a per-thread word → ids cache so each
    /// distinct word runs the BPE merges once. Equality with `encode` is tested on every
    /// fixture document.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer};
        if !self.plain {
            return self.tokenizer.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string());
        }
        let mut pre = self.tokenizer.get_added_vocabulary().extract_and_normalize(self.tokenizer.get_normalizer(), text);
        if let Some(pt) = self.tokenizer.get_pre_tokenizer() {
            pt.pre_tokenize(&mut pre).map_err(|e| e.to_string())?;
        }
        let model = self.tokenizer.get_model();
        WORDS.with(|cell| {
            let (owner, cache) = &mut *cell.borrow_mut();
            if *owner != self.id {
                cache.clear();
                *owner = self.id;
            }
            let mut ids = Vec::with_capacity(text.len() / 3);
            for (word, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
                if let Some(tokens) = tokens {
                    ids.extend(tokens.iter().map(|t| t.id));
                } else if let Some(cached) = cache.get(word) {
                    ids.extend_from_slice(cached);
                } else {
                    let word_ids: Vec<u32> = model.tokenize(word).map_err(|e| e.to_string())?.iter().map(|t| t.id).collect();
                    ids.extend_from_slice(&word_ids);
                    if cache.len() < WORD_CACHE {
                        cache.insert(word.to_string(), word_ids);
                    }
                }
            }
            Ok(ids)
        })
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer { path: path.to_path_buf(), message: e.to_string() }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Train a byte-level BPE (GPT-2 style) with `<|endoftext|>` and `<|pad|>` specials.
pub fn train_bpe<I>(texts: I, vocab_size: usize, min_frequency: u64, out: &Path) -> Result<PathBuf>
where
    I: Iterator<Item = String> + Send,
{
    let specials = vec![AddedToken::from(EOT, true), AddedToken::from(PAD, true)];
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<BPE, tokenizers::NormalizerWrapper, ByteLevel, tokenizers::PostProcessorWrapper, ByteLevel>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| tok_err(out, e))?;
    tokenizer.train(&mut trainer, texts).map_err(|e| tok_err(out, e))?;
    let tmp = crate::atomic::temp_path(out);
    tokenizer.save(&tmp, false).map_err(|e| tok_err(out, e))?;
    std::fs::rename(&tmp, out).at(out)?;
    Ok(out.to_path_buf())
}
