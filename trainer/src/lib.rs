//! `mmrec-train`: the optimiser, learning-rate schedules, the training loop (pretrain,
//! finetune, fusion), evaluation, text generation and exact-resume checkpoints (DESIGN §5). The model lives
//! in `mmrec-model`, batches come from `mmrec-loader`, and every file format from
//! `mmrec-schemas`.

pub mod batch;
pub mod context;
pub mod dist;
pub mod generate;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod plot;
pub mod segments;
pub mod suite;
pub mod train;

/// The candle dtype a run's precision computes in; weights and optimiser state are f32
/// either way.
pub fn dtype(precision: train::Precision) -> candle_core::DType {
    match precision {
        train::Precision::F32 => candle_core::DType::F32,
        train::Precision::Bf16 => candle_core::DType::BF16,
    }
}
