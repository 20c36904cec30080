//! The MM-Rec model in candle (DESIGN §1–§2): blocks, the language model, the fused model,
//! their presets and tensor names, and model files as candle tensors. The file formats
//! themselves (metadata, safetensors layout) belong to `mmrec-schemas`.

pub mod config;
pub mod device;
pub mod host;
pub mod io;
pub mod model;
pub mod stream;

pub use config::{preset, PRESETS};
pub use model::{initialise, masked_cross_entropy, FusedModel, MMRecModel, Projection};
