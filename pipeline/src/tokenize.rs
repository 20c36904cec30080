//! Tokenizer loading, identity (sha256, specials) and byte-level BPE training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mmrec_schemas::{TokenWidth, TokenizerInfo};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::error::{Error, Result};

use mmrec_schemas::atomic::sha256_hex;
pub use mmrec_schemas::special::{EOT, PAD};

/// A loaded tokenizer and the identity recorded in manifests and checked by the loader.
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub info: TokenizerInfo,
    /// Distinguishes tokenizers in the per-thread word caches.
    id: u64,
    path: EncodePath,
}

/// How `encode` gets HF's ids, fastest exact way first.
enum EncodePath {
    /// GPT-2 style byte-level BPE without a normaliser (our trained tokenizers, GPT-2's):
    /// `gpt2_split` cuts the text, the cache is keyed by each piece's raw bytes.
    ByteLevel {
        add_prefix_space: bool,
        added_tokens: Vec<memchr::memmem::Finder<'static>>,
    },
    /// Any other tokenizer: HF's normaliser and pre-tokenizer, then cached model calls.
    CachedWords,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Entries per thread (≈ 40 bytes each): enough for a corpus's frequent words.
const WORD_CACHE: usize = 1 << 18;

/// Word → ids for one tokenizer on one thread; the ids live in one arena. Words under 16
/// bytes (nearly all) are keyed by a `u128` holding their bytes and length: hashing and
/// comparing it is a few instructions, where a byte-slice key costs a `memcmp` call.
#[derive(Default)]
struct WordCache {
    owner: u64,
    short: ahash::AHashMap<u128, (u32, u32)>,
    long: ahash::AHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
}

fn short_key(word: &[u8]) -> Option<u128> {
    (word.len() < 16).then(|| {
        let mut key = [0u8; 16];
        key[..word.len()].copy_from_slice(word);
        key[15] = word.len() as u8;
        u128::from_le_bytes(key)
    })
}

/// `short_key` of `text[start..start + len]`, read as one 16-byte load and masked where
/// the text goes on that far: the variable-length copy above is a `memcpy` call per word.
fn short_key_within(text: &[u8], start: usize, len: usize) -> Option<u128> {
    match text.get(start..start + 16) {
        Some(window) if len < 16 => {
            let bytes = u128::from_le_bytes(window.try_into().expect("a 16-byte window"));
            Some((bytes & ((1u128 << (8 * len)) - 1)) | ((len as u128) << 120))
        }
        _ => short_key(&text[start..start + len]),
    }
}

impl WordCache {
    /// Appends the ids of `word` (whose `short_key` is `key`) to `out`, running `tokenize`
    /// only on a miss.
    fn extend(
        &mut self,
        word: &[u8],
        key: Option<u128>,
        out: &mut Vec<u32>,
        tokenize: impl FnOnce() -> Result<Vec<u32>, String>,
    ) -> Result<(), String> {
        let hit = match key {
            Some(k) => self.short.get(&k),
            None => self.long.get(word),
        };
        if let Some(&(start, len)) = hit {
            // Most words are one token: a push, not a `memcpy` call.
            match &self.ids[start as usize..(start + len) as usize] {
                [id] => out.push(*id),
                ids => out.extend_from_slice(ids),
            }
            return Ok(());
        }
        let ids = tokenize()?;
        out.extend_from_slice(&ids);
        if self.short.len() + self.long.len() < WORD_CACHE {
            let span = (self.ids.len() as u32, ids.len() as u32);
            self.ids.extend_from_slice(&ids);
            match key {
                Some(k) => self.short.insert(k, span),
                None => self.long.insert(word.into(), span),
            };
        }
        Ok(())
    }
}

thread_local! {
    static WORDS: std::cell::RefCell<WordCache> = std::cell::RefCell::new(WordCache::default());
}

/// GPT-2's byte → character map (`bytes_to_unicode`): printable bytes stand for
/// themselves, the rest are shifted past U+0100.
static BYTE_CHARS: std::sync::LazyLock<[char; 256]> = std::sync::LazyLock::new(|| {
    let mut chars = ['\0'; 256];
    let mut shifted = 0;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[b as usize] = if printable {
            b as char
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or('\0')
        };
    }
    chars
});

impl LoadedTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::MissingInput {
            path: path.to_path_buf(),
            source,
        })?;
        // tokenizers 0.23 panics on some malformed files (an `unwrap` in its decoder's
        // deserializer, found by tests/hostile.rs): a bad file is an error, not a crash.
        let parsed = std::panic::catch_unwind(|| Tokenizer::from_bytes(&bytes)).map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            tok_err(
                path,
                format!("not a valid tokenizer.json (the tokenizers library failed: {why})"),
            )
        })?;
        let mut tokenizer = parsed.map_err(|e| tok_err(path, e))?;
        refuse_lossy_settings(path, &tokenizer)?;
        // Corpus text that happens to spell `<|endoftext|>` or `<|pad|>` is text: only the
        // loader inserts separators, so special tokens are never matched in documents.
        tokenizer.set_encode_special_tokens(true);
        // The id space, not the entry count: ids may have gaps or start high, and the
        // token width must hold the highest one.
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
            .max(tokenizer.get_vocab_size(true));
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
        let path = encode_path(&tokenizer);
        Ok(LoadedTokenizer {
            tokenizer,
            info,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            path,
        })
    }

    /// Token ids of one document, without special tokens (the loader adds separators).
    ///
    /// Exactly HF's `encode(text, false)` ids (tested on every fixture document and on
    /// random text), minus what only costs: no `Encoding` (a `String` per token, offsets,
    /// masks), no alignment bookkeeping, and a per-thread word → ids cache so each distinct
    /// word runs the BPE merges once.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer};
        let model = self.tokenizer.get_model();
        let model_ids = |word: &str| -> Result<Vec<u32>, String> {
            Ok(model
                .tokenize(word)
                .map_err(|e| e.to_string())?
                .iter()
                .map(|t| t.id)
                .collect())
        };
        match &self.path {
            EncodePath::ByteLevel {
                add_prefix_space,
                added_tokens,
            } if !added_tokens.iter().any(|t| t.find(text.as_bytes()).is_some()) => {
                let prefixed;
                // HF drops empty splits before the pre-tokenizer could prefix a space.
                let text = if *add_prefix_space && !text.is_empty() && !text.starts_with(' ') {
                    prefixed = format!(" {text}");
                    &prefixed
                } else {
                    text
                };
                self.with_cache(|cache| {
                    let mut ids = Vec::with_capacity(text.len() / 3);
                    let mut failed = Ok(());
                    crate::gpt2_split::split(text, |start, piece| {
                        if failed.is_ok() {
                            let key = short_key_within(text.as_bytes(), start, piece.len());
                            failed = cache.extend(piece.as_bytes(), key, &mut ids, || {
                                model_ids(&piece.bytes().map(|b| BYTE_CHARS[b as usize]).collect::<String>())
                            });
                        }
                    });
                    failed.map(|()| ids)
                })
            }
            EncodePath::CachedWords => {
                let mut pre = self
                    .tokenizer
                    .get_added_vocabulary()
                    .extract_and_normalize(self.tokenizer.get_normalizer(), text);
                if let Some(pt) = self.tokenizer.get_pre_tokenizer() {
                    pt.pre_tokenize(&mut pre).map_err(|e| e.to_string())?;
                }
                self.with_cache(|cache| {
                    let mut ids = Vec::with_capacity(text.len() / 3);
                    for (word, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
                        match tokens {
                            Some(tokens) => ids.extend(tokens.iter().map(|t| t.id)),
                            None => cache.extend(word.as_bytes(), short_key(word.as_bytes()), &mut ids, || {
                                model_ids(word)
                            })?,
                        }
                    }
                    Ok(ids)
                })
            }
            // Also a byte-level document containing an added token: rare, HF splits it out.
            _ => self
                .tokenizer
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string()),
        }
    }

    fn with_cache<R>(&self, f: impl FnOnce(&mut WordCache) -> R) -> R {
        WORDS.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.owner != self.id {
                *cache = WordCache {
                    owner: self.id,
                    ..WordCache::default()
                };
            }
            f(&mut cache)
        })
    }
}

/// Settings that make ids depend on chance or lose text: shards must hold every token of
/// every document, identically on every run.
fn refuse_lossy_settings(path: &Path, tokenizer: &Tokenizer) -> Result<()> {
    if let Some(t) = tokenizer.get_truncation() {
        return Err(tok_err(path, format!("sets truncation (max_length {}): each document would be cut while its whole text is stored; remove `truncation` from the file", t.max_length)));
    }
    if tokenizer.get_padding().is_some() {
        return Err(tok_err(
            path,
            "sets padding: pad ids would be appended to documents; remove `padding` from the file",
        ));
    }
    if let tokenizers::ModelWrapper::BPE(bpe) = tokenizer.get_model() {
        if let Some(p) = bpe.dropout.filter(|&p| p > 0.0) {
            return Err(tok_err(path, format!("uses BPE dropout {p}: two runs on the same corpus would write different shards; set `model.dropout` to null")));
        }
    }
    Ok(())
}

fn encode_path(tokenizer: &Tokenizer) -> EncodePath {
    use tokenizers::PreTokenizerWrapper;
    match (tokenizer.get_normalizer(), tokenizer.get_pre_tokenizer()) {
        (None, Some(PreTokenizerWrapper::ByteLevel(byte_level))) if byte_level.use_regex => EncodePath::ByteLevel {
            add_prefix_space: byte_level.add_prefix_space,
            added_tokens: tokenizer
                .get_added_tokens_decoder()
                .into_values()
                .filter(|t| !t.content.is_empty())
                .map(|t| memchr::memmem::Finder::new(t.content.as_bytes()).into_owned())
                .collect(),
        },
        _ => EncodePath::CachedWords,
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
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
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        tokenizers::NormalizerWrapper,
        ByteLevel,
        tokenizers::PostProcessorWrapper,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
    .with_decoder(Some(ByteLevel::default()))
    .build()
    .map_err(|e| tok_err(out, e))?;
    tokenizer.train(&mut trainer, texts).map_err(|e| tok_err(out, e))?;
    let json = tokenizer.to_string(false).map_err(|e| tok_err(out, e))?;
    mmrec_schemas::atomic::write_atomic(out, json.as_bytes())?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_key_within_text_is_the_short_key_of_the_word() {
        let text = "0123456789abcdefghijklmnopqrstuvwxyz_é漢";
        for start in 0..text.len() {
            for len in 0..=(text.len() - start).min(20) {
                let word = &text.as_bytes()[start..start + len];
                assert_eq!(
                    short_key_within(text.as_bytes(), start, len),
                    short_key(word),
                    "{start}+{len}"
                );
            }
        }
    }
}
