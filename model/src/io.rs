//! Model files as candle tensors: saving through the one safetensors writer of
//! `mmrec-schemas`, loading by memory map after its reader has checked the header.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mmrec_schemas::safetensors::{self, read_meta, Dtype};
use mmrec_schemas::{IoContext, ModelMeta};

use crate::model::{FusedModel, MMRecModel};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] mmrec_schemas::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Write named tensors with metadata; the file appears complete or not at all.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &ModelMeta) -> Result<()> {
    let mut data: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (bytes, dtype) = tensor_bytes(t)?;
        data.push((name.clone(), dtype, t.dims().iter().map(|&d| d as u64).collect(), bytes));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let layout: Vec<(String, Dtype, Vec<u64>)> = data.iter().map(|(n, d, s, _)| (n.clone(), *d, s.clone())).collect();
    let mut w = safetensors::Writer::create(path, &layout, &meta.to_map())?;
    for (_, _, _, bytes) in &data {
        w.write_all(bytes).at(path)?;
    }
    Ok(w.commit(true)?)
}

fn tensor_bytes(t: &Tensor) -> Result<(Vec<u8>, Dtype)> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F32,
        ),
        DType::F64 => (
            t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F64,
        ),
        DType::BF16 => (
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            Dtype::BF16,
        ),
        DType::F16 => (
            t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16,
        ),
        other => return Err(candle_core::Error::Msg(format!("cannot save dtype {other:?}")).into()),
    })
}

/// Every variable of a VarMap with its name.
pub fn varmap_vars(vm: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = vm.data().lock().expect("varmap lock");
    data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

/// Every variable of a VarMap, by name.
pub fn varmap_tensors(vm: &VarMap) -> Vec<(String, Tensor)> {
    let data = vm.data().lock().expect("varmap lock");
    data.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

/// Load a base or expert model read-only, by memory map.
pub fn load_model(path: &Path, dev: &Device) -> Result<(MMRecModel, ModelMeta)> {
    let meta = read_meta(path)?;
    // SAFETY: as in `read_meta`.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, dev)? };
    Ok((MMRecModel::new(&meta.config, vb)?, meta))
}

/// Load a fused model read-only, by memory map.
pub fn load_fused(path: &Path, dev: &Device) -> Result<(FusedModel, ModelMeta)> {
    let meta = read_meta(path)?;
    let method = meta
        .fusion
        .ok_or_else(|| mmrec_schemas::Error::format(path, "a fused file needs `fusion` metadata"))?;
    // SAFETY: as in `read_meta`.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, dev)? };
    Ok((FusedModel::new(&meta.config, method, vb)?, meta))
}
