//! The prefetching loader over real shards built from the fixtures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mmrec_loader::{in_validation, parse_weights, Batch, Cursor, Loader, LoaderConfig, Split};
use mmrec_schemas::read_manifest;
use mmrec_schemas::shard::{token_lists, ShardReader};
use mmrec_schemas::{columns, Domain};
use mmrec_tests::{fixture_shards, rewrite_foreign};

/// Shards of the fixture corpora with many small row groups, built once per test binary.
fn shards() -> PathBuf {
    fixture_shards("loader", 40, 8)
}

fn cfg(workers: usize) -> LoaderConfig {
    LoaderConfig {
        seq_len: 63,
        batch_size: 4,
        workers,
        prefetch: 3,
        lookahead: 3,
        shuffle_buffer: 16,
        val_permille: 100,
        ..LoaderConfig::default()
    }
}

fn take(cfg: LoaderConfig, cursor: Option<Cursor>, n: usize) -> (Vec<Batch>, Cursor) {
    let mut loader = Loader::open(&[shards()], cfg, cursor).unwrap();
    let batches: Vec<Batch> = (0..n).map(|_| loader.next_batch().unwrap().unwrap()).collect();
    let cursor = loader.cursor().unwrap().clone();
    (batches, cursor)
}

fn tokens_of(batches: &[Batch]) -> Vec<Vec<u32>> {
    batches.iter().map(|b| b.tokens.clone()).collect()
}

#[test]
fn batches_depend_on_seed_and_data_not_on_worker_count() {
    let (one, _) = take(cfg(1), None, 60);
    let (three, _) = take(cfg(3), None, 60);
    assert_eq!(tokens_of(&one), tokens_of(&three));
    let (other_seed, _) = take(LoaderConfig { seed: 1, ..cfg(2) }, None, 60);
    assert_ne!(tokens_of(&one), tokens_of(&other_seed));
}

#[test]
fn resuming_from_a_cursor_continues_exactly_also_twice_and_with_other_worker_counts() {
    let (straight, _) = take(cfg(2), None, 90);
    let (a, c1) = take(cfg(2), None, 25);
    // The cursor goes through JSON, as it does in a checkpoint.
    let c1: Cursor = serde_json::from_str(&serde_json::to_string(&c1).unwrap()).unwrap();
    let (b, c2) = take(cfg(1), Some(c1), 30);
    let (c, _) = take(cfg(4), Some(c2), 35);
    let resumed: Vec<Batch> = a.into_iter().chain(b).chain(c).collect();
    assert_eq!(tokens_of(&straight), tokens_of(&resumed));
    assert_eq!(straight.last().unwrap().cursor, resumed.last().unwrap().cursor);
}

#[test]
fn domains_are_mixed_by_weight_with_exact_token_accounting() {
    let weights = parse_weights("text=0.5,code=0.3,mixed=0.2").unwrap();
    let (batches, cursor) = take(
        LoaderConfig {
            weights: weights.clone(),
            ..cfg(2)
        },
        None,
        250,
    );
    let mut rows: BTreeMap<Domain, u64> = BTreeMap::new();
    let mut real: BTreeMap<Domain, u64> = BTreeMap::new();
    for b in &batches {
        for (r, d) in b.domains.iter().enumerate() {
            *rows.entry(*d).or_default() += 1;
            *real.entry(*d).or_default() += b.mask[r * 64..(r + 1) * 64].iter().map(|&m| m as u64).sum::<u64>();
        }
    }
    let total = (batches.len() * 4) as f64;
    for (d, w) in &weights {
        let share = rows[d] as f64 / total;
        assert!(
            (share - w).abs() <= 1.0 / total + 1e-9,
            "{d}: {share} of rows for weight {w}"
        );
    }
    assert_eq!(
        cursor.tokens, real,
        "per-domain token accounting matches what was delivered"
    );
}

#[test]
fn without_shuffling_an_epoch_delivers_every_token_once_in_order() {
    let dir = shards();
    let m = read_manifest(&dir).unwrap();
    let eot = m.tokenizer.special_tokens["<|endoftext|>"];
    // Expected: every training document of the code domain, in shard order, each + EOT.
    let mut want = Vec::new();
    for s in &m.domains[&Domain::Code] {
        let r = ShardReader::open(&dir.join(&s.file)).unwrap();
        for batch in r.batches(&[columns::TOKENS, columns::HASH], None).unwrap() {
            let batch = batch.unwrap();
            let hashes = batch
                .column(1)
                .as_any()
                .downcast_ref::<arrow_array::UInt64Array>()
                .unwrap()
                .clone();
            for (i, doc) in token_lists(batch.column(0).as_ref()).into_iter().enumerate() {
                if !in_validation(hashes.value(i), 100) {
                    want.extend(doc);
                    want.push(eot);
                }
            }
        }
    }
    let c = LoaderConfig {
        shuffle: false,
        weights: parse_weights("code=1").unwrap(),
        ..cfg(3)
    };
    let n = want.len().div_ceil(4 * 64) + 1;
    let (batches, _) = take(c, None, n);
    let got: Vec<u32> = batches.iter().flat_map(|b| b.tokens.iter().copied()).collect();
    assert_eq!(
        &got[..want.len()],
        &want[..],
        "one epoch, in order, nothing lost or repeated"
    );
    // The next epoch starts again at the first document.
    assert_eq!(&got[want.len()..want.len() + 10], &want[..10]);
}

#[test]
fn the_validation_split_is_the_held_out_documents_once() {
    let c = LoaderConfig {
        split: Split::Validation,
        ..cfg(2)
    };
    let mut loader = Loader::open(&[shards()], c, None).unwrap();
    let mut delivered: BTreeMap<Domain, u64> = BTreeMap::new();
    let mut batches = 0;
    while let Some(b) = loader.next_batch() {
        let b = b.unwrap();
        batches += 1;
        for (r, d) in b.domains.iter().enumerate() {
            *delivered.entry(*d).or_default() += b.mask[r * 64..(r + 1) * 64].iter().map(|&m| m as u64).sum::<u64>();
        }
    }
    assert!(batches > 0);
    // Expected held-out tokens (+1 EOT per document) per domain, from the shards.
    let dir = shards();
    let m = read_manifest(&dir).unwrap();
    for (d, shards) in &m.domains {
        let mut want = 0u64;
        for s in shards {
            let r = ShardReader::open(&dir.join(&s.file)).unwrap();
            for batch in r.batches(&[columns::N_TOKENS, columns::HASH], None).unwrap() {
                let batch = batch.unwrap();
                let n = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow_array::UInt32Array>()
                    .unwrap();
                let h = batch
                    .column(1)
                    .as_any()
                    .downcast_ref::<arrow_array::UInt64Array>()
                    .unwrap();
                want += (0..n.len())
                    .filter(|&i| in_validation(h.value(i), 100))
                    .map(|i| n.value(i) as u64 + 1)
                    .sum::<u64>();
            }
        }
        assert!(want > 0, "{d} has held-out documents");
        assert_eq!(delivered.get(d).copied().unwrap_or(0), want, "{d}");
    }
}

#[test]
fn a_missing_or_truncated_shard_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&shards(), dir.path());
    let victim = dir.path().join("text/part-00000-00001.parquet");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let err = Loader::open(&[dir.path().to_path_buf()], cfg(2), None)
        .err()
        .expect("truncated shard refused")
        .to_string();
    assert!(err.contains("part-00000-00001.parquet"), "{err}");
    std::fs::remove_file(&victim).unwrap();
    let err = Loader::open(&[dir.path().to_path_buf()], cfg(2), None)
        .err()
        .expect("missing shard refused")
        .to_string();
    assert!(err.contains("part-00000-00001.parquet"), "{err}");
}

#[test]
fn a_different_tokenizer_is_refused() {
    let c = LoaderConfig {
        tokenizer_sha256: Some("0".repeat(64)),
        ..cfg(1)
    };
    let err = Loader::open(&[shards()], c, None)
        .err()
        .expect("mismatch refused")
        .to_string();
    assert!(err.contains("tokenizer"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn shards_written_by_other_tools_feed_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    std::fs::create_dir_all(&out).unwrap();
    copy_dir(&shards(), &out);
    let m = read_manifest(&out).unwrap();
    rewrite_foreign(
        &out,
        &m.domains[&Domain::Text][0].file,
        Some("text/part-00000-99999.parquet"),
    );
    let cfg = LoaderConfig {
        seq_len: 64,
        batch_size: 4,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::open(&[out], cfg, None).unwrap();
    for _ in 0..20 {
        loader.next_batch().unwrap().unwrap();
    }
}

fn stream_cfg(weights: &str) -> LoaderConfig {
    LoaderConfig {
        streams: true,
        weights: parse_weights(weights).unwrap(),
        ..cfg(2)
    }
}

/// Each row's tokens across batches, the overlapping first token of every later row dropped.
fn row_streams(batches: &[Batch], rows: usize) -> Vec<Vec<u32>> {
    let len = 64;
    (0..rows)
        .map(|r| {
            let mut out = Vec::new();
            for (i, b) in batches.iter().enumerate() {
                let row = &b.tokens[r * len..(r + 1) * len];
                out.extend_from_slice(if i == 0 { row } else { &row[1..] });
            }
            out
        })
        .collect()
}

#[test]
fn row_streams_continue_each_row_from_batch_to_batch_and_resume_exactly() {
    let (straight, _) = take(stream_cfg("text=1,code=1"), None, 40);
    for pair in straight.windows(2) {
        for r in 0..4 {
            assert_eq!(pair[0].tokens[r * 64 + 63], pair[1].tokens[r * 64], "row {r} continues");
        }
    }
    let (a, c1) = take(stream_cfg("text=1,code=1"), None, 13);
    let c1: Cursor = serde_json::from_str(&serde_json::to_string(&c1).unwrap()).unwrap();
    assert_eq!(c1.lanes.len(), 4);
    let (b, _) = take(
        LoaderConfig {
            workers: 3,
            ..stream_cfg("text=1,code=1")
        },
        Some(c1.clone()),
        27,
    );
    let resumed: Vec<Batch> = a.into_iter().chain(b).collect();
    assert_eq!(tokens_of(&straight), tokens_of(&resumed));
    // Another batch size cannot continue these streams.
    let other = LoaderConfig {
        batch_size: 2,
        ..stream_cfg("text=1,code=1")
    };
    let err = Loader::open(&[shards()], other, Some(c1)).err().expect("refused");
    assert!(err.to_string().contains("row streams"), "{err}");
}

#[test]
fn row_streams_read_whole_documents_and_follow_the_weights_in_tokens() {
    let dir = shards();
    let m = read_manifest(&dir).unwrap();
    let eot = m.tokenizer.special_tokens["<|endoftext|>"];
    // Every training document of the fixtures, by its tokens followed by <|endoftext|>.
    let mut docs = std::collections::HashSet::new();
    for shards in m.domains.values() {
        for s in shards {
            let r = ShardReader::open(&dir.join(&s.file)).unwrap();
            for batch in r.batches(&[columns::TOKENS], None).unwrap() {
                for doc in token_lists(batch.unwrap().column(0).as_ref()) {
                    docs.insert(doc);
                }
            }
        }
    }
    let (batches, cursor) = take(stream_cfg("text=0.7,code=0.3"), None, 120);
    for stream in row_streams(&batches, 4) {
        // Whole documents between separators (the first and last may be cut by the window).
        let parts: Vec<&[u32]> = stream.split(|&t| t == eot).collect();
        assert!(parts.len() > 2, "a row sees several documents");
        for doc in &parts[1..parts.len() - 1] {
            assert!(docs.contains(*doc), "a document read whole, in order");
        }
    }
    let total: u64 = cursor.tokens.values().sum();
    let text = cursor.tokens[&Domain::Text] as f64 / total as f64;
    assert!(
        (text - 0.7).abs() < 0.05,
        "text is {text:.3} of the tokens for weight 0.7"
    );
    assert_eq!(total, 4 * 64 + 119 * 4 * 63, "every delivered token counted once");
}

#[test]
fn ranks_share_the_global_batch_row_for_row_and_resume_together() {
    let global = LoaderConfig {
        batch_size: 8,
        ..cfg(2)
    };
    let (whole, _) = take(global.clone(), None, 30);
    let per_rank = |rank, cursor| {
        take(
            LoaderConfig {
                ranks: Some((rank, 4)),
                batch_size: 2,
                ..cfg(2)
            },
            cursor,
            30,
        )
    };
    let ranks: Vec<(Vec<Batch>, Cursor)> = (0..4).map(|r| per_rank(r, None)).collect();
    for (i, w) in whole.iter().enumerate() {
        let joined: Vec<u32> = ranks.iter().flat_map(|(b, _)| b[i].tokens.clone()).collect();
        assert_eq!(joined, w.tokens, "batch {i}: the ranks' rows are the global batch's");
    }
    // One cursor for all ranks, and the same stream after a resume on another world size.
    assert!(ranks.iter().all(|(_, c)| *c == ranks[0].1));
    let (after, _) = take(
        LoaderConfig {
            ranks: Some((1, 2)),
            batch_size: 4,
            ..cfg(2)
        },
        Some(ranks[0].1.clone()),
        5,
    );
    let (straight, _) = take(global, None, 35);
    for (i, b) in after.iter().enumerate() {
        assert_eq!(
            b.tokens,
            straight[30 + i].tokens[4 * 64..8 * 64],
            "rank 1 of 2 after resuming"
        );
    }
    assert!(Loader::open(
        &[shards()],
        LoaderConfig {
            ranks: Some((2, 2)),
            ..cfg(1)
        },
        None
    )
    .is_err());
}
