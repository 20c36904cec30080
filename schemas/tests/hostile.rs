//! Hostile input for the run config (TOML), `state.json` and model-file metadata parsers. Random and mutated text must give an error, never a panic.

use std::path::Path;

use mmrec_schemas::checkpoint::saved_config;
use mmrec_schemas::run_config::TrainConfig;
use proptest::prelude::*;

fn mutated(valid: &[u8], pos: usize, byte: u8, cut: usize) -> Vec<u8> {
    let mut b = valid.to_vec();
    let p = pos % b.len();
    b[p] = byte;
    b.truncate(b.len() - cut % b.len());
    b
}

const CONFIG: &str = r#"[model]
preset = "small"
dropout = 0.1
[data]
dirs = ["shards"]
weights = "text=0.4,code=0.4,mixed=0.2"
seq_len = 256
[optim]
lr = 3e-3
grad_clip = 1.0
[run]
steps = 100
precision = "bf16"
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, rng_seed: proptest::test_runner::RngSeed::Fixed(12), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_configs_and_overrides_are_errors_not_panics(pos in 0usize..400, byte in any::<u8>(), cut in 0usize..400, set in "[a-z._=\"0-9 -]{0,30}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, mutated(CONFIG.as_bytes(), pos, byte, cut)).unwrap();
        let _ = TrainConfig::load(Some(&path), std::slice::from_ref(&set));
        let _ = TrainConfig::load(None, &[set]);
    }

    #[test]
    fn mutated_state_files_are_errors_not_panics(pos in 0usize..4000, byte in any::<u8>(), cut in 0usize..4000) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints/step-00000001");
        std::fs::create_dir_all(&root).unwrap();
        let state = serde_json::json!({"schema_version": 1, "tool_version": "t", "mode": "pretrain", "step": 1, "tokens_seen": 64, "adam_t": 1,
            "schedule": {"plateau_mult": 1.0, "best_val": null, "bad_evals": 0, "evals_since_best": 0, "nan_mult": 1.0},
            "cursor": null, "config": TrainConfig::default(), "model_meta_role": "base", "recent": [], "best_checkpoint": null, "micro_splits": 1});
        std::fs::write(root.join("state.json"), mutated(state.to_string().as_bytes(), pos, byte, cut)).unwrap();
        std::fs::write(dir.path().join("checkpoints/latest"), "step-00000001").unwrap();
        let _ = saved_config(dir.path());
    }

    #[test]
    fn model_file_metadata_is_an_error_not_a_panic(keys in proptest::collection::btree_map("[a-z_]{1,14}", "[ -~]{0,40}", 0..8)) {
        let mut map: std::collections::BTreeMap<String, String> = keys;
        map.insert("format".into(), "mmrec".into());
        let _ = mmrec_schemas::ModelMeta::from_map(Path::new("fuzz.safetensors"), &map);
        map.insert("schema_version".into(), "1".into());
        map.insert("role".into(), "base".into());
        map.insert("frozen".into(), "[]".into());
        let _ = mmrec_schemas::ModelMeta::from_map(Path::new("fuzz.safetensors"), &map);
    }
}
