//! Reading raw corpora into documents. Every record read either becomes a [`Document`] or a
//! [`QuarantineRecord`] naming its file, line and reason: nothing is dropped silently.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mmrec_schemas::{Domain, QuarantineRecord};
use rayon::prelude::*;
use serde_json::Value;

use crate::error::{describe, Error, IoContext, Result};
use crate::lang;

/// One input as the user named it, with the domain they declared for it (None = classify).
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub path: PathBuf,
    pub declared: Option<Domain>,
}

/// How a plain-text file is cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainSplit {
    /// The whole file is one document.
    File,
    /// Blank-line-separated paragraphs are documents.
    Paragraph,
    /// Every non-empty line is a document.
    Line,
}

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Field holding the text in JSONL objects and Parquet files; default `text`, then `content`.
    pub field: Option<String>,
    /// Documents (and source files) larger than this are quarantined as `too_large`.
    pub max_bytes: u64,
    pub plain_split: PlainSplit,
}

/// A document read from an input, before cleaning and classification.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    pub source: Arc<str>,
    pub text: String,
    pub lang: Option<String>,
    /// Domain known from metadata (declared flag, record field, extension or shebang).
    pub domain_hint: Option<Domain>,
}

#[derive(Debug)]
pub enum Record {
    Doc(Document),
    Bad(QuarantineRecord),
}

/// One concrete file to read: inputs that are directories expand to every file below them.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub declared: Option<Domain>,
    /// Read as a source file (one document, language from extension) rather than by format.
    pub from_tree: bool,
    /// Found in a directory but not read: (quarantine reason, detail).
    pub skip: Option<(&'static str, String)>,
}

/// Expand inputs into files in a deterministic order. A missing input, or one that is
/// neither a regular file nor a directory, is an error before anything is written. Inside
/// directories, what cannot be read as a file (symbolic links unless `follow_symlinks`,
/// links in a loop, FIFOs, sockets, devices) is listed with the reason it is skipped, to
/// be counted and quarantined like a bad record.
pub fn expand_inputs(specs: &[InputSpec], follow_symlinks: bool) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for spec in specs {
        let meta = std::fs::metadata(&spec.path).map_err(|source| Error::MissingInput {
            path: spec.path.clone(),
            source,
        })?;
        if meta.is_dir() {
            let mut found = Vec::new();
            let mut ancestors = vec![std::fs::canonicalize(&spec.path).at(&spec.path)?];
            walk(&spec.path, follow_symlinks, &mut ancestors, &mut found)?;
            found.sort_by(|a: &(PathBuf, _), b| a.0.cmp(&b.0));
            files.extend(found.into_iter().map(|(path, skip)| InputFile {
                path,
                declared: spec.declared,
                from_tree: true,
                skip,
            }));
        } else if meta.is_file() {
            std::fs::File::open(&spec.path).map_err(|source| Error::MissingInput {
                path: spec.path.clone(),
                source,
            })?;
            files.push(InputFile {
                path: spec.path.clone(),
                declared: spec.declared,
                from_tree: false,
                skip: None,
            });
        } else {
            // Reading a FIFO would wait for a writer forever.
            return Err(Error::Invalid(format!(
                "input {} is not a regular file or a directory (a FIFO, socket or device)",
                spec.path.display()
            )));
        }
    }
    Ok(files)
}

type Found = (PathBuf, Option<(&'static str, String)>);

fn walk(dir: &Path, follow: bool, ancestors: &mut Vec<PathBuf>, out: &mut Vec<Found>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.push((
                dir.to_path_buf(),
                Some(("unreadable", format!("directory cannot be listed: {e}"))),
            ));
            return Ok(());
        }
    };
    for entry in entries {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        // Version-control and tool directories hold no corpus text.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().at(&path)?;
        let target = if kind.is_symlink() {
            if !follow {
                out.push((
                    path,
                    Some((
                        "symlink",
                        "a symbolic link, not followed (--follow-symlinks reads what it points to)".into(),
                    )),
                ));
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(m) => m.file_type(),
                Err(e) => {
                    out.push((
                        path,
                        Some(("broken_symlink", format!("a symbolic link to nothing readable: {e}"))),
                    ));
                    continue;
                }
            }
        } else {
            kind
        };
        if target.is_dir() {
            let canonical = std::fs::canonicalize(&path).at(&path)?;
            if ancestors.contains(&canonical) {
                out.push((
                    path,
                    Some(("symlink_loop", format!("leads back to {}", canonical.display()))),
                ));
                continue;
            }
            ancestors.push(canonical);
            walk(&path, follow, ancestors, out)?;
            ancestors.pop();
        } else if target.is_file() {
            out.push((path, None));
        } else {
            out.push((path, Some(("not_a_regular_file", "a FIFO, socket or device".into()))));
        }
    }
    Ok(())
}

/// An input file's records, in file order, and the identity of its bytes on disk.
pub struct ReadFile {
    pub records: Vec<Record>,
    pub sha256: String,
    pub bytes: u64,
}

/// Read one input file into records. Its sha256 is taken from the bytes already read, so
/// every input is read from disk once.
pub fn read_file(file: &InputFile, opts: &ReadOptions) -> Result<ReadFile> {
    let source: Arc<str> = Arc::from(file.path.to_string_lossy().as_ref());
    let unread = |reason: &str, detail: String| ReadFile {
        records: vec![bad(&source, 0, reason, detail)],
        sha256: String::new(),
        bytes: 0,
    };
    if let Some((reason, detail)) = &file.skip {
        return Ok(unread(reason, detail.clone()));
    }
    let (inner_name, raw) = match read_decompressed(&file.path, opts, file.from_tree) {
        Ok(r) => r,
        // One unreadable or corrupt file inside a directory is quarantined, not fatal.
        Err(e) if file.from_tree => return Ok(unread("unreadable", describe(&e))),
        Err(e) => return Err(e),
    };
    let Some(Raw {
        data: bytes,
        sha256,
        len,
        oversized,
    }) = raw
    else {
        let (sha256, len) = mmrec_schemas::atomic::file_sha256(&file.path)?;
        let records = vec![bad(
            &source,
            0,
            "too_large",
            format!("file is over --max-bytes {}", opts.max_bytes),
        )];
        return Ok(ReadFile {
            records,
            sha256,
            bytes: len,
        });
    };
    let ext = extension(&inner_name);
    let records = if file.from_tree && !matches!(ext.as_str(), "jsonl" | "ndjson" | "parquet") {
        vec![read_source_file(&source, &inner_name, bytes, opts)]
    } else {
        match ext.as_str() {
            "jsonl" | "ndjson" | "json" => read_jsonl(&source, &bytes, opts),
            "parquet" => match read_parquet(&file.path, &source, bytes, opts) {
                Ok(records) => records,
                // A Parquet file found inside a directory that is not a corpus (no text
                // column, unreadable) is quarantined like any unreadable file there.
                Err(e) if file.from_tree => return Ok(unread("unreadable", describe(&e))),
                Err(e) => return Err(e),
            },
            _ if lang::from_extension(&inner_name).is_some() => {
                vec![read_source_file(&source, &inner_name, bytes, opts)]
            }
            _ => read_plain(&source, bytes, opts),
        }
    };
    let dropped = oversized.into_iter().map(|(line, n)| {
        bad(
            &source,
            line,
            "too_large",
            format!(
                "line of {n} bytes is over the limit for --max-bytes {} (dropped while decompressing)",
                opts.max_bytes
            ),
        )
    });
    // After the file's own records: their order is the documents' order.
    let records: Vec<Record> = records.into_iter().chain(dropped).collect();
    let records = records
        .into_iter()
        .map(|r| match r {
            Record::Doc(mut d) => {
                // A declared domain outranks anything the record says about itself.
                if file.declared.is_some() {
                    d.domain_hint = file.declared;
                }
                Record::Doc(d)
            }
            bad => bad,
        })
        .collect();
    Ok(ReadFile {
        records,
        sha256,
        bytes: len,
    })
}

/// A file's decompressed contents with the sha256 and length of its bytes on disk.
struct Raw {
    data: Vec<u8>,
    sha256: String,
    len: u64,
    /// Lines dropped while decompressing for being over the limit: (line, bytes).
    oversized: Vec<(u64, u64)>,
}

/// Returns the file name without a compression suffix, and the decompressed bytes, or None
/// when a source-tree file is over the size limit (checked before reading it).
fn read_decompressed(path: &Path, opts: &ReadOptions, from_tree: bool) -> Result<(String, Option<Raw>)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if from_tree && std::fs::metadata(path).at(path)?.len() > opts.max_bytes {
        return Ok((name, None));
    }
    let raw = std::fs::read(path).at(path)?;
    let (sha256, len) = (mmrec_schemas::atomic::sha256_hex(&raw), raw.len() as u64);
    let decoded = |stem: &str, reader: Box<dyn Read + '_>| -> Result<(String, Option<Raw>)> {
        // Bounded while decompressing: a few KB of zstd can expand to gigabytes.
        let (data, oversized, whole_too_large) = read_bounded(reader, bound_for(stem, from_tree, opts)).at(path)?;
        Ok((
            stem.to_string(),
            (!whole_too_large).then_some(Raw {
                data,
                sha256: sha256.clone(),
                len,
                oversized,
            }),
        ))
    };
    if let Some(stem) = name.strip_suffix(".gz") {
        decoded(stem, Box::new(flate2::read::MultiGzDecoder::new(&raw[..])))
    } else if let Some(stem) = name.strip_suffix(".zst") {
        decoded(stem, Box::new(zstd::Decoder::new(&raw[..]).at(path)?))
    } else {
        Ok((
            name,
            Some(Raw {
                data: raw,
                sha256,
                len,
                oversized: Vec::new(),
            }),
        ))
    }
}

/// How much of a decompressed stream is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bound {
    /// One document: at most this many bytes in all.
    Total(u64),
    /// One record a line: lines over this many bytes are dropped (and reported).
    PerLine(u64),
    Unbounded,
}

fn bound_for(inner_name: &str, from_tree: bool, opts: &ReadOptions) -> Bound {
    match extension(inner_name).as_str() {
        // A JSON line also holds quoting and other fields: the text itself is checked
        // against --max-bytes once parsed.
        "jsonl" | "ndjson" | "json" => Bound::PerLine(opts.max_bytes.saturating_mul(2).saturating_add(4096)),
        "parquet" => Bound::Unbounded,
        _ if from_tree || lang::from_extension(inner_name).is_some() || opts.plain_split == PlainSplit::File => {
            Bound::Total(opts.max_bytes)
        }
        _ => Bound::PerLine(opts.max_bytes),
    }
}

/// Read `r` to the end within `bound`: the bytes kept, the lines dropped as too long (line
/// number, length; their newlines are kept so numbering holds), and whether a `Total`
/// bound was passed (then nothing is kept).
/// What [`read_bounded`] kept: the bytes, the dropped lines, whether the total was passed.
type Bounded = (Vec<u8>, Vec<(u64, u64)>, bool);

fn read_bounded(mut r: impl Read, bound: Bound) -> std::io::Result<Bounded> {
    let mut out = Vec::new();
    let limit = match bound {
        Bound::Unbounded => {
            r.read_to_end(&mut out)?;
            return Ok((out, Vec::new(), false));
        }
        Bound::Total(n) => {
            r.take(n.saturating_add(1)).read_to_end(&mut out)?;
            let over = out.len() as u64 > n;
            return Ok((if over { Vec::new() } else { out }, Vec::new(), over));
        }
        Bound::PerLine(n) => n,
    };
    let (mut buf, mut oversized) = (vec![0u8; 1 << 16], Vec::new());
    let (mut line, mut len, mut dropping) = (1u64, 0u64, false);
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        let mut chunk = &buf[..k];
        while !chunk.is_empty() {
            let end = memchr::memchr(b'\n', chunk);
            let piece = &chunk[..end.unwrap_or(chunk.len())];
            len += piece.len() as u64;
            if !dropping && len > limit {
                // Forget what was kept of this line; skip the rest of it.
                out.truncate(out.len() - (len - piece.len() as u64) as usize);
                dropping = true;
            } else if !dropping {
                out.extend_from_slice(piece);
            }
            match end {
                Some(i) => {
                    if std::mem::take(&mut dropping) {
                        oversized.push((line, len));
                    }
                    out.push(b'\n');
                    (line, len) = (line + 1, 0);
                    chunk = &chunk[i + 1..];
                }
                None => chunk = &[],
            }
        }
    }
    if dropping {
        oversized.push((line, len));
    }
    Ok((out, oversized, false))
}

fn extension(name: &str) -> String {
    Path::new(name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn bad(source: &Arc<str>, line: u64, reason: &str, detail: String) -> Record {
    Record::Bad(QuarantineRecord {
        file: source.to_string(),
        line,
        reason: reason.to_string(),
        detail,
    })
}

/// Checks shared by every input format; returns the quarantine reason, if any.
fn validate_text(text: &str, max_bytes: u64) -> Option<(&'static str, String)> {
    if text.len() as u64 > max_bytes {
        return Some((
            "too_large",
            format!("{} bytes is over --max-bytes {max_bytes}", text.len()),
        ));
    }
    if text.trim().is_empty() {
        return Some(("empty", "text is empty or whitespace only".to_string()));
    }
    if looks_binary(text.as_bytes()) {
        return Some(("binary", "text contains NUL or mostly control bytes".to_string()));
    }
    None
}

/// NUL anywhere in the first 8 KiB, or more than 10% control characters other than
/// whitespace: the test `git` and `grep` use, tightened for text that passed UTF-8 decoding.
pub fn looks_binary(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(8192)];
    if head.contains(&0) {
        return true;
    }
    let control = head
        .iter()
        .filter(|&&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t' | 0x0c))
        .count();
    control * 10 > head.len()
}

fn make_doc(
    source: &Arc<str>,
    line: u64,
    id_suffix: Option<String>,
    text: String,
    lang: Option<String>,
    domain_hint: Option<Domain>,
    max_bytes: u64,
) -> Record {
    if let Some((reason, detail)) = validate_text(&text, max_bytes) {
        return bad(source, line, reason, detail);
    }
    let id = match id_suffix {
        Some(s) => format!("{source}:{line}#{s}"),
        None => format!("{source}:{line}"),
    };
    Record::Doc(Document {
        id,
        source: source.clone(),
        text,
        lang,
        domain_hint,
    })
}

fn read_jsonl(source: &Arc<str>, bytes: &[u8], opts: &ReadOptions) -> Vec<Record> {
    let mut start = 0;
    let ends =
        memchr::memchr_iter(b'\n', bytes).chain((!bytes.is_empty() && !bytes.ends_with(b"\n")).then_some(bytes.len()));
    let lines: Vec<(u64, &[u8])> = ends
        .map(|end| {
            let line = &bytes[start..end];
            start = end + 1;
            line
        })
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    lines
        .into_par_iter()
        .with_max_len(crate::DOCS_PER_TASK)
        .map(|(line, raw)| parse_json_line(source, line, raw, opts))
        .collect()
}

fn parse_json_line(source: &Arc<str>, line: u64, raw: &[u8], opts: &ReadOptions) -> Record {
    let Ok(s) = std::str::from_utf8(raw) else {
        return bad(source, line, "invalid_utf8", "line is not valid UTF-8".to_string());
    };
    let value: Value = match serde_json::from_str(s) {
        Ok(v) => v,
        Err(e) => return bad(source, line, "invalid_json", e.to_string()),
    };
    match value {
        Value::String(text) => make_doc(source, line, None, text, None, None, opts.max_bytes),
        Value::Object(mut obj) => {
            let lang = obj.get("lang").and_then(Value::as_str).map(str::to_ascii_lowercase);
            let id = obj.get("id").or_else(|| obj.get("path")).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            let domain_hint = obj
                .get("domain")
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok())
                .or_else(|| lang.as_deref().and_then(lang::domain_of_lang));
            let text = if let Some(messages) = obj.get("messages") {
                match render_chat(messages) {
                    Ok(t) => t,
                    Err(detail) => return bad(source, line, "invalid_chat", detail),
                }
            } else {
                let fields: Vec<&str> = match &opts.field {
                    Some(f) => vec![f.as_str()],
                    None => vec!["text", "content"],
                };
                // Taken out of the parsed object, not copied: the text is most of the line.
                match fields.iter().find_map(|f| obj.remove(*f).map(|v| (f, v))) {
                    Some((_, Value::String(t))) => t,
                    Some((f, other)) => {
                        return bad(
                            source,
                            line,
                            "missing_field",
                            format!("field {f:?} is {}, not a string", json_kind(&other)),
                        )
                    }
                    None => {
                        return bad(
                            source,
                            line,
                            "missing_field",
                            format!("object has none of the fields {fields:?} nor \"messages\""),
                        )
                    }
                }
            };
            make_doc(source, line, id, text, lang, domain_hint, opts.max_bytes)
        }
        other => bad(
            source,
            line,
            "invalid_record",
            format!("expected a JSON string or object, found {}", json_kind(&other)),
        ),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// OpenAI chat format rendered as one document with a role marker before each turn.
fn render_chat(messages: &Value) -> std::result::Result<String, String> {
    let turns = messages.as_array().ok_or("\"messages\" is not an array")?;
    let mut out = String::new();
    for (i, turn) in turns.iter().enumerate() {
        let role = turn
            .get("role")
            .and_then(Value::as_str)
            .ok_or(format!("message {i} has no string \"role\""))?;
        let content = turn
            .get("content")
            .and_then(Value::as_str)
            .ok_or(format!("message {i} has no string \"content\""))?;
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str("<|");
        out.push_str(role);
        out.push_str("|>\n");
        out.push_str(content);
    }
    Ok(out)
}

fn read_source_file(source: &Arc<str>, name: &str, bytes: Vec<u8>, opts: &ReadOptions) -> Record {
    if looks_binary(&bytes) {
        return bad(
            source,
            0,
            "binary",
            "file contains NUL or mostly control bytes".to_string(),
        );
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => return bad(source, 0, "invalid_utf8", "file is not valid UTF-8".to_string()),
    };
    let lang = lang::from_extension(name)
        .or_else(|| lang::from_shebang(&text))
        .map(str::to_string);
    let hint = lang.as_deref().and_then(lang::domain_of_lang);
    make_doc(source, 0, None, text, lang, hint, opts.max_bytes)
}

fn read_plain(source: &Arc<str>, bytes: Vec<u8>, opts: &ReadOptions) -> Vec<Record> {
    if looks_binary(&bytes) {
        return vec![bad(
            source,
            0,
            "binary",
            "file contains NUL or mostly control bytes".to_string(),
        )];
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u64;
            return vec![bad(source, line, "invalid_utf8", "file is not valid UTF-8".to_string())];
        }
    };
    match opts.plain_split {
        PlainSplit::File => vec![make_doc(source, 0, None, text, None, None, opts.max_bytes)],
        PlainSplit::Line => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| make_doc(source, i as u64 + 1, None, l.to_string(), None, None, opts.max_bytes))
            .collect(),
        PlainSplit::Paragraph => {
            let mut out = Vec::new();
            let mut start: Option<usize> = None;
            let mut para = String::new();
            for (i, l) in text.lines().enumerate() {
                if l.trim().is_empty() {
                    if let Some(s) = start.take() {
                        out.push(make_doc(
                            source,
                            s as u64 + 1,
                            None,
                            std::mem::take(&mut para),
                            None,
                            None,
                            opts.max_bytes,
                        ));
                    }
                } else {
                    if start.is_none() {
                        start = Some(i);
                    } else {
                        para.push('\n');
                    }
                    para.push_str(l);
                }
            }
            if let Some(s) = start {
                out.push(make_doc(source, s as u64 + 1, None, para, None, None, opts.max_bytes));
            }
            out
        }
    }
}

fn read_parquet(path: &Path, source: &Arc<str>, bytes: Vec<u8>, opts: &ReadOptions) -> Result<Vec<Record>> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use arrow_schema::DataType;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let err = |message: String| Error::Parquet {
        path: path.to_path_buf(),
        message,
    };
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).map_err(|e| err(e.to_string()))?;
    let schema = builder.schema().clone();
    let candidates: Vec<&str> = match &opts.field {
        Some(f) => vec![f.as_str()],
        None => vec!["text", "content"],
    };
    let text_col = candidates
        .iter()
        .find_map(|c| schema.index_of(c).ok())
        .ok_or_else(|| err(format!("no text column: looked for {candidates:?} (use --field NAME)")))?;
    let string_col = |name: &str| {
        schema
            .index_of(name)
            .ok()
            .filter(|&i| matches!(schema.field(i).data_type(), DataType::Utf8 | DataType::LargeUtf8))
    };
    let lang_col = string_col("lang");
    let domain_col = string_col("domain");
    let reader = builder.with_batch_size(4096).build().map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let get = |col: usize, i: usize| -> Option<String> {
            let a = batch.column(col);
            if a.is_null(i) {
                return None;
            }
            match a.data_type() {
                DataType::Utf8 => Some(a.as_string::<i32>().value(i).to_string()),
                DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i).to_string()),
                _ => None,
            }
        };
        if !matches!(batch.column(text_col).data_type(), DataType::Utf8 | DataType::LargeUtf8) {
            return Err(err(format!(
                "column {:?} is {}, not a string",
                schema.field(text_col).name(),
                batch.column(text_col).data_type()
            )));
        }
        for i in 0..batch.num_rows() {
            match get(text_col, i) {
                None => out.push(bad(source, row, "missing_field", "text is null".to_string())),
                Some(text) => {
                    let lang = lang_col.and_then(|c| get(c, i)).map(|l| l.to_ascii_lowercase());
                    let hint = domain_col
                        .and_then(|c| get(c, i))
                        .and_then(|d| d.parse().ok())
                        .or_else(|| lang.as_deref().and_then(lang::domain_of_lang));
                    out.push(make_doc(source, row, None, text, lang, hint, opts.max_bytes));
                }
            }
            row += 1;
        }
    }
    Ok(out)
}

/// The text of every good document of `specs`, in input order, and how many files held
/// them (for tokenizer training and benchmarks, which need the documents, not shards).
pub fn read_texts(specs: &[InputSpec], opts: &ReadOptions) -> Result<(Vec<String>, usize)> {
    let files = expand_inputs(specs, false)?;
    let mut texts = Vec::new();
    for f in &files {
        texts.extend(read_file(f, opts)?.records.into_iter().filter_map(|r| match r {
            Record::Doc(d) => Some(d.text),
            Record::Bad(_) => None,
        }));
    }
    Ok((texts, files.len()))
}

/// Inputs whose domain the user declares.
#[derive(clap::Args)]
pub struct DeclaredInputs {
    /// Inputs whose documents are prose.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub text: Vec<PathBuf>,
    /// Inputs whose documents are source code.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub code: Vec<PathBuf>,
    /// Inputs whose documents mix prose and code.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub mixed: Vec<PathBuf>,
}

impl DeclaredInputs {
    /// One input spec per path, with its declared domain.
    pub fn specs(self) -> Vec<InputSpec> {
        [
            (self.text, Domain::Text),
            (self.code, Domain::Code),
            (self.mixed, Domain::Mixed),
        ]
        .into_iter()
        .flat_map(|(paths, d)| {
            paths.into_iter().map(move |path| InputSpec {
                path,
                declared: Some(d),
            })
        })
        .collect()
    }
}
