//! Generation: one token at a time with the carried state gives the logits a full pass
//! over the text so far gives, for a single and a fused model; draws repeat for a seed.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarMap;
use mmrec_model::model::seeded_builder;
use mmrec_model::{initialise, FusedModel, MMRecModel};
use mmrec_schemas::{FusionMethod, ModelConfig};
use mmrec_trainer::generate::{generate, NetState, Sampling};
use mmrec_trainer::train::Net;

/// Chunks of 4 and 8 and a window of 3, so that the 45 positions cross chunk boundaries
/// and drop old summaries while streaming.
fn cfg() -> ModelConfig {
    ModelConfig {
        chunk_sizes: vec![4, 8],
        memory_window: 3,
        ..mmrec_model::preset("tiny", 60).unwrap()
    }
}

fn single() -> Net {
    let vm = VarMap::new();
    let m = MMRecModel::new(&cfg(), seeded_builder(&vm, 4, DType::F32, &Device::Cpu)).unwrap();
    initialise(&vm, &cfg()).unwrap();
    Net::Single(m)
}

fn fused(method: FusionMethod) -> Net {
    let vm = VarMap::new();
    let m = FusedModel::new(&cfg(), method, seeded_builder(&vm, 5, DType::F32, &Device::Cpu)).unwrap();
    initialise(&vm, &cfg()).unwrap();
    Net::Fused(m)
}

/// The largest difference between the logits of a full pass over `tokens` and those of the
/// prompt's pass followed by one step per later token.
fn streaming_gap(net: &Net, tokens: &[u32], prompt: usize) -> f32 {
    let dev = Device::Cpu;
    let all = Tensor::from_slice(tokens, (1, tokens.len()), &dev).unwrap();
    let (full, _) = net.logits_from(&all, None).unwrap();
    let (first, mut state): (Tensor, NetState) = net.logits_from(&all.narrow(1, 0, prompt).unwrap(), None).unwrap();
    let mut steps = vec![first];
    for p in prompt..tokens.len() {
        let (l, s) = net.logits_from(&all.narrow(1, p, 1).unwrap(), Some(&state)).unwrap();
        steps.push(l);
        state = s;
    }
    let streamed = Tensor::cat(&steps, 1).unwrap();
    (full.i(0).unwrap() - streamed.i(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn one_token_at_a_time_matches_the_full_pass() {
    let tokens: Vec<u32> = (0..45u32).map(|i| (i * 37 + 11) % 60).collect();
    for (name, net) in [
        ("single", single()),
        ("fused", fused(FusionMethod::Gated)),
        ("mixture", fused(FusionMethod::Mixture)),
    ] {
        for prompt in [1, 7, 20] {
            let gap = streaming_gap(&net, &tokens, prompt);
            assert!(gap < 1e-4, "{name}, prompt {prompt}: logits differ by {gap}");
        }
    }
}

#[test]
fn generation_repeats_for_a_seed_and_stops_at_the_stop_token() {
    let net = single();
    let prompt = [3u32, 14, 15, 9];
    let sampling = |seed| Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed,
    };
    let run = |s: &Sampling, stop| {
        let mut seen = Vec::new();
        let done = generate(&net, &prompt, 40, s, stop, |t| {
            seen.push(t);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, done.tokens, "every token is handed over as it is drawn");
        done.tokens
    };
    let a = run(&sampling(1), None);
    assert_eq!(a.len(), 40);
    assert_eq!(a, run(&sampling(1), None));
    assert_ne!(a, run(&sampling(2), None));
    // Stopping at the fifth token's value ends the output there.
    let stopped = run(&sampling(1), Some(a[4]));
    let first = a.iter().position(|&t| t == a[4]).unwrap();
    assert_eq!(stopped, a[..=first]);
}

#[test]
fn position_losses_do_not_depend_on_the_segment_length() {
    use mmrec_trainer::context::position_losses;
    let docs: Vec<Vec<u32>> = (0..3u32)
        .map(|k| (0..(30 + 17 * k)).map(|i| (i * 7 + k * 13) % 60).collect())
        .collect();
    let net = single();
    let whole = position_losses(&net, &docs, 1000, 1000, &Device::Cpu).unwrap();
    let pieces = position_losses(&net, &docs, 1000, 5, &Device::Cpu).unwrap();
    assert_eq!(whole.len(), docs.iter().map(|d| d.len() - 1).sum::<usize>());
    assert_eq!(
        whole.iter().map(|p| p.0).collect::<Vec<_>>(),
        pieces.iter().map(|p| p.0).collect::<Vec<_>>()
    );
    let gap = whole
        .iter()
        .zip(&pieces)
        .map(|(a, b)| (a.1 - b.1).abs())
        .fold(0.0, f64::max);
    assert!(gap < 1e-4, "segments change the losses by {gap}");
    // A context limit reads each document's first tokens only.
    let short = position_losses(&net, &docs, 10, 4, &Device::Cpu).unwrap();
    assert_eq!(short.len(), 3 * 10);
    assert!(short.iter().all(|p| p.0 < 10));
}
