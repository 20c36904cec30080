//! Content classifier: text, code or mixed, for documents metadata says nothing about.
//!
//! Each line gets a code-vs-prose score from surface features (line endings, keywords,
//! operators, symbol density, function words); the document's class follows from the
//! share of characters on code lines. Comments (line and block), docstrings, Perl POD and
//! string-literal continuation lines are left out of both sides: they are prose living
//! inside code, and counting them would call a well-documented source file prose. Fenced blocks (```) are code by
//! construction, and prose around them makes a document `mixed`.

use mmrec_schemas::Domain;

/// Name and version recorded in the manifest, so shards say which classifier sorted them.
pub const CLASSIFIER_NAME: &str = "lines-v1";

/// Character shares of a document's lines, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shares {
    pub code: usize,
    pub prose: usize,
    pub fenced: usize,
}

impl Shares {
    pub fn code_fraction(&self) -> f64 {
        let code = self.code + self.fenced;
        let all = code + self.prose;
        if all == 0 {
            0.0
        } else {
            code as f64 / all as f64
        }
    }
}

pub fn classify(text: &str) -> Domain {
    decide(&measure(text))
}

fn decide(s: &Shares) -> Domain {
    let code = s.code + s.fenced;
    let prose = s.prose;
    let frac = s.code_fraction();
    // Fences are an explicit statement that code sits inside prose.
    // A chat answer with a three-line snippet is the typical case, so the bar is low.
    if s.fenced >= 40 && prose >= 100 && (0.05..=0.95).contains(&frac) {
        return Domain::Mixed;
    }
    // Without fences, only a substantial block of each kind makes a document mixed.
    if code >= 400 && prose >= 400 && (0.3..=0.7).contains(&frac) {
        return Domain::Mixed;
    }
    if frac >= 0.5 {
        Domain::Code
    } else {
        Domain::Text
    }
}

pub fn measure(text: &str) -> Shares {
    let mut shares = Shares::default();
    let mut in_fence = false;
    let mut in_docstring = false;
    let mut in_block_comment = false;
    let mut in_pod = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") || t.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if t.is_empty() {
            continue;
        }
        let weight = t.chars().count();
        if in_fence {
            shares.fenced += weight;
            continue;
        }
        if in_pod || is_pod_command(line) {
            in_pod = !line.starts_with("=cut");
            continue;
        }
        if in_block_comment || t.starts_with("/*") {
            in_block_comment = !t.contains("*/");
            continue;
        }
        let quotes = t.matches("\"\"\"").count() + t.matches("'''").count();
        let was_in_docstring = in_docstring;
        if quotes % 2 == 1 {
            in_docstring = !in_docstring;
        }
        if was_in_docstring || quotes > 0 || is_comment(t) || is_string_continuation(t) {
            continue;
        }
        let plain = strip_markdown_inline(t);
        if line_score(line, &plain) > 0.0 {
            shares.code += weight;
        } else {
            shares.prose += weight;
        }
    }
    shares
}

/// Markdown inline code spans become one placeholder word and links keep only their text:
/// a sentence that mentions `fill_uninit` or links to a page is still a sentence.
fn strip_markdown_inline(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(i) = rest.find(['`', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(end) = tail[1..].find('`').filter(|_| tail.starts_with('`')) {
            out.push_str("code");
            rest = &tail[end + 2..];
        } else if let Some((text, after)) = markdown_link(tail) {
            out.push_str(text);
            rest = after;
        } else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `[text](http...)` or `[text](#anchor)` → (text, the rest after the link).
fn markdown_link(s: &str) -> Option<(&str, &str)> {
    let close = s.find("](")?;
    let url = &s[close + 2..];
    if !(url.starts_with("http") || url.starts_with('#') || url.starts_with('/')) {
        return None;
    }
    let end = url.find(')')?;
    Some((&s[1..close], &url[end + 1..]))
}

/// Perl POD starts at a line like `=head1` or `=pod` and runs to `=cut`.
fn is_pod_command(line: &str) -> bool {
    let mut chars = line.chars();
    chars.next() == Some('=') && chars.next().is_some_and(|c| c.is_ascii_lowercase())
}

/// A line that is one string literal, as in a message split over several source lines
/// (`"fail in a future version "`): its words are data, not prose around code.
fn is_string_continuation(t: &str) -> bool {
    let body = t.trim_end_matches([',', ')', '+', '\\', ';', ' ', '.']);
    let body = body.strip_prefix('f').unwrap_or(body);
    body.len() >= 2
        && (body.starts_with('"') && body.ends_with('"') || body.starts_with('\'') && body.ends_with('\''))
        && !body[1..body.len() - 1].contains("\" ")
}

fn is_comment(t: &str) -> bool {
    // `# ` is also a Markdown heading: leaving headings out of both sides is harmless.
    t.starts_with("//")
        || t.starts_with("/*")
        || t.starts_with("* ")
        || t == "*"
        || t.starts_with("*/")
        || t.starts_with('#') && !t.starts_with("#include") && !t.starts_with("#define") && !t.starts_with("#if")
        || t.starts_with("-- ")
        || t.starts_with(";;")
        || t.starts_with("<!--")
}

const KEYWORDS: &[&str] = &[
    "def",
    "class",
    "import",
    "from",
    "return",
    "elif",
    "else",
    "for",
    "while",
    "try",
    "except",
    "finally",
    "with",
    "raise",
    "yield",
    "async",
    "await",
    "lambda",
    "pass",
    "break",
    "continue",
    "fn",
    "let",
    "mut",
    "pub",
    "use",
    "impl",
    "struct",
    "enum",
    "match",
    "mod",
    "trait",
    "where",
    "#include",
    "#define",
    "#if",
    "#ifdef",
    "#ifndef",
    "#endif",
    "#else",
    "#undef",
    "#pragma",
    "int",
    "void",
    "char",
    "static",
    "const",
    "unsigned",
    "long",
    "double",
    "float",
    "bool",
    "var",
    "function",
    "package",
    "func",
    "public",
    "private",
    "protected",
    "namespace",
    "template",
    "typedef",
    "extern",
    "switch",
    "case",
    "default:",
    "new",
    "delete",
    "throw",
    "catch",
    "interface",
    "extends",
    "implements",
    "export",
    "local",
    "my",
    "sub",
    "foreach",
    "unless",
    "elsif",
    "then",
    "fi",
    "done",
    "esac",
    "do",
    "echo",
    "if",
    "end",
    "begin",
    "type",
    "self",
    "this",
    "super",
    "nil",
    "null",
    "None",
    "True",
    "False",
    "true",
    "false",
    "assert",
];

const FUNCTION_WORDS: &[&str] = &[
    "the", "and", "of", "to", "in", "is", "was", "that", "for", "on", "as", "with", "by", "it", "are", "from", "at",
    "be", "this", "which", "or", "an", "his", "her", "their", "were", "has", "have", "had", "not", "but", "they", "he",
    "she", "its", "also", "been", "after", "who", "you", "may", "any", "such", "other", "than", "these", "all", "into",
    "more",
];

/// Positive for a line that looks like code, negative for prose.
fn line_score(line: &str, t: &str) -> f32 {
    let mut score = 0.0f32;
    let first = t.split(|c: char| c.is_whitespace() || c == '(').next().unwrap_or("");
    if KEYWORDS.contains(&first) {
        score += 1.0;
    }
    let last = t.chars().last().unwrap_or(' ');
    match last {
        ';' | '{' | '}' | '(' | '[' | ']' => score += 1.5,
        ')' => score += 0.5,
        ':' if t.contains('(') || KEYWORDS.contains(&first) => score += 1.0,
        ',' if t.contains('(') || t.contains('=') || t.contains('"') => score += 0.5,
        '.' | '?' | '!' => score -= 1.0,
        _ => {}
    }
    for op in [
        "==", "!=", "->", "=>", "::", "&&", "||", "+=", "-=", ":=", "()", "[]", "{}", "</", "/>", "${", "$(", "\\n",
        "<-",
    ] {
        if t.contains(op) {
            score += 0.75;
        }
    }
    if line.starts_with("    ") || line.starts_with('\t') {
        score += 0.5;
    }
    let chars = t.chars().count().max(1) as f32;
    let symbols = t.chars().filter(|c| "{}[]()<>;=_*&|\\$@%^~".contains(*c)).count() as f32;
    score += ((symbols / chars) - 0.04) * 12.0;

    let mut words = 0usize;
    let mut plain_words = 0usize;
    let mut function_words = 0usize;
    let mut code_tokens = 0usize;
    for w in t.split_whitespace() {
        words += 1;
        let core = w.trim_matches(|c: char| ",.;:!?\"'()".contains(c));
        if !core.is_empty() && core.chars().all(|c| c.is_alphabetic() || c == '-' || c == '\'') {
            plain_words += 1;
            if FUNCTION_WORDS.contains(&core.to_lowercase().as_str()) {
                function_words += 1;
            }
        }
        if is_code_token(core) {
            code_tokens += 1;
        }
    }
    score += code_tokens as f32 * 0.75;
    if words >= 5 {
        let plain = plain_words as f32 / words as f32;
        score -= (plain - 0.6) * 4.0;
        score -= (function_words as f32 / words as f32) * 8.0;
    } else if words <= 2 && plain_words == words && !t.contains('=') {
        // A lone word or two ("Introduction", "Example") is a heading, not code.
        score -= 0.5;
    }
    score
}

/// Identifiers shaped like code: `snake_case`, `camelCase`, `a.b` member access, `f(x`.
fn is_code_token(w: &str) -> bool {
    let bytes = w.as_bytes();
    if bytes.len() < 3 {
        return false;
    }
    let inner_underscore =
        w.trim_matches('_').contains('_') && w.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.');
    let camel = bytes
        .windows(2)
        .any(|p| p[0].is_ascii_lowercase() && p[1].is_ascii_uppercase())
        && w.chars().all(|c| c.is_ascii_alphanumeric());
    let member = bytes
        .windows(3)
        .any(|p| p[0].is_ascii_alphanumeric() && p[1] == b'.' && (p[2].is_ascii_lowercase() || p[2] == b'_'))
        && !w.ends_with('.');
    let call = bytes
        .windows(2)
        .any(|p| (p[0].is_ascii_alphanumeric() || p[0] == b'_') && p[1] == b'(');
    inner_underscore || camel || member || call
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prose_paragraph_is_text() {
        let t = "The castle was built in the twelfth century by the Norman lords of the region. \
                 It was besieged twice during the civil war, and its keep was later used as a prison. \
                 Today the ruins are protected as a scheduled monument and are open to visitors.";
        assert_eq!(classify(t), Domain::Text);
    }

    #[test]
    fn function_with_docstring_is_code() {
        let t = "def parse(line):\n    \"\"\"Split a line into fields.\n\n    The fields are separated by commas, as the format says.\n    \"\"\"\n    fields = line.split(',')\n    if not fields:\n        raise ValueError(line)\n    return [f.strip() for f in fields]\n\n\nclass Reader:\n    def __init__(self, path):\n        self.path = path\n";
        assert_eq!(classify(t), Domain::Code);
    }

    #[test]
    fn markdown_with_fenced_code_is_mixed() {
        let t = "To read a file line by line in Rust, open it and wrap it in a buffered reader. \
                 The lines iterator yields each line without its terminator, and errors are returned per line.\n\n\
                 ```rust\nuse std::io::{BufRead, BufReader};\nlet file = File::open(path)?;\nfor line in BufReader::new(file).lines() {\n    println!(\"{}\", line?);\n}\n```\n\n\
                 This keeps memory use constant however large the file is, which matters for logs of many gigabytes.";
        assert_eq!(classify(t), Domain::Mixed);
    }
}
