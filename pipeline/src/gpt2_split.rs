//! GPT-2's pre-tokenizer split, without a regex engine.
//!
//! HF's `ByteLevel` pre-tokenizer cuts text with
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` through
//! fancy-regex (whose look-ahead runs in its backtracking VM) and keeps byte alignments for
//! every character it maps: together most of `encode`'s time. This scanner makes the same
//! cuts in one pass. Its character classes are read from `regex-syntax`, the tables behind
//! the regex itself, so the two agree on every character (tested against HF's pre-tokenizer
//! on the corpora and on random text drawn from every class).

use std::sync::LazyLock;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

struct Classes {
    ascii: [Class; 128],
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
}

fn unicode_ranges(pattern: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::parse(pattern).expect("a fixed, valid class pattern");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(class)) => class.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        other => unreachable!("{pattern} parsed to {other:?}"),
    }
}

static CLASSES: LazyLock<Classes> = LazyLock::new(|| {
    let mut classes = Classes {
        ascii: [Class::Other; 128],
        letter: unicode_ranges(r"\p{L}"),
        number: unicode_ranges(r"\p{N}"),
        space: unicode_ranges(r"\s"),
    };
    for b in 0..128u8 {
        classes.ascii[b as usize] = classes.lookup(b as char);
    }
    classes
});

impl Classes {
    fn lookup(&self, c: char) -> Class {
        let within = |ranges: &[(char, char)]| {
            ranges
                .binary_search_by(|&(lo, hi)| {
                    if hi < c {
                        std::cmp::Ordering::Less
                    } else if lo > c {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .is_ok()
        };
        if within(&self.letter) {
            Class::Letter
        } else if within(&self.number) {
            Class::Number
        } else if within(&self.space) {
            Class::Space
        } else {
            Class::Other
        }
    }

    /// The class and UTF-8 length of the character at byte `i`; ASCII by table.
    #[inline]
    fn at(&self, text: &str, i: usize) -> Option<(Class, usize)> {
        let b = *text.as_bytes().get(i)?;
        if b.is_ascii() {
            Some((self.ascii[b as usize], 1))
        } else {
            text[i..].chars().next().map(|c| (self.lookup(c), c.len_utf8()))
        }
    }
}

/// End of the run of `class` characters starting at `i`.
fn run_end(classes: &Classes, text: &str, mut i: usize, class: Class) -> usize {
    while let Some((c, len)) = classes.at(text, i) {
        if c != class {
            break;
        }
        i += len;
    }
    i
}

/// Length of a contraction (`'s 't 're 've 'm 'll 'd`) after an apostrophe, if any.
fn contraction(rest: &[u8]) -> Option<usize> {
    match rest {
        [b's' | b't' | b'm' | b'd', ..] => Some(1),
        [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => Some(2),
        _ => None,
    }
}

/// Calls `piece` with the byte offset and text of each piece of `text`, in order; the
/// pieces concatenate to `text`.
pub fn split<'a>(text: &'a str, mut piece: impl FnMut(usize, &'a str)) {
    let classes = &*CLASSES;
    let mut i = 0;
    while let Some((class, len)) = classes.at(text, i) {
        let byte = text.as_bytes()[i];
        let after = i + len;
        let contracted = if byte == b'\'' {
            contraction(&text.as_bytes()[after..])
        } else {
            None
        };
        let end = match (contracted, class) {
            (Some(len), _) => after + len,
            (None, Class::Space) => match classes.at(text, after) {
                // ` ?\p{L}+` and its siblings: a space joins the word after it.
                Some((next_class, next_len)) if byte == b' ' && next_class != Class::Space => {
                    run_end(classes, text, after + next_len, next_class)
                }
                _ => {
                    let ws_end = run_end(classes, text, i, Class::Space);
                    let last = text[..ws_end].chars().next_back().map_or(i, |l| ws_end - l.len_utf8());
                    // `\s+(?!\S)` leaves the run's last character to the word after it,
                    // unless the run ends the text or is that single character.
                    if ws_end == text.len() || last == i {
                        ws_end
                    } else {
                        last
                    }
                }
            },
            _ => run_end(classes, text, after, class),
        };
        piece(i, &text[i..end]);
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        split(text, |_, p| out.push(p));
        out
    }

    #[test]
    fn cuts_like_the_gpt2_pattern() {
        assert_eq!(
            pieces("Hello world's   end!!\n\n  x"),
            ["Hello", " world", "'s", "  ", " end", "!!", "\n\n ", " x"]
        );
        assert_eq!(pieces("a\t\tb  "), ["a", "\t", "\t", "b", "  "]);
        assert_eq!(pieces(" 's '''s x1 ½"), [" '", "s", " '''", "s", " x", "1", " ½"]);
        assert_eq!(pieces(""), Vec::<&str>::new());
    }

    /// HF's ByteLevel pre-tokenizer (the fancy-regex pattern) as byte ranges of `text`.
    fn hf_pieces(text: &str) -> Vec<&str> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut pre = PreTokenizedString::from(text);
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, true)
            .pre_tokenize(&mut pre)
            .unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| &text[a..b])
            .collect()
    }

    #[test]
    fn agrees_with_hf_on_random_text_from_every_class() {
        // Letters, marks, numbers of three kinds, Unicode and ASCII spaces, apostrophes and
        // contraction letters, punctuation, symbols, CJK, emoji, control characters.
        let palette: Vec<char> = "aZsStTreRvVelmLdD'' \t\n\r\u{b}\u{c}\u{a0}\u{2009}\u{3000}\u{85}\u{2028}0123½Ⅻ٣éß\u{301}\u{94d}ñ漢字カ😀🎉.,;:!?-_()[]{}\"#$%&*+/<=>@\\^`|~€\u{0}\u{7f}\u{ad}\u{200b}".chars().collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for _ in 0..20_000 {
            let len = next() % 24;
            let text: String = (0..len).map(|_| palette[next() % palette.len()]).collect();
            assert_eq!(pieces(&text), hf_pieces(&text), "{text:?}");
        }
    }

    #[test]
    fn agrees_with_hf_on_every_character() {
        // Each character alone, after a space, and between letters and a space run.
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32).step_by(7) {
            for text in [format!("{c}"), format!(" {c}x"), format!("a  {c}{c} b'{c}")] {
                assert_eq!(pieces(&text), hf_pieces(&text), "U+{:04X}", c as u32);
            }
        }
    }
}
