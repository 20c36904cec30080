//! The model against DESIGN.md §1–§2: projection paths, causality, streaming, gradients,
//! fusion and the file format.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mmrec_model::io::{load_fused, load_model, save, varmap_tensors};
use mmrec_model::model::recorded_tensor_names;
use mmrec_model::stream::DocBounds;
use mmrec_model::{initialise, masked_cross_entropy, preset, FusedModel, MMRecModel, Projection, PRESETS};
use mmrec_schemas::model_file::tensor_names;
use mmrec_schemas::safetensors::read_meta;
use mmrec_schemas::{FusionMethod, ModelConfig, ModelMeta, Role};

/// A small config whose chunk levels and memory window all engage within ~100 tokens.
fn small_cfg(vocab: usize, d: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers: 2,
        n_heads: 2,
        n_slots: 3,
        chunk_sizes: vec![4, 16],
        memory_window: 3,
        dropout: 0.0,
        uboo_weight: 0.0,
    }
}

fn build(cfg: &ModelConfig, dtype: DType) -> (VarMap, MMRecModel) {
    let vm = VarMap::new();
    let model = MMRecModel::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    initialise(&vm, cfg).unwrap();
    (vm, model)
}

fn tokens(b: usize, t: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..b * t)
        .map(|i| {
            ((i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                >> 7)
                % vocab as u32
        })
        .collect()
}

fn logits(model: &MMRecModel, toks: &[u32], b: usize) -> Tensor {
    let t = Tensor::from_slice(toks, (b, toks.len() / b), &Device::Cpu).unwrap();
    model.forward(&t, None, false).unwrap().0
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn unfused_projection_gives_the_same_logits_as_the_fused_one() {
    let cfg = preset("tiny", 300).unwrap();
    let (_, model) = build(&cfg, DType::F32);
    let t = Tensor::from_vec(tokens(2, 300, 300, 1), (2, 300), &Device::Cpu).unwrap();
    let fused = model.forward_with(&t, None, false, Projection::Fused, None).unwrap().0;
    let unfused = model
        .forward_with(&t, None, false, Projection::Unfused, None)
        .unwrap()
        .0;
    let scale = fused
        .abs()
        .unwrap()
        .max_keepdim(2)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        max_abs_diff(&fused, &unfused) <= 1e-5 * scale,
        "{}",
        max_abs_diff(&fused, &unfused)
    );
}

#[test]
fn changing_token_t_never_changes_outputs_before_t() {
    let cfg = small_cfg(50, 16);
    let (_, model) = build(&cfg, DType::F64);
    let (t_len, at) = (90, 53);
    let a = tokens(1, t_len, 50, 2);
    let mut b = a.clone();
    b[at] = (b[at] + 7) % 50;
    let (la, lb) = (logits(&model, &a, 1), logits(&model, &b, 1));
    assert_eq!(
        max_abs_diff(&la.i((.., ..at, ..)).unwrap(), &lb.i((.., ..at, ..)).unwrap()),
        0.0,
        "an earlier position saw token {at}"
    );
    assert!(
        max_abs_diff(&la.i((.., at.., ..)).unwrap(), &lb.i((.., at.., ..)).unwrap()) > 1e-6,
        "the change must be visible from t on"
    );
    // Far positions see it through the chunk summaries too (chunk of `at` ends at 55).
    assert!(max_abs_diff(&la.i((.., 70.., ..)).unwrap(), &lb.i((.., 70.., ..)).unwrap()) > 1e-9);
}

#[test]
fn a_sequence_cut_anywhere_gives_the_same_logits_as_one_pass() {
    let cfg = small_cfg(50, 16);
    let (_, model) = build(&cfg, DType::F64);
    let (b, t) = (2, 150);
    let toks = tokens(b, t, 50, 3);
    let all = Tensor::from_vec(toks, (b, t), &Device::Cpu).unwrap();
    let (whole, _, _) = model.forward(&all, None, false).unwrap();
    // Cuts inside chunks of both levels, past the memory window, and single-token steps.
    for cuts in [vec![37], vec![16, 64], vec![5, 6, 7, 70, 101, 149]] {
        let mut state = None;
        let mut parts = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&t)) {
            let (l, s, _) = model
                .forward(&all.i((.., from..to)).unwrap(), state.as_deref(), false)
                .unwrap();
            parts.push(l);
            state = Some(s);
            from = to;
        }
        let streamed = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&whole, &streamed);
        assert!(diff < 1e-10, "cuts {cuts:?}: max difference {diff:e}");
    }
}

/// With UBÖO on, the stop-gradient on h_{t+1} makes the analytic gradient of shared
/// parameters differ from finite differences by design, so the main path is checked with
/// it off and UBÖO's own parameters with it on.
#[test]
fn whole_model_gradients_match_finite_differences() {
    let main = [
        "embed.weight",
        "blocks.0.in_proj.weight",
        "blocks.0.mdi.z.fc2.bias",
        "blocks.0.mdi.k.fc1.weight",
        "blocks.1.memory.slots",
        "blocks.1.memory.kv.weight",
        "blocks.0.out_proj.bias",
        "blocks.1.ffn.down.weight",
        "blocks.0.norm1.weight",
        "norm.weight",
    ];
    assert_eq!(check_model_gradients(0.0, &main), 30);
    assert_eq!(
        check_model_gradients(0.1, &["blocks.1.uboo.fc1.weight", "blocks.0.uboo.fc2.bias"]),
        6
    );
}

#[test]
fn fused_model_gradients_match_finite_differences() {
    let cfg = small_cfg(11, 8);
    let (inp, tgt, mask) = fd_batch(&cfg);
    for method in [FusionMethod::Concat, FusionMethod::Gated, FusionMethod::Mixture] {
        let vm = VarMap::new();
        let fused = FusedModel::new(&cfg, method, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
        initialise(&vm, &cfg).unwrap();
        let router = match method {
            FusionMethod::Concat => ["fusion.proj.weight", "fusion.proj.bias"],
            _ => ["fusion.router.weight", "fusion.router.bias"],
        };
        let names = [
            router[0],
            router[1],
            "experts.text.blocks.0.in_proj.weight",
            "experts.code.norm.weight",
            "embed.weight",
        ];
        let loss = || {
            let (l, _) = fused.forward(&inp, false).unwrap();
            masked_cross_entropy(&l, &tgt, &mask).unwrap()
        };
        assert_eq!(check_gradients(&vm, loss, &names), 15, "{method:?}");
    }
}

/// Inputs, targets and mask of the finite-difference checks: 2 rows of 21 tokens.
fn fd_batch(cfg: &ModelConfig) -> (Tensor, Tensor, Tensor) {
    let (b, t) = (2, 21);
    let toks = tokens(b, t + 1, cfg.vocab_size, 4);
    let all = Tensor::from_vec(toks, (b, t + 1), &Device::Cpu).unwrap();
    let (inp, tgt) = (all.i((.., ..t)).unwrap(), all.i((.., 1..)).unwrap());
    (inp, tgt, Tensor::ones((b, t), DType::F64, &Device::Cpu).unwrap())
}

fn check_model_gradients(uboo_weight: f64, names: &[&str]) -> usize {
    let mut cfg = small_cfg(11, 8);
    cfg.uboo_weight = uboo_weight;
    let (vm, model) = build(&cfg, DType::F64);
    let (inp, tgt, mask) = fd_batch(&cfg);
    let loss = || {
        let (l, _, aux) = model.forward(&inp, None, false).unwrap();
        (masked_cross_entropy(&l, &tgt, &mask).unwrap() + aux).unwrap()
    };
    check_gradients(&vm, loss, names)
}

/// Autograd's gradient of `loss` against central differences at three elements of each
/// named variable (f64); the number of elements checked.
fn check_gradients(vm: &VarMap, loss: impl Fn() -> Tensor, names: &[&str]) -> usize {
    let grads = loss().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut checked = 0;
    for &name in names {
        let var: &Var = data.get(name).unwrap_or_else(|| panic!("no variable {name}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, orig.len() / 2, orig.len() - 1] {
            let eps = 1e-5;
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (g[idx] - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{name}[{idx}]: analytic {} numeric {numeric}",
                g[idx]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn decay_starts_spread_over_time_scales() {
    let cfg = preset("tiny", 100).unwrap();
    let (vm, _) = build(&cfg, DType::F32);
    let data = vm.data().lock().unwrap();
    let z = candle_nn::ops::sigmoid(data["blocks.0.mdi.z.fc2.bias"].as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let k = candle_nn::ops::sigmoid(data["blocks.0.mdi.k.fc2.bias"].as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let gamma: Vec<f32> = z.iter().zip(&k).map(|(a, b)| a * b).collect();
    assert!(
        (gamma[0] - 0.9 * k[0]).abs() < 1e-4 && gamma[63] > 0.995,
        "{:?}",
        (gamma[0], gamma[63])
    );
    assert!(k.iter().all(|&x| x > 0.997), "σ(6) ≈ 0.9975");
}

#[test]
fn saved_models_load_by_memory_map_with_metadata_and_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preset("tiny", 120).unwrap();
    let (vm, model) = build(&cfg, DType::F32);
    let meta = ModelMeta {
        role: Role::Base,
        domain: None,
        config: cfg.clone(),
        frozen: vec![],
        lineage: serde_json::json!({"tool": "test"}),
        fusion: None,
        tokenizer: None,
    };
    let path = dir.path().join("base.safetensors");
    save(&path, &varmap_tensors(&vm), &meta).unwrap();
    assert_eq!(read_meta(&path).unwrap(), meta);
    let (loaded, _) = load_model(&path, &Device::Cpu).unwrap();
    let toks = tokens(2, 40, 120, 5);
    assert_eq!(max_abs_diff(&logits(&model, &toks, 2), &logits(&loaded, &toks, 2)), 0.0);
    // DESIGN §2 names, produced by the module structure.
    let names: Vec<String> = varmap_tensors(&vm).into_iter().map(|(n, _)| n).collect();
    for n in [
        "embed.weight",
        "blocks.1.in_proj.weight",
        "blocks.0.mdi.z.fc1.bias",
        "blocks.0.memory.slots",
        "blocks.0.memory.kv.weight",
        "blocks.0.memory.out.bias",
        "blocks.0.ffn.up.weight",
        "norm.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
}

#[test]
fn fused_models_of_identical_experts_reproduce_the_expert() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preset("tiny", 90).unwrap();
    let (vm, expert) = build(&cfg, DType::F32);
    let toks = tokens(1, 50, 90, 6);
    let want = logits(&expert, &toks, 1);
    for method in [FusionMethod::Concat, FusionMethod::Gated, FusionMethod::Mixture] {
        // Fused file: both experts are copies of one model.
        let fvm = VarMap::new();
        FusedModel::new(&cfg, method, VarBuilder::from_varmap(&fvm, DType::F32, &Device::Cpu)).unwrap();
        initialise(&fvm, &cfg).unwrap();
        let mut tensors: Vec<(String, Tensor)> = varmap_tensors(&fvm)
            .into_iter()
            .filter(|(n, _)| n.starts_with("fusion."))
            .collect();
        for (n, t) in varmap_tensors(&vm) {
            if n == "embed.weight" {
                tensors.push((n, t));
            } else {
                tensors.push((format!("experts.text.{n}"), t.clone()));
                tensors.push((format!("experts.code.{n}"), t));
            }
        }
        let path = dir.path().join("fused.safetensors");
        let meta = ModelMeta {
            role: Role::Fused,
            domain: None,
            config: cfg.clone(),
            frozen: vec!["embed.*".into(), "experts.*".into()],
            lineage: serde_json::Value::Null,
            fusion: Some(method),
            tokenizer: None,
        };
        save(&path, &tensors, &meta).unwrap();
        let (fused, _) = load_fused(&path, &Device::Cpu).unwrap();
        let got = fused
            .forward(&Tensor::from_slice(&toks, (1, 50), &Device::Cpu).unwrap(), false)
            .unwrap()
            .0;
        // As distributions: `mixture` returns log-probabilities, the others logits.
        let [want, got] = [&want, &got].map(|l| candle_nn::ops::log_softmax(l, 2).unwrap());
        assert!(
            max_abs_diff(&want, &got) < 1e-4,
            "{method:?}: {}",
            max_abs_diff(&want, &got)
        );
    }
}

#[test]
fn saving_the_same_model_twice_gives_identical_files() {
    let cfg = small_cfg(50, 16);
    let (vm, _) = build(&cfg, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let meta = ModelMeta {
        role: Role::Expert,
        domain: Some("code".into()),
        config: cfg,
        frozen: vec!["embed.*".into()],
        lineage: serde_json::json!({"a": 1, "b": [2, 3]}),
        fusion: None,
        tokenizer: None,
    };
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("m{i}.safetensors"));
            save(&p, &varmap_tensors(&vm), &meta).unwrap();
            std::fs::read(&p).unwrap()
        })
        .collect();
    assert!(
        files.windows(2).all(|w| w[0] == w[1]),
        "metadata order must not vary between saves"
    );
    assert_eq!(
        read_meta(&dir.path().join("m0.safetensors")).unwrap().domain.as_deref(),
        Some("code")
    );
}

#[test]
fn the_model_asks_for_exactly_the_tensors_the_file_contract_lists() {
    for name in PRESETS {
        for uboo_weight in [0.0, 0.1] {
            let cfg = ModelConfig {
                uboo_weight,
                ..preset(name, 300).unwrap()
            };
            for fused in [
                None,
                Some(FusionMethod::Concat),
                Some(FusionMethod::Gated),
                Some(FusionMethod::Mixture),
            ] {
                assert_eq!(
                    recorded_tensor_names(&cfg, fused).unwrap(),
                    tensor_names(&cfg, fused),
                    "{name} uboo {uboo_weight} {fused:?}"
                );
            }
        }
    }
}

/// Tokens 1.. of `vocab` (0 is the separator in the stream tests).
fn doc(len: usize, seed: u32, vocab: usize) -> Vec<u32> {
    tokens(1, len, vocab - 1, seed).into_iter().map(|t| t + 1).collect()
}

fn bounds_logits(model: &MMRecModel, toks: &[u32], b: usize, docs: Option<&DocBounds>) -> Tensor {
    let t = Tensor::from_slice(toks, (b, toks.len() / b), &Device::Cpu).unwrap();
    model.forward_with(&t, None, false, Projection::Fused, docs).unwrap().0
}

#[test]
fn a_document_start_forgets_what_came_before() {
    let cfg = small_cfg(50, 16);
    let (_, model) = build(&cfg, DType::F64);
    // Row 0: a 32-token document, then <|endoftext|> at position 32 (a multiple of both
    // chunk sizes) and a second one; row 1: one document throughout.
    let second: Vec<u32> = std::iter::once(0).chain(doc(40, 2, 50)).collect();
    let row0: Vec<u32> = doc(32, 1, 50).into_iter().chain(second.iter().copied()).collect();
    let row1 = doc(73, 3, 50);
    let toks: Vec<u32> = row0.iter().chain(&row1).copied().collect();
    let docs = DocBounds::new(&toks, 73, 0, 0, &mut [0, 0], &Device::Cpu).unwrap();
    let streamed = bounds_logits(&model, &toks, 2, Some(&docs));
    let alone = bounds_logits(&model, &second, 1, None);
    let diff = max_abs_diff(&streamed.i((0..1, 32..)).unwrap(), &alone);
    assert!(
        diff < 1e-10,
        "the second document differs from itself alone by {diff:e}"
    );
    // A row with no separator is untouched by the bounds.
    let plain = bounds_logits(&model, &toks, 2, None);
    assert!(max_abs_diff(&streamed.i(1).unwrap(), &plain.i(1).unwrap()) < 1e-12);
    // Without the bounds the first document leaks into the second (the test can fail).
    assert!(max_abs_diff(&plain.i((0..1, 32..)).unwrap(), &alone) > 1e-3);
}

#[test]
fn streams_of_documents_cut_anywhere_match_one_pass() {
    let cfg = small_cfg(50, 16);
    let (_, model) = build(&cfg, DType::F64);
    let (b, t) = (2, 120);
    let mut toks = tokens(b, t, 50, 9);
    for &at in &[7, 41, 42, 90, 120 + 3, 120 + 64] {
        toks[at] = 0;
    }
    let all = Tensor::from_slice(&toks, (b, t), &Device::Cpu).unwrap();
    let whole_docs = DocBounds::new(&toks, t, 0, 0, &mut [0, 0], &Device::Cpu).unwrap();
    let whole = model
        .forward_with(&all, None, false, Projection::Fused, Some(&whole_docs))
        .unwrap()
        .0;
    for cuts in [vec![41], vec![16, 42, 43, 100]] {
        let (mut state, mut starts, mut parts, mut from) = (None, vec![0, 0], Vec::new(), 0);
        for &to in cuts.iter().chain(std::iter::once(&t)) {
            let part: Vec<u32> = (0..b).flat_map(|r| toks[r * t + from..r * t + to].to_vec()).collect();
            let docs = DocBounds::new(&part, to - from, from, 0, &mut starts, &Device::Cpu).unwrap();
            let input = Tensor::from_slice(&part, (b, to - from), &Device::Cpu).unwrap();
            let (l, s, _) = model
                .forward_with(&input, state.as_deref(), false, Projection::Fused, Some(&docs))
                .unwrap();
            parts.push(l);
            state = Some(mmrec_model::stream::detach(&s).unwrap());
            from = to;
        }
        let diff = max_abs_diff(&whole, &Tensor::cat(&parts, 1).unwrap());
        assert!(diff < 1e-10, "cuts {cuts:?}: max difference {diff:e}");
    }
}

#[test]
fn carried_states_survive_a_round_trip_through_tensors_and_rows() {
    let cfg = small_cfg(50, 16);
    let (_, model) = build(&cfg, DType::F32);
    let all = Tensor::from_vec(tokens(3, 37, 50, 4), (3, 37), &Device::Cpu).unwrap();
    let (_, states, _) = model.forward(&all, None, false).unwrap();
    let named = mmrec_model::stream::to_tensors(&states).unwrap();
    let positions = mmrec_model::stream::positions(&states);
    let map: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
    let fresh = model.initial_state(3, &Device::Cpu).unwrap();
    let back = mmrec_model::stream::from_tensors(&fresh, &|n| Ok(map[n].clone()), &positions).unwrap();
    // States of 3 rows do not load into a batch of 2.
    let two = model.initial_state(2, &Device::Cpu).unwrap();
    let err = mmrec_model::stream::from_tensors(&two, &|n| Ok(map[n].clone()), &positions).unwrap_err();
    assert!(err.to_string().contains("the model and batch need"), "{err}");
    let split = [
        mmrec_model::stream::rows(&back, 0, 1).unwrap(),
        mmrec_model::stream::rows(&back, 1, 2).unwrap(),
    ];
    let joined = mmrec_model::stream::join_rows(&split).unwrap();
    let next = Tensor::from_vec(tokens(3, 11, 50, 5), (3, 11), &Device::Cpu).unwrap();
    let a = model.forward(&next, Some(&states), false).unwrap().0;
    let b = model.forward(&next, Some(&joined), false).unwrap().0;
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}
