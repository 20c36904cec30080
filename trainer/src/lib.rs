//! The MM-Rec model (base, expert, fused) in candle, and its file format.

pub mod bench;
pub mod config;
pub mod device;
pub mod io;
pub mod model;
pub mod optim;
pub mod train;

pub use config::ModelConfig;
pub use model::{initialise, masked_cross_entropy, FusedModel, FusionMethod, MMRecModel, Projection};
