//! The content classifier against real code and prose the project did not write
//! (fixtures/classifier_eval.jsonl.zst, built by scripts/build_classifier_eval.py).

use std::collections::BTreeMap;

use mmrec_pipeline::classify::classify;
use mmrec_schemas::Domain;

#[test]
fn code_vs_prose_accuracy_is_at_least_98_percent_on_documents_of_300_chars() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/classifier_eval.jsonl.zst");
    let raw = zstd::decode_all(std::fs::File::open(path).expect("eval set present")).expect("valid zstd");
    let mut per_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut langs = std::collections::BTreeSet::new();
    let (mut right, mut total) = (0usize, 0usize);
    for line in raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let rec: serde_json::Value = serde_json::from_slice(line).expect("eval records are JSON");
        let text = rec["text"].as_str().expect("text");
        if text.chars().count() < 300 {
            continue;
        }
        let label: Domain = rec["label"]
            .as_str()
            .expect("label")
            .parse()
            .expect("label is a domain");
        if label == Domain::Code {
            langs.insert(rec["lang"].as_str().unwrap_or("").to_string());
        }
        let got = classify(text);
        let e = per_source
            .entry(rec["source"].as_str().unwrap_or("?").to_string())
            .or_default();
        e.1 += 1;
        total += 1;
        if got == label {
            e.0 += 1;
            right += 1;
        } else {
            eprintln!(
                "miss: {} {} labelled {label} classified {got}",
                rec["source"], rec["origin"]
            );
        }
    }
    for (source, (r, n)) in &per_source {
        eprintln!("{r:>4}/{n:<4} {source}");
    }
    let accuracy = right as f64 / total as f64;
    eprintln!("accuracy {right}/{total} = {:.2}%", accuracy * 100.0);
    assert!(
        total >= 500 && per_source.len() >= 10 && langs.len() >= 6,
        "the evaluation set must stay large and varied"
    );
    assert!(
        accuracy >= 0.98,
        "code-vs-prose accuracy {:.2}% is under 98%",
        accuracy * 100.0
    );
}
