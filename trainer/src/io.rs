//! Model files: safetensors with the `__metadata__` of DESIGN.md §2, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::model::{FusedModel, FusionMethod, MMRecModel};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Base,
    Expert,
    Fused,
}

/// The `__metadata__` of every model file the toolkit writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMeta {
    pub role: Role,
    pub domain: Option<String>,
    pub config: ModelConfig,
    /// Name patterns the trainer must not update.
    pub frozen: Vec<String>,
    pub lineage: serde_json::Value,
    /// For fused files: how the experts are combined.
    pub fusion: Option<FusionMethod>,
    /// sha256 of the tokenizer the model was trained with (from the shards' manifest), so
    /// data made with another tokenizer is refused; None in files from before it was kept.
    pub tokenizer: Option<String>,
}

impl ModelMeta {
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), "mmrec".into());
        m.insert("schema_version".into(), mmrec_schemas::SCHEMA_VERSION.to_string());
        m.insert(
            "role".into(),
            serde_json::to_value(self.role)
                .expect("role")
                .as_str()
                .expect("string")
                .into(),
        );
        if let Some(d) = &self.domain {
            m.insert("domain".into(), d.clone());
        }
        m.insert(
            "config".into(),
            serde_json::to_string(&self.config).expect("config serialises"),
        );
        m.insert(
            "frozen".into(),
            serde_json::to_string(&self.frozen).expect("list serialises"),
        );
        m.insert("lineage".into(), self.lineage.to_string());
        if let Some(f) = self.fusion {
            m.insert(
                "fusion".into(),
                serde_json::to_value(f)
                    .expect("fusion")
                    .as_str()
                    .expect("string")
                    .into(),
            );
        }
        if let Some(t) = &self.tokenizer {
            m.insert("tokenizer".into(), t.clone());
        }
        m
    }

    pub fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Self> {
        let err = |message: String| Error::Format {
            path: path.to_path_buf(),
            message,
        };
        let get = |k: &str| {
            m.get(k).ok_or_else(|| {
                err(format!(
                    "metadata has no `{k}`: not a file written by the MM-Rec toolkit"
                ))
            })
        };
        if get("format")? != "mmrec" {
            return Err(err("metadata `format` is not \"mmrec\"".into()));
        }
        let version: u32 = get("schema_version")?
            .parse()
            .map_err(|_| err("bad schema_version".into()))?;
        if version > mmrec_schemas::SCHEMA_VERSION {
            return Err(err(format!(
                "schema_version {version} is newer than this tool's {}",
                mmrec_schemas::SCHEMA_VERSION
            )));
        }
        let json = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(get(k)?).map_err(|e| err(format!("metadata `{k}` is not valid JSON: {e}")))
        };
        let config: crate::ModelConfig =
            serde_json::from_value(json("config")?).map_err(|e| err(format!("metadata `config`: {e}")))?;
        config.validate().map_err(|e| err(format!("metadata `config`: {e}")))?;
        Ok(ModelMeta {
            role: serde_json::from_value(serde_json::Value::String(get("role")?.clone()))
                .map_err(|e| err(format!("metadata `role`: {e}")))?,
            domain: m.get("domain").cloned(),
            config,
            frozen: serde_json::from_value(json("frozen")?).map_err(|e| err(format!("metadata `frozen`: {e}")))?,
            lineage: m
                .get("lineage")
                .map(|l| serde_json::from_str(l))
                .transpose()
                .map_err(|e| err(format!("metadata `lineage`: {e}")))?
                .unwrap_or(serde_json::Value::Null),
            fusion: m
                .get("fusion")
                .map(|f| serde_json::from_value(serde_json::Value::String(f.clone())))
                .transpose()
                .map_err(|e| err(format!("metadata `fusion`: {e}")))?,
            tokenizer: m.get("tokenizer").cloned(),
        })
    }
}

/// Write named tensors with metadata; the file appears complete or not at all.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &ModelMeta) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut data: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (bytes, dtype) = tensor_bytes(t)?;
        data.push((name.clone(), bytes, t.dims().to_vec(), dtype));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s, d)| safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let bytes = safetensors::tensor::serialize(views, Some(meta.to_map())).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let (header, data_start) = sorted_header(&bytes).map_err(|message| Error::Format {
        path: path.to_path_buf(),
        message,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    // The new header, then the tensor bytes as serialised: no second copy of the data.
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&header)?;
        f.write_all(&bytes[data_start..])?;
        f.sync_all()
    };
    write().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A safetensors header (length prefix included) equal to the one in `bytes` but with
/// `__metadata__`'s keys in sorted order, and where `bytes`' data section starts:
/// safetensors writes the metadata in a HashMap's order, which changes from run to run, and
/// identical runs should give identical files.
fn sorted_header(bytes: &[u8]) -> std::result::Result<(Vec<u8>, usize), String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| "no header length".to_string())?) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    if let Some(serde_json::Value::Object(meta)) = header.remove("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> = meta.into_iter().collect();
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(sorted).map_err(|e| e.to_string())?,
        );
    }
    let mut text = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The data section stays 8-byte aligned, as safetensors pads it.
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    Ok((out, 8 + n))
}

fn tensor_bytes(t: &Tensor) -> Result<(Vec<u8>, safetensors::Dtype)> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            safetensors::Dtype::F32,
        ),
        DType::F64 => (
            t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            safetensors::Dtype::F64,
        ),
        DType::BF16 => (
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            safetensors::Dtype::BF16,
        ),
        DType::F16 => (
            t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            safetensors::Dtype::F16,
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

/// Read only the header's metadata (fast on large files).
pub fn read_meta(path: &Path) -> Result<ModelMeta> {
    let f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the file is opened read-only; a concurrent writer would be replacing it by
    // rename, never writing into it, so the mapping stays valid.
    let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: format!("not a safetensors file: {e}"),
    })?;
    let m = header.metadata().clone().ok_or_else(|| Error::Format {
        path: path.to_path_buf(),
        message: "no __metadata__".into(),
    })?;
    ModelMeta::from_map(path, &m)
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
    let method = meta.fusion.ok_or_else(|| Error::Format {
        path: path.to_path_buf(),
        message: "a fused file needs `fusion` metadata".into(),
    })?;
    // SAFETY: as in `read_meta`.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, dev)? };
    Ok((FusedModel::new(&meta.config, method, vb)?, meta))
}
