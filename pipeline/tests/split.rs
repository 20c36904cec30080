//! End-to-end behaviour of `mmrec-data split` on the bundled fixtures, through the real binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mmrec_pipeline::catalog::validate;
use mmrec_schemas::read_manifest;
use mmrec_schemas::{Domain, Manifest};

use mmrec_tests::{fixtures, rewrite_foreign};

fn corpus(name: &str) -> String {
    fixtures().join("corpora").join(name).to_string_lossy().into_owned()
}

fn tokenizer() -> String {
    fixtures().join("tokenizer.json").to_string_lossy().into_owned()
}

fn mmrec_data(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mmrec-data"))
        .args(args)
        .output()
        .expect("mmrec-data runs");
    if !out.status.success() {
        eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// The standard fixture run: every JSONL shape, a source tree and the bad records.
fn split_fixtures(out: &Path, extra: &[&str]) -> Output {
    let out = out.to_string_lossy().into_owned();
    let (wiki, py, syn, chat, bad, tree) = (
        corpus("wikitext.jsonl"),
        corpus("python_stdlib.jsonl"),
        corpus("code_synthetic.jsonl"),
        corpus("chat.jsonl"),
        corpus("bad.jsonl"),
        fixtures().join("tree").to_string_lossy().into_owned(),
    );
    let tok = tokenizer();
    let mut args = vec![
        "split",
        "--text",
        &wiki,
        "--code",
        &py,
        &syn,
        "--mixed",
        &chat,
        "--auto",
        &tree,
        &bad,
        "--tokenizer",
        &tok,
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    mmrec_data(&args)
}

/// Every file of a run's output except the resume bookkeeping, by relative path.
fn output_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel.starts_with(".state") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                files.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

#[test]
fn every_record_is_written_deduplicated_or_quarantined_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    assert!(split_fixtures(dir.path(), &[]).status.success());
    let m = read_manifest(dir.path()).unwrap();
    let t = &m.totals;
    assert!(t.balances(), "{t:?}");
    // 240 wikitext + 40 python + 300 synthetic + 160 chat + 10 bad + 8 tree files.
    assert_eq!(t.records_in, 240 + 40 + 300 + 160 + 10 + 8);
    let reasons: Vec<(&str, u64)> = m.rejected.by_reason.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    assert_eq!(
        reasons,
        [
            ("binary", 2),
            ("empty", 1),
            ("invalid_chat", 1),
            ("invalid_json", 1),
            ("invalid_record", 1),
            ("invalid_utf8", 1),
            ("missing_field", 2)
        ]
    );
    let quarantine = std::fs::read_to_string(dir.path().join("quarantine.jsonl")).unwrap();
    assert!(
        quarantine.contains(r#""line":2,"reason":"invalid_json""#),
        "{quarantine}"
    );
    assert!(
        quarantine.contains(r#"blob.bin","line":0,"reason":"binary""#),
        "{quarantine}"
    );
    assert!(
        quarantine.contains(r#""line":4,"reason":"missing_field","detail":"field \"text\" is a number, not a string""#),
        "{quarantine}"
    );
    // The three declared shapes land where declared; chat renders role markers.
    // Of the --auto records, bad.jsonl's prose line is text and its chat with a fenced
    // snippet is mixed; the tree's README (prose + fence) is mixed and its sources code.
    assert_eq!(t.per_domain[&Domain::Text].documents, 240 + 1);
    assert_eq!(t.per_domain[&Domain::Mixed].documents, 160 + 2);
    assert!(validate(dir.path()).unwrap().ok());
}

#[test]
fn output_is_byte_identical_whatever_the_thread_count_and_the_text_kept_between_passes() {
    let run = |threads: &str, keep_mb: &str| {
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "--threads",
            threads,
            "--keep-text-mb",
            keep_mb,
            "--near-dup",
            "--shard-docs",
            "50",
            "--row-group-docs",
            "16",
        ];
        assert!(split_fixtures(dir.path(), &args).status.success());
        output_files(dir.path())
    };
    // One thread keeping every text from pass 1; two threads re-reading every input.
    let (fa, fb) = (run("1", "512"), run("2", "0"));
    assert!(fa.len() > 10, "several shards were written: {:?}", fa.keys());
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(bytes == &fb[name], "{name} differs between the two runs");
    }
}

#[test]
fn exact_duplicates_are_always_removed_and_near_duplicates_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dups.jsonl");
    let wiki = std::fs::read_to_string(corpus("wikitext.jsonl")).unwrap();
    let first: Vec<&str> = wiki.lines().take(20).collect();
    // Each line twice, the second copy re-wrapped: same normalised text.
    let doubled: String = first
        .iter()
        .map(|l| format!("{l}\n{}\n", l.replace(" , ", " ,  ")))
        .collect();
    std::fs::write(&input, doubled).unwrap();
    let (out, tok) = (dir.path().join("s"), tokenizer());
    assert!(mmrec_data(&[
        "split",
        "--text",
        input.to_str().unwrap(),
        "--tokenizer",
        &tok,
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let m = read_manifest(&out).unwrap();
    assert_eq!((m.totals.written, m.totals.exact_duplicates), (20, 20));

    let syn = corpus("code_synthetic.jsonl");
    let out2 = dir.path().join("syn");
    assert!(mmrec_data(&[
        "split",
        "--code",
        &syn,
        "--tokenizer",
        &tok,
        "--out",
        out2.to_str().unwrap(),
        "--near-dup"
    ])
    .status
    .success());
    let m = read_manifest(&out2).unwrap();
    assert_eq!(
        m.totals.written, 5,
        "the synthetic corpus is five snippets with a counter"
    );
    assert_eq!(m.totals.near_duplicates, 295);
    let dups = std::fs::read_to_string(out2.join("duplicates.jsonl")).unwrap();
    assert!(dups.lines().all(|l| l.contains(r#""kind":"near""#)));
}

#[test]
fn a_killed_run_resumes_keeping_verified_shards_and_ends_identical() {
    let (clean, killed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // One document per shard makes the run long enough to kill in the middle.
    let args = ["--shard-docs", "1", "--threads", "1"];
    assert!(split_fixtures(clean.path(), &args).status.success());

    let (wiki, py, chat, tok) = (
        corpus("wikitext.jsonl"),
        corpus("python_stdlib.jsonl"),
        corpus("chat.jsonl"),
        tokenizer(),
    );
    let out = killed.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmrec-data"))
        .args([
            "split",
            "--text",
            &wiki,
            "--code",
            &py,
            &corpus("code_synthetic.jsonl"),
            "--mixed",
            &chat,
            "--auto",
            fixtures().join("tree").to_str().unwrap(),
            &corpus("bad.jsonl"),
            "--tokenizer",
            &tok,
            "--out",
            out,
        ])
        .args(args)
        .spawn()
        .unwrap();
    let state = killed.path().join(".state");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&state).map(|d| d.count()).unwrap_or(0) < 20 {
        assert!(std::time::Instant::now() < deadline, "no shard finished within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.path().join("manifest.json").exists(),
        "the run was killed before it finished"
    );
    // Damage one finished shard: resume must notice the checksum and redo it.
    let victim = std::fs::read_dir(killed.path().join("text"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&victim, b"garbage").unwrap();

    let resumed = split_fixtures(killed.path(), &["--shard-docs", "1", "--threads", "1", "--json"]);
    assert!(resumed.status.success());
    let report: serde_json::Value = serde_json::from_slice(&resumed.stdout).unwrap();
    assert!(
        report["shards_kept"].as_u64().unwrap() >= 18,
        "{}",
        report["shards_kept"]
    );
    assert!(report["shards_written"].as_u64().unwrap() >= 1);
    assert_eq!(output_files(clean.path()), output_files(killed.path()));
}

#[test]
fn partitions_merge_into_the_same_documents_as_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    assert!(split_fixtures(&whole, &[]).status.success());
    let parts: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("part{i}"))).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(split_fixtures(p, &["--part", &format!("{i}/3")]).status.success());
    }
    let merged = dir.path().join("merged");
    let mut args = vec!["merge".to_string(), "--out".into(), merged.to_string_lossy().into()];
    args.extend(parts.iter().rev().map(|p| p.to_string_lossy().into_owned()));
    assert!(mmrec_data(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .status
        .success());
    let (w, m): (Manifest, Manifest) = (read_manifest(&whole).unwrap(), read_manifest(&merged).unwrap());
    assert_eq!(w.totals, m.totals);
    assert!(validate(&merged).unwrap().ok());
    // A missing part is refused.
    let partial = dir.path().join("partial");
    assert!(!mmrec_data(&[
        "merge",
        "--out",
        partial.to_str().unwrap(),
        parts[0].to_str().unwrap(),
        parts[1].to_str().unwrap()
    ])
    .status
    .success());
}

#[test]
fn compressed_and_parquet_inputs_read_like_plain_jsonl() {
    use arrow_array::{RecordBatch, StringArray};
    let dir = tempfile::tempdir().unwrap();
    let raw = std::fs::read(corpus("wikitext.jsonl")).unwrap();
    let gz = dir.path().join("wiki.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &raw).unwrap();
    enc.finish().unwrap();
    let zst = dir.path().join("wiki.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
    // A Parquet file with a `content` column, as other tools write them.
    let texts: Vec<String> = raw
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice::<String>(l).unwrap())
        .collect();
    let pq = dir.path().join("wiki.parquet");
    let batch =
        RecordBatch::try_from_iter([("content", std::sync::Arc::new(StringArray::from(texts.clone())) as _)]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&pq).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let tok = tokenizer();
    for input in [&gz, &zst, &pq] {
        let out = dir
            .path()
            .join(format!("out-{}", input.file_name().unwrap().to_string_lossy()));
        assert!(mmrec_data(&[
            "split",
            "--text",
            input.to_str().unwrap(),
            "--tokenizer",
            &tok,
            "--out",
            out.to_str().unwrap()
        ])
        .status
        .success());
        let m = read_manifest(&out).unwrap();
        assert_eq!(m.totals.written, texts.len() as u64, "{}", input.display());
    }
}

#[test]
fn source_trees_take_language_from_extension_and_shebang() {
    let dir = tempfile::tempdir().unwrap();
    let (tree, tok) = (fixtures().join("tree"), tokenizer());
    let out = dir.path().join("s");
    assert!(mmrec_data(&[
        "split",
        "--auto",
        tree.to_str().unwrap(),
        "--tokenizer",
        &tok,
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let ins = mmrec_pipeline::catalog::inspect(&out, 100, 40).unwrap();
    let langs: BTreeMap<String, (Domain, Option<String>)> = ins
        .samples
        .iter()
        .flat_map(|(d, s)| {
            s.iter()
                .map(move |s| (s.id.rsplit('/').next().unwrap().to_string(), (*d, s.lang.clone())))
        })
        .collect();
    assert_eq!(langs["numbered:0"], (Domain::Code, Some("shell".into())));
    assert_eq!(langs["adler2_algo.rs:0"], (Domain::Code, Some("rust".into())));
    assert_eq!(langs["README.md:0"], (Domain::Mixed, Some("markdown".into())));
    assert_eq!(ins.manifest.rejected.by_reason["binary"], 1);
}

#[test]
fn strict_mode_fails_on_quarantine_and_a_missing_input_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, tok) = (corpus("bad.jsonl"), tokenizer());
    let out = dir.path().join("s");
    let o = mmrec_data(&[
        "split",
        "--auto",
        &bad,
        "--tokenizer",
        &tok,
        "--out",
        out.to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let out2 = dir.path().join("never");
    let o = mmrec_data(&[
        "split",
        "--text",
        "/nonexistent/corpus.jsonl",
        "--tokenizer",
        &tok,
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/corpus.jsonl"));
    assert!(!out2.exists(), "nothing is written when an input is missing");
}

#[test]
fn validate_reports_a_tampered_shard() {
    let dir = tempfile::tempdir().unwrap();
    assert!(split_fixtures(dir.path(), &[]).status.success());
    assert!(mmrec_data(&["validate", dir.path().to_str().unwrap()]).status.success());
    let shard = dir.path().join("text/part-00000-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let o = mmrec_data(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("part-00000-00000.parquet"));
}

#[test]
fn an_existing_tokenizer_with_a_large_vocabulary_gives_u32_tokens() {
    let dir = tempfile::tempdir().unwrap();
    // A word-level tokenizer.json of 70 000 entries, as another tool would have written it.
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, w) in (1..70_000).map(|i| (i, format!("w{i}"))) {
        vocab.insert(w, i.into());
    }
    vocab.insert("the".into(), 70_000.into());
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, serde_json::to_vec(&tok).unwrap()).unwrap();
    let out = dir.path().join("s");
    assert!(mmrec_data(&[
        "split",
        "--text",
        &corpus("wikitext.jsonl"),
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let m = read_manifest(&out).unwrap();
    assert_eq!(m.tokenizer.token_width, mmrec_schemas::TokenWidth::U32);
    assert!(validate(&out).unwrap().ok());
}

#[test]
fn a_trained_tokenizer_has_the_specials_and_round_trips_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tok.json");
    assert!(mmrec_data(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "600",
        "--out",
        out.to_str().unwrap(),
        &corpus("wikitext.jsonl"),
        &corpus("chat.jsonl")
    ])
    .status
    .success());
    let t = mmrec_pipeline::tokenize::LoadedTokenizer::load(&out).unwrap();
    assert_eq!(t.info.special_tokens["<|endoftext|>"], 0);
    assert_eq!(t.info.special_tokens["<|pad|>"], 1);
    assert_eq!(t.info.vocab_size, 600);
    let text = "Valkyria Chronicles III: def f(x): return x";
    let ids = t.encode(text).unwrap();
    assert_eq!(t.tokenizer.decode(&ids, false).unwrap(), text);
}

/// The encoder's three paths (GPT-2 split, HF pre-tokenizer + word cache, HF's encode)
/// against HF's `encode` on every fixture document, nine programming languages, special
/// tokens inside text, and random text from every character class.
#[test]
fn the_cached_encoder_gives_exactly_the_ids_of_hf_encode() {
    let mut texts: Vec<String> = Vec::new();
    for f in [
        "wikitext.jsonl",
        "python_stdlib.jsonl",
        "chat.jsonl",
        "code_synthetic.jsonl",
    ] {
        for line in std::fs::read_to_string(fixtures().join("corpora").join(f))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            texts.push(match &v {
                serde_json::Value::String(s) => s.clone(),
                _ if v.get("messages").is_some() => v.to_string(),
                _ => v["text"].as_str().unwrap().to_string(),
            });
        }
    }
    let raw = zstd::decode_all(std::fs::File::open(fixtures().join("classifier_eval.jsonl.zst")).unwrap()).unwrap();
    texts.extend(raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| {
        serde_json::from_slice::<serde_json::Value>(l).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string()
    }));
    texts.push("one<|endoftext|>two <|pad|>  three\t\n<|endoftext|>".into());
    texts.push(String::new());
    let palette: Vec<char> = "ab'stre lldm \t\n\u{a0}\u{3000}09½é\u{301}漢😀.,!\"<|>endoftext"
        .chars()
        .collect();
    let mut state = 7u64;
    for _ in 0..2000 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (state >> 40) as usize % 40;
        texts.push(
            (0..len)
                .map(|k| palette[((state >> (k % 48)) as usize + k * 7) % palette.len()])
                .collect(),
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer.json")).unwrap()).unwrap();
    let mut prefixed = base.clone();
    prefixed["pre_tokenizer"]["add_prefix_space"] = true.into();
    let mut normalised = base.clone();
    normalised["normalizer"] = serde_json::json!({"type": "NFKC"});
    // Special-token strings in the texts above are encoded as text on both sides (the
    // loader sets HF's `encode_special_tokens`); truncation, padding and dropout are refused.
    for (name, json) in [
        ("byte-level", base),
        ("prefix-space", prefixed),
        ("normaliser", normalised),
    ] {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = mmrec_pipeline::tokenize::LoadedTokenizer::load(&path).unwrap();
        for pass in 0..2 {
            // The second pass is served from the warm word cache.
            for t in &texts {
                let want = tok.tokenizer.encode_fast(t.as_str(), false).unwrap().get_ids().to_vec();
                assert_eq!(
                    tok.encode(t).unwrap(),
                    want,
                    "{name}, pass {pass}: {:?}",
                    &t[..t.floor_char_boundary(80)]
                );
            }
        }
    }
}

#[test]
fn shards_and_row_groups_close_at_their_text_byte_bounds() {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use mmrec_schemas::shard::ShardReader;
    let dir = tempfile::tempdir().unwrap();
    let inputs = vec![mmrec_pipeline::InputSpec {
        path: corpus("python_stdlib.jsonl").into(),
        declared: Some(Domain::Code),
    }];
    let (group_max, shard_max) = (16u64 << 10, 64u64 << 10);
    let opts = mmrec_pipeline::SplitOptions {
        row_group_bytes: group_max,
        shard_bytes: shard_max,
        ..mmrec_pipeline::SplitOptions::new(inputs, tokenizer(), dir.path())
    };
    let report = mmrec_pipeline::split(&opts, &()).unwrap();
    let shards = &report.manifest.domains[&Domain::Code];
    let mut groups = 0;
    for s in shards {
        let path = dir.path().join(&s.file);
        let mut shard_bytes = 0;
        for g in 0..ShardReader::open(&path).unwrap().num_row_groups() {
            let batches: Vec<_> = ShardReader::open(&path)
                .unwrap()
                .batches(&[mmrec_schemas::columns::TEXT], Some(vec![g]))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(batches.len(), 1, "one row group, one batch");
            let text = batches[0].column(0).as_string::<i64>();
            let bytes: u64 = text.iter().map(|t| t.unwrap().len() as u64).sum();
            assert!(
                bytes <= group_max || text.len() == 1,
                "{}: row group {g} holds {bytes} bytes in {} rows",
                s.file,
                text.len()
            );
            shard_bytes += bytes;
            groups += 1;
        }
        assert!(
            shard_bytes <= shard_max || s.rows == 1,
            "{} holds {shard_bytes} bytes",
            s.file
        );
    }
    // The fixture's 40 files (194 KB) need several shards and several groups per shard.
    assert!(
        shards.len() >= 3 && groups >= 2 * shards.len(),
        "{} shards, {groups} row groups",
        shards.len()
    );
    assert_eq!(report.manifest.settings.row_group_bytes, group_max);
    assert!(validate(dir.path()).unwrap().ok());
}

#[test]
fn byte_bounds_are_given_in_mib_and_must_be_above_zero() {
    // Through the binary's flags: MiB bounds, checked against the defaults' manifest.
    let dir = tempfile::tempdir().unwrap();
    let (py, tok, out) = (
        corpus("python_stdlib.jsonl"),
        tokenizer(),
        dir.path().to_string_lossy().into_owned(),
    );
    assert!(mmrec_data(&[
        "split",
        "--code",
        &py,
        "--tokenizer",
        &tok,
        "--out",
        &out,
        "--shard-mb",
        "1",
        "--row-group-mb",
        "1"
    ])
    .status
    .success());
    let m = read_manifest(dir.path()).unwrap();
    assert_eq!((m.settings.shard_bytes, m.settings.row_group_bytes), (1 << 20, 1 << 20));
    let zero = mmrec_data(&[
        "split",
        "--code",
        &py,
        "--tokenizer",
        &tok,
        "--out",
        &out,
        "--row-group-mb",
        "0",
    ]);
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--row-group-mb"));
}

#[test]
fn validate_reports_rows_in_the_wrong_domain_and_ids_outside_the_vocabulary() {
    use mmrec_schemas::shard::{ShardRow, ShardWriter};
    let dir = tempfile::tempdir().unwrap();
    assert!(split_fixtures(dir.path(), &[]).status.success());
    let m = read_manifest(dir.path()).unwrap();
    let vocab = m.tokenizer.vocab_size;
    let shard = dir.path().join(&m.domains[&Domain::Text][0].file);
    let row = |domain, tokens| ShardRow {
        id: "forged",
        domain,
        lang: None,
        source: "forged",
        text: "forged",
        tokens,
        hash: 0,
    };
    let rows = [
        row(Domain::Code, vec![5]),
        row(Domain::Text, vec![5, 6]),
        row(Domain::Text, vec![5, vocab as u32 + 7, 6]),
    ];
    let mut w = ShardWriter::create(&shard, m.tokenizer.token_width).unwrap();
    w.write(&rows).unwrap();
    w.finish().unwrap();
    let problems = validate(dir.path()).unwrap().problems.join("\n");
    assert!(
        problems.contains(r#"row 0 has domain "code" in the text directory"#),
        "{problems}"
    );
    assert!(
        problems.contains(&format!(
            "row 2 has token id {} outside the vocabulary ({vocab})",
            vocab + 7
        )),
        "{problems}"
    );
    assert!(!problems.contains("row 1 has"), "{problems}");
}

/// Every document's content hash in a shard directory, from its shards.
fn document_hashes(dir: &Path) -> std::collections::BTreeSet<u64> {
    let m = read_manifest(dir).unwrap();
    let mut hashes = std::collections::BTreeSet::new();
    for s in m.domains.values().flatten() {
        for b in mmrec_schemas::shard::ShardReader::open(&dir.join(&s.file))
            .unwrap()
            .batches(&["hash"], None)
            .unwrap()
        {
            let b = b.unwrap();
            let col = arrow_array::cast::AsArray::as_primitive::<arrow_array::types::UInt64Type>(b.column(0));
            for &h in col.values() {
                assert!(hashes.insert(h), "document {h:x} appears twice");
            }
        }
    }
    hashes
}

#[test]
fn near_duplicates_are_removed_across_parts_exactly_as_one_run_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    assert!(split_fixtures(&whole, &["--near-dup"]).status.success());
    let w = read_manifest(&whole).unwrap();
    assert!(
        w.totals.near_duplicates > 100,
        "the fixtures hold near-duplicates (the synthetic snippets)"
    );
    let want = document_hashes(&whole);
    for n in 1..=3u32 {
        let parts: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("n{n}-part{i}"))).collect();
        for (i, p) in parts.iter().enumerate() {
            assert!(split_fixtures(p, &["--near-dup", "--part", &format!("{i}/{n}")])
                .status
                .success());
        }
        let merged = dir.path().join(format!("n{n}-merged"));
        let mut args = vec!["merge".to_string(), "--out".into(), merged.to_string_lossy().into()];
        args.extend(parts.iter().map(|p| p.to_string_lossy().into_owned()));
        assert!(mmrec_data(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .status
            .success());
        let m = read_manifest(&merged).unwrap();
        assert_eq!(m.totals, w.totals, "{n} parts");
        assert_eq!(
            document_hashes(&merged),
            want,
            "{n} parts keep other documents than one run"
        );
        assert!(
            validate(&merged).unwrap().ok(),
            "{n} parts: the rewritten shards validate"
        );
        let logged = std::fs::read_to_string(merged.join("duplicates.jsonl"))
            .unwrap()
            .lines()
            .count() as u64;
        assert_eq!(logged, m.totals.exact_duplicates + m.totals.near_duplicates);
        if n == 3 {
            // The test means something only if near-duplicates fell into different parts.
            let part_of: BTreeMap<String, usize> = parts
                .iter()
                .enumerate()
                .flat_map(|(i, p)| {
                    mmrec_pipeline::global_dedup::read_signatures(&p.join("near_dup_signatures.bin"))
                        .unwrap()
                        .1
                        .into_iter()
                        .map(move |r| (r.id, i))
                })
                .collect();
            let crossing = std::fs::read_to_string(merged.join("duplicates.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|d| {
                    d["kind"] == "near"
                        && part_of.get(d["id"].as_str().unwrap()) != part_of.get(d["kept"].as_str().unwrap())
                })
                .count();
            assert!(crossing > 50, "only {crossing} near-duplicates crossed parts");
        }
    }
}

#[test]
fn token_ids_above_65535_from_a_small_vocabulary_are_stored_whole() {
    // Seven entries, but ids up to 65 540: the width must follow the highest id.
    let dir = tempfile::tempdir().unwrap();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "b": 2, "c": 3, "d": 4, "hello": 65_537, "world": 65_540}, "unk_token": "[UNK]"}
    });
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, serde_json::to_vec(&tok).unwrap()).unwrap();
    let input = dir.path().join("hello.jsonl");
    std::fs::write(&input, "\"hello world\"\n").unwrap();
    let out = dir.path().join("s");
    assert!(mmrec_data(&[
        "split",
        "--text",
        input.to_str().unwrap(),
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let m = read_manifest(&out).unwrap();
    assert_eq!(
        (m.tokenizer.vocab_size, m.tokenizer.token_width),
        (65_541, mmrec_schemas::TokenWidth::U32)
    );
    let shard = &m.domains[&Domain::Text][0].file;
    let batch = mmrec_schemas::shard::ShardReader::open(&out.join(shard))
        .unwrap()
        .batches(&["tokens"], None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        mmrec_schemas::shard::token_lists(batch.column(0).as_ref()),
        vec![vec![65_537, 65_540]]
    );
    assert!(validate(&out).unwrap().ok());
}

#[test]
fn shard_paths_leaving_the_directory_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    assert!(split_fixtures(&s, &[]).status.success());
    let manifest = s.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let first = read_manifest(&s).unwrap().domains[&Domain::Text][0].file.clone();
    for forged in ["../../../x.parquet", "/tmp/x.parquet"] {
        std::fs::write(
            &manifest,
            text.replacen(&format!("\"{first}\""), &format!("{forged:?}"), 1),
        )
        .unwrap();
        for args in [
            vec!["validate", s.to_str().unwrap()],
            vec!["inspect", s.to_str().unwrap()],
        ] {
            let out = mmrec_data(&args);
            assert!(!out.status.success(), "{args:?} accepted {forged}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("must be relative and inside the directory"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn merge_refuses_a_corrupt_part_shard_and_writes_no_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let parts: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("p{i}"))).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(split_fixtures(p, &["--part", &format!("{i}/2")]).status.success());
    }
    let victim = parts[1].join(&read_manifest(&parts[1]).unwrap().domains[&Domain::Code][0].file);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let merged = dir.path().join("merged");
    let out = mmrec_data(&[
        "merge",
        "--out",
        merged.to_str().unwrap(),
        parts[0].to_str().unwrap(),
        parts[1].to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupt or replaced"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!merged.join("manifest.json").exists());
}

#[test]
fn tokenizer_training_reports_the_size_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tok.json");
    let o = mmrec_data(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "50000",
        "--out",
        out.to_str().unwrap(),
        &corpus("chat.jsonl"),
    ]);
    assert!(o.status.success());
    let written = mmrec_pipeline::tokenize::LoadedTokenizer::load(&out)
        .unwrap()
        .info
        .vocab_size;
    assert!(written < 50_000);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("trained a {written}-entry")) && err.contains("asked for 50000"),
        "{err}"
    );
}

/// Quarantine reasons of a run, counted.
fn quarantine_reasons(dir: &Path) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    for l in std::fs::read_to_string(dir.join("quarantine.jsonl")).unwrap().lines() {
        *reasons
            .entry(
                serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
            .or_default() += 1;
    }
    reasons
}

#[test]
fn links_fifos_and_unreadable_files_in_a_tree_are_quarantined_and_a_fifo_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::copy(fixtures().join("tree/adler2_algo.rs"), tree.join("sub/algo.rs")).unwrap();
    std::os::unix::fs::symlink(tree.join("sub/algo.rs"), tree.join("link.rs")).unwrap();
    std::os::unix::fs::symlink(&tree, tree.join("sub/loop")).unwrap();
    std::fs::write(tree.join("broken.jsonl.gz"), b"not gzip at all").unwrap();
    // Parquet that is not a corpus (no text column), as source trees carry as test data.
    let batch = arrow_array::RecordBatch::try_from_iter([(
        "x",
        std::sync::Arc::new(arrow_array::Int32Array::from(vec![1, 2])) as arrow_array::ArrayRef,
    )])
    .unwrap();
    let file = std::fs::File::create(tree.join("sub/data.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let fifo = tree.join("pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let tok = tokenizer();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "split",
            "--auto",
            tree.to_str().unwrap(),
            "--tokenizer",
            &tok,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        mmrec_data(&args)
    };
    let plain = dir.path().join("plain");
    assert!(run(&plain, &[]).status.success());
    let m = read_manifest(&plain).unwrap();
    assert!(m.totals.balances());
    assert_eq!((m.totals.written, m.totals.records_in), (1, 6));
    let want: BTreeMap<String, usize> = [("not_a_regular_file", 1), ("symlink", 2), ("unreadable", 2)]
        .map(|(r, n)| (r.to_string(), n))
        .into();
    assert_eq!(quarantine_reasons(&plain), want);
    // Followed, the link to a file is read (an exact duplicate of its target) and the
    // link back up the tree is a loop.
    let followed = dir.path().join("followed");
    assert!(run(&followed, &["--follow-symlinks"]).status.success());
    let m = read_manifest(&followed).unwrap();
    assert_eq!((m.totals.written, m.totals.exact_duplicates), (1, 1));
    let want: BTreeMap<String, usize> = [("not_a_regular_file", 1), ("symlink_loop", 1), ("unreadable", 2)]
        .map(|(r, n)| (r.to_string(), n))
        .into();
    assert_eq!(quarantine_reasons(&followed), want);
    // A FIFO given as an input is refused at once instead of waiting for a writer.
    let out = mmrec_data(&[
        "split",
        "--text",
        fifo.to_str().unwrap(),
        "--tokenizer",
        &tok,
        "--out",
        dir.path().join("f").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failed_re_run_leaves_no_manifest_describing_replaced_shards_and_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    assert!(split_fixtures(&out, &[]).status.success());
    // Re-run with other settings into the same directory, failing part-way: the `mixed`
    // domain's directory is a file, so its shards cannot be written.
    std::fs::remove_dir_all(out.join("mixed")).unwrap();
    std::fs::write(out.join("mixed"), b"in the way").unwrap();
    let failed = split_fixtures(&out, &["--row-group-docs", "3"]);
    assert!(!failed.status.success());
    assert!(
        !out.join("manifest.json").exists(),
        "the old manifest would describe shards this run replaced"
    );
    assert!(!mmrec_data(&["inspect", out.to_str().unwrap()]).status.success());
    let leftovers: Vec<String> = ["text", "code"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(out.join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        })
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn tokenizers_that_truncate_pad_or_drop_out_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let base: serde_json::Value = serde_json::from_slice(&std::fs::read(tokenizer()).unwrap()).unwrap();
    let cases = [
        (
            "truncation",
            serde_json::json!({"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}),
        ),
        (
            "padding",
            serde_json::json!({"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": null, "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"}),
        ),
        ("dropout", serde_json::json!(0.1)),
    ];
    for (setting, value) in cases {
        let mut t = base.clone();
        if setting == "dropout" {
            t["model"]["dropout"] = value;
        } else {
            t[setting] = value;
        }
        let path = dir.path().join(format!("{setting}.json"));
        std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
        let out = mmrec_data(&[
            "split",
            "--text",
            &corpus("wikitext.jsonl"),
            "--tokenizer",
            path.to_str().unwrap(),
            "--out",
            dir.path().join(setting).to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{setting} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(setting),
            "{setting}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn special_token_strings_in_documents_are_encoded_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("specials.jsonl");
    std::fs::write(&input, "\"before <|endoftext|> middle <|pad|> after\"\n").unwrap();
    let out = dir.path().join("s");
    assert!(mmrec_data(&[
        "split",
        "--text",
        input.to_str().unwrap(),
        "--tokenizer",
        &tokenizer(),
        "--out",
        out.to_str().unwrap()
    ])
    .status
    .success());
    let m = read_manifest(&out).unwrap();
    let specials: Vec<u32> = m.tokenizer.special_tokens.values().copied().collect();
    assert_eq!(specials.len(), 2);
    let batch = mmrec_schemas::shard::ShardReader::open(&out.join(&m.domains[&Domain::Text][0].file))
        .unwrap()
        .batches(&["tokens"], None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let ids = &mmrec_schemas::shard::token_lists(batch.column(0).as_ref())[0];
    assert!(
        ids.len() > 6 && !ids.iter().any(|i| specials.contains(i)),
        "a document injected a special id: {ids:?}"
    );
}

#[test]
fn shards_written_by_other_tools_are_read_by_validate_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    assert!(split_fixtures(&out, &["--shard-docs", "50"]).status.success());
    let m = read_manifest(&out).unwrap();
    rewrite_foreign(
        &out,
        &m.domains[&Domain::Text][0].file,
        Some("text/part-00000-99999.parquet"),
    );
    for args in [
        vec!["validate", out.to_str().unwrap()],
        vec!["inspect", out.to_str().unwrap(), "--samples", "2"],
    ] {
        let o = mmrec_data(&args);
        assert!(
            o.status.code().is_some_and(|c| c != 101),
            "{args:?} panicked: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let report = validate(&out).unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn decompression_bombs_are_cut_off_while_streaming_and_quarantined() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // Line 2 of this JSONL decompresses to 4 GiB: over any record limit, and over the
    // 3 GiB of address space the run is given below, so it must never be held whole.
    let bomb = dir.path().join("bomb.jsonl.zst");
    let mut enc = zstd::Encoder::new(std::fs::File::create(&bomb).unwrap(), 1).unwrap();
    enc.write_all(b"\"a first document\"\n\"").unwrap();
    let block = vec![b'a'; 1 << 20];
    for _ in 0..4096 {
        enc.write_all(&block).unwrap();
    }
    enc.write_all(b"\"\n\"a last document\"\n").unwrap();
    enc.finish().unwrap();
    assert!(
        std::fs::metadata(&bomb).unwrap().len() < 1 << 20,
        "a bomb is small on disk"
    );
    // A source tree file that decompresses past --max-bytes.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(tree.join("big.py.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(&vec![b'#'; 8 << 20]).unwrap();
    gz.finish().unwrap();
    let out = dir.path().join("s");
    let cmd = format!(
        "ulimit -v 3145728; exec '{}' split --text '{}' --auto '{}' --tokenizer '{}' --out '{}'",
        env!("CARGO_BIN_EXE_mmrec-data"),
        bomb.display(),
        tree.display(),
        tokenizer(),
        out.display()
    );
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = read_manifest(&out).unwrap();
    assert_eq!((m.totals.written, m.totals.quarantined), (2, 2));
    let q = std::fs::read_to_string(out.join("quarantine.jsonl")).unwrap();
    assert!(q.contains(r#""line":2,"reason":"too_large""#), "{q}");
    assert!(
        q.contains("big.py.gz") && q.lines().all(|l| l.contains("too_large")),
        "{q}"
    );
}
