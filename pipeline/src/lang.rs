//! Language from metadata: file extension, shebang, or a `lang` field.

use mmrec_schemas::Domain;
use std::path::Path;

/// Extension (lower case, no dot) to language. Markup whose documents are mostly prose
/// (`md`, `rst`, `txt`) maps to a language too, but not to the code domain.
const EXTENSIONS: &[(&str, &str)] = &[
    ("py", "python"),
    ("pyi", "python"),
    ("rs", "rust"),
    ("c", "c"),
    ("h", "c"),
    ("cc", "cpp"),
    ("cpp", "cpp"),
    ("cxx", "cpp"),
    ("hpp", "cpp"),
    ("hh", "cpp"),
    ("java", "java"),
    ("kt", "kotlin"),
    ("scala", "scala"),
    ("go", "go"),
    ("js", "javascript"),
    ("mjs", "javascript"),
    ("cjs", "javascript"),
    ("jsx", "javascript"),
    ("ts", "typescript"),
    ("tsx", "typescript"),
    ("rb", "ruby"),
    ("php", "php"),
    ("cs", "csharp"),
    ("swift", "swift"),
    ("m", "objc"),
    ("sh", "shell"),
    ("bash", "shell"),
    ("zsh", "shell"),
    ("pl", "perl"),
    ("pm", "perl"),
    ("lua", "lua"),
    ("r", "r"),
    ("jl", "julia"),
    ("hs", "haskell"),
    ("ml", "ocaml"),
    ("ex", "elixir"),
    ("erl", "erlang"),
    ("clj", "clojure"),
    ("sql", "sql"),
    ("html", "html"),
    ("css", "css"),
    ("scss", "css"),
    ("toml", "toml"),
    ("yaml", "yaml"),
    ("yml", "yaml"),
    ("cmake", "cmake"),
    ("mk", "makefile"),
    ("proto", "protobuf"),
    ("zig", "zig"),
    ("dart", "dart"),
    ("vue", "vue"),
    ("cu", "cuda"),
    ("md", "markdown"),
    ("markdown", "markdown"),
    ("rst", "rst"),
];

/// Languages that are markup for prose: their documents are classified by content.
const PROSE_MARKUP: &[&str] = &["markdown", "rst", "text"];

pub fn from_extension(name: &str) -> Option<&'static str> {
    let file = Path::new(name).file_name()?.to_string_lossy().to_ascii_lowercase();
    if file == "makefile" || file == "gnumakefile" {
        return Some("makefile");
    }
    if file == "dockerfile" {
        return Some("dockerfile");
    }
    let ext = Path::new(&file).extension()?.to_string_lossy().into_owned();
    EXTENSIONS.iter().find(|(e, _)| *e == ext).map(|(_, l)| *l)
}

/// `#!/usr/bin/env python3`, `#!/bin/sh`, ... on the first line.
pub fn from_shebang(text: &str) -> Option<&'static str> {
    let first = text.lines().next()?.strip_prefix("#!")?;
    let mut words = first.split_whitespace();
    let mut prog = words.next()?.rsplit('/').next()?;
    if prog == "env" {
        prog = words.find(|w| !w.starts_with('-'))?;
    }
    let prog = prog.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    Some(match prog {
        "python" | "pypy" => "python",
        "sh" | "bash" | "zsh" | "dash" | "ksh" => "shell",
        "perl" => "perl",
        "ruby" => "ruby",
        "node" | "nodejs" | "deno" => "javascript",
        "php" => "php",
        "lua" => "lua",
        "Rscript" => "r",
        _ => return None,
    })
}

/// The domain a language implies: programming languages are code, natural languages
/// (`en`, `fr`, ...) are text, prose markup says nothing (its documents may be mixed).
pub fn domain_of_lang(lang: &str) -> Option<Domain> {
    if PROSE_MARKUP.contains(&lang) {
        return None;
    }
    if lang.len() == 2 && lang.chars().all(|c| c.is_ascii_lowercase()) && lang != "go" && lang != "ml" {
        return Some(Domain::Text);
    }
    if EXTENSIONS.iter().any(|(_, l)| *l == lang) || ["makefile", "dockerfile", "c++", "shell"].contains(&lang) {
        return Some(Domain::Code);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_and_shebang_name_the_language() {
        assert_eq!(from_extension("src/lib.rs"), Some("rust"));
        assert_eq!(from_extension("Makefile"), Some("makefile"));
        assert_eq!(from_extension("notes"), None);
        assert_eq!(from_shebang("#!/usr/bin/env python3\nprint(1)"), Some("python"));
        assert_eq!(from_shebang("#!/bin/bash -e\n"), Some("shell"));
        assert_eq!(from_shebang("hello"), None);
    }

    #[test]
    fn language_implies_domain_except_prose_markup() {
        assert_eq!(domain_of_lang("python"), Some(Domain::Code));
        assert_eq!(domain_of_lang("go"), Some(Domain::Code));
        assert_eq!(domain_of_lang("en"), Some(Domain::Text));
        assert_eq!(domain_of_lang("markdown"), None);
    }
}
