//! Duplicate removal: exact (hash of whitespace-normalised text) and near (MinHash + LSH).
//!
//! Both keep the first occurrence in input order, so the result does not depend on how
//! many threads computed the hashes and signatures.

use std::collections::HashMap;

use mmrec_schemas::rng::splitmix;
use mmrec_schemas::NearDupSettings;
use xxhash_rust::xxh3::xxh3_64;

/// Hash of the text with runs of whitespace collapsed and the ends trimmed, so that
/// re-wrapped or re-indented copies of a document count as the same document.
pub fn normalized_hash(text: &str) -> u64 {
    // One hash over a normalised copy: per-word streaming updates cost more than the copy.
    thread_local! {
        static NORMALISED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    NORMALISED.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        push_normalised(text, &mut buf);
        xxh3_64(&buf)
    })
}

/// `text.split_whitespace().join(" ")`. Text is mostly words and single spaces, which
/// normalisation keeps: those stretches are copied whole, and only the whitespace that
/// changes (runs, tabs, newlines, Unicode spaces) is looked at closely.
fn push_normalised(text: &str, out: &mut Vec<u8>) {
    // 0: part of a word; 1: ASCII whitespace; 2: lead byte of a character that may be
    // Unicode whitespace (U+0085, U+00A0, U+1680, U+2000–U+205F, U+3000).
    const KIND: [u8; 256] = {
        let mut k = [0u8; 256];
        k[b' ' as usize] = 1;
        k[b'\t' as usize] = 1;
        k[b'\n' as usize] = 1;
        k[0x0B] = 1;
        k[0x0C] = 1;
        k[b'\r' as usize] = 1;
        k[0xC2] = 2;
        k[0xE1] = 2;
        k[0xE2] = 2;
        k[0xE3] = 2;
        k
    };
    let text = text.trim();
    let whitespace_len = |i: usize| match KIND[text.as_bytes()[i] as usize] {
        0 => 0,
        1 => 1,
        _ => text[i..]
            .chars()
            .next()
            .filter(|c| c.is_whitespace())
            .map_or(0, char::len_utf8),
    };
    let bytes = text.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    loop {
        i = next_irregular(bytes, i);
        let Some(&b) = bytes.get(i) else { break };
        let single_space = b == b' ' && i + 1 < bytes.len() && whitespace_len(i + 1) == 0;
        let run_start = i;
        if !single_space {
            while i < bytes.len() {
                match whitespace_len(i) {
                    0 => break,
                    len => i += len,
                }
            }
        }
        if i == run_start {
            // A word byte, or a single space that normalisation keeps.
            i += 1;
            continue;
        }
        // A run to collapse into one space (trimmed text: a word follows it).
        out.extend_from_slice(&bytes[copied..run_start]);
        out.push(b' ');
        copied = i;
    }
    out.extend_from_slice(&bytes[copied..]);
}

/// The first byte at or after `i` that is not plainly part of a word or a single space
/// before a word: 8 bytes at a time, with per-byte masks computed in a `u64` (SWAR).
fn next_irregular(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit set in each byte below `n` (n ≤ 0x80); exact per byte, no carries across.
    let below = |x: u64, n: u64| !(((x & !HIGH) + ONES * (0x80 - n)) | x) & HIGH;
    let load = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    while i + 9 <= bytes.len() {
        let (x, next) = (load(i), load(i + 1));
        let control = below(x, 0x20);
        let non_ascii = x & HIGH;
        // A space stays as it is only before a word: not before whitespace of any kind.
        let doubtful_space = below(x ^ (ONES * 0x20), 1) & (below(next, 0x21) | (next & HIGH));
        let irregular = control | non_ascii | doubtful_space;
        if irregular != 0 {
            return i + irregular.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    i + bytes[i..]
        .iter()
        .position(|&b| !(0x21..0x80).contains(&b))
        .unwrap_or(bytes.len() - i)
}

/// Keeps the first document of every distinct hash.
#[derive(Default)]
pub struct ExactDedup {
    first: HashMap<u64, usize>,
}

impl ExactDedup {
    /// None when the document is new (keep it), else the id of the earlier copy.
    pub fn insert(&mut self, hash: u64, id: usize) -> Option<usize> {
        match self.first.entry(hash) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(id);
                None
            }
        }
    }
}

pub const DEFAULT_NEAR_DUP: NearDupSettings = NearDupSettings {
    threshold: 0.8,
    num_perm: 128,
    bands: 16,
    shingle_words: 3,
};

/// MinHash over word shingles, with one run's hash family: `num_perm` "a·h + b" pairs
/// drawn from the seed once, not per document.
pub struct MinHasher {
    shingle_words: usize,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    pub fn new(s: &NearDupSettings, seed: u64) -> Self {
        let (a, b) = (0..s.num_perm).map(|i| perm_coeffs(seed, i)).unzip();
        MinHasher {
            shingle_words: s.shingle_words.max(1),
            a,
            b,
        }
    }

    /// The signature of `text`. Digit runs are folded to `0` first (as CCNet does): copies
    /// that differ only in a counter, a date or a line number are the near-duplicates worth
    /// catching, and in short documents one changed number would otherwise sink the
    /// similarity below any threshold.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let folded = fold_digits(text);
        let words: Vec<&str> = folded.split_whitespace().collect();
        let k = self.shingle_words;
        let mut sig = vec![u32::MAX; self.a.len()];
        let mut shingle = Vec::with_capacity(64);
        let count = if words.len() >= k { words.len() - k + 1 } else { 1 };
        for start in 0..count {
            shingle.clear();
            for w in &words[start..(start + k).min(words.len())] {
                shingle.extend_from_slice(w.as_bytes());
                shingle.push(b' ');
            }
            remix_into(&mut sig, &self.a, &self.b, xxh3_64(&shingle));
        }
        sig
    }
}

/// One 64-bit hash per shingle, then cheap per-permutation remixes of it: the standard
/// "a·h + b" family, keeping the high 32 bits, which mix best. The hot loop of near-dup
/// detection: compiled for AVX2 too (4 lanes of 64-bit products instead of SSE2's 2), with
/// the same arithmetic, so signatures do not depend on the CPU.
fn remix_into(sig: &mut [u32], a: &[u64], b: &[u64], base: u64) {
    #[inline(always)]
    fn remix(sig: &mut [u32], a: &[u64], b: &[u64], base: u64) {
        for ((slot, &a), &b) in sig.iter_mut().zip(a).zip(b) {
            *slot = (*slot).min((base.wrapping_mul(a).wrapping_add(b) >> 32) as u32);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn remix_avx2(sig: &mut [u32], a: &[u64], b: &[u64], base: u64) {
            remix(sig, a, b, base)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { remix_avx2(sig, a, b, base) };
        }
    }
    remix(sig, a, b, base)
}

fn fold_digits(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut prev_digit = false;
    for c in text.chars() {
        let digit = c.is_ascii_digit();
        if !(digit && prev_digit) {
            out.push(if digit { '0' } else { c });
        }
        prev_digit = digit;
    }
    out
}

fn perm_coeffs(seed: u64, i: usize) -> (u64, u64) {
    let a = splitmix(seed ^ (i as u64 * 2 + 1)) | 1;
    let b = splitmix(seed ^ (i as u64 * 2 + 2));
    (a, b)
}

/// LSH index over the signatures of kept documents.
pub struct NearDedup {
    settings: NearDupSettings,
    buckets: HashMap<(usize, u64), Vec<usize>>,
    kept: Vec<(usize, Vec<u32>)>,
}

impl NearDedup {
    pub fn new(settings: NearDupSettings) -> Self {
        assert!(
            settings.bands > 0 && settings.num_perm % settings.bands == 0,
            "num_perm must be a multiple of bands"
        );
        NearDedup {
            settings,
            buckets: HashMap::new(),
            kept: Vec::new(),
        }
    }

    /// None when no kept document is estimated at or above the threshold (keep this one,
    /// indexed as `id`), else the id of the kept document it nearly duplicates.
    pub fn insert(&mut self, id: usize, sig: Vec<u32>) -> Option<usize> {
        let rows = self.settings.num_perm / self.settings.bands;
        let keys: Vec<(usize, u64)> = sig
            .chunks(rows)
            .enumerate()
            .map(|(band, chunk)| (band, xxh3_64(bytemuck_u32(chunk))))
            .collect();
        for key in &keys {
            if let Some(cands) = self.buckets.get(key) {
                for &c in cands {
                    let (kept_id, kept_sig) = &self.kept[c];
                    if jaccard_estimate(kept_sig, &sig) >= self.settings.threshold {
                        return Some(*kept_id);
                    }
                }
            }
        }
        let slot = self.kept.len();
        self.kept.push((id, sig));
        for key in keys {
            self.buckets.entry(key).or_default().push(slot);
        }
        None
    }
}

fn bytemuck_u32(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub fn jaccard_estimate(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_changes_do_not_change_the_hash() {
        assert_eq!(normalized_hash("a  b\n\tc "), normalized_hash("a b c"));
        let every_whitespace_neighbour = (0..0x3100u32)
            .chain((0x3100..0x11_0000).step_by(97))
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b {c}{c}c{c}"));
        // Random mixes, long enough for the 8-byte steps, checked against the definition.
        let palette: Vec<char> = "ab  \t\n\r\u{b}\u{c}\u{1}\u{a0}\u{3000}\u{2009}\u{85}é漢xyz"
            .chars()
            .collect();
        let mut state = 1u64;
        let random = (0..3000).map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (0..(state >> 58) as usize + 8)
                .map(|k| palette[((state >> (k % 40)) as usize ^ k) % palette.len()])
                .collect::<String>()
        });
        let samples = [
            "",
            " ",
            "a",
            "a  b",
            " a b ",
            "a \u{a0}b",
            "a\u{a0} b",
            "a é ¢",
            "a  \t b\n",
            "x \u{2003}",
            "\u{3000}",
            " a\u{3000}b\u{a0} c\u{85}",
            "\u{b}x\u{1c}y\u{2028}",
            "é  ü\t漢",
        ]
        .map(String::from);
        for text in samples.into_iter().chain(every_whitespace_neighbour).chain(random) {
            let text = text.as_str();
            let mut fast = Vec::new();
            push_normalised(text, &mut fast);
            assert_eq!(
                fast,
                text.split_whitespace().collect::<Vec<_>>().join(" ").into_bytes(),
                "{text:?}"
            );
        }
        assert_ne!(normalized_hash("a b c"), normalized_hash("a b d"));
    }

    #[test]
    fn copies_differing_only_in_a_counter_are_near_duplicates() {
        let s = DEFAULT_NEAR_DUP;
        let h = MinHasher::new(&s, 0);
        let a = h.signature("for i in range(10):\n    print(i)\n# Sample 4\n");
        let b = h.signature("for i in range(10):\n    print(i)\n# Sample 129\n");
        assert_eq!(jaccard_estimate(&a, &b), 1.0);
    }

    #[test]
    fn the_vectorised_remix_matches_the_scalar_formula() {
        let (a, b): (Vec<u64>, Vec<u64>) = (0..131).map(|i| perm_coeffs(7, i)).unzip();
        let mut sig = vec![u32::MAX; 131];
        let mut want = sig.clone();
        for base in (0..500u64).map(splitmix) {
            remix_into(&mut sig, &a, &b, base);
            for i in 0..131 {
                want[i] = want[i].min((base.wrapping_mul(a[i]).wrapping_add(b[i]) >> 32) as u32);
            }
        }
        assert_eq!(sig, want);
    }

    #[test]
    fn minhash_estimates_jaccard() {
        // Letter words: digit runs are folded before shingling.
        let word = |p: char, i: usize| {
            format!(
                "{p}{}{} ",
                (b'a' + (i / 26) as u8) as char,
                (b'a' + (i % 26) as u8) as char
            )
        };
        let a: String = (0..200).map(|i| word('w', i)).collect();
        let b: String = (0..200).map(|i| word(if i < 190 { 'w' } else { 'x' }, i)).collect();
        let c: String = (0..200).map(|i| word('z', i)).collect();
        let s = DEFAULT_NEAR_DUP;
        let h = MinHasher::new(&s, 0);
        let (sa, sb, sc) = (h.signature(&a), h.signature(&b), h.signature(&c));
        assert!(jaccard_estimate(&sa, &sb) > 0.8);
        assert!(jaccard_estimate(&sa, &sc) < 0.1);
        let mut idx = NearDedup::new(s);
        assert_eq!(idx.insert(0, sa), None);
        assert_eq!(
            idx.insert(1, sb),
            Some(0),
            "a near copy is removed in favour of the first"
        );
        assert_eq!(idx.insert(2, sc), None, "an unrelated document is kept");
    }
}
