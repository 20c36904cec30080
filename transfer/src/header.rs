//! Strict safetensors header parsing: everything is checked against the file before any
//! tensor byte is touched or any buffer is sized from the header.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Largest header we accept (safetensors itself caps it at 100 MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn size(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range inside the data section (after the header).
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    /// Bytes before the data section: 8 + header length.
    pub data_offset: u64,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parse and validate the header of `path` (reads only the header bytes).
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    use std::io::Read;
    let io = |source| HeaderError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    if file_len < 8 {
        return Err(invalid(
            path,
            format!("{file_len} bytes is too short for the 8-byte header length"),
        ));
    }
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len - 8 {
        return Err(invalid(
            path,
            format!("header length {n} runs past the end of the {file_len}-byte file"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io)?;
    parse_header(path, &buf, file_len)
}

fn invalid(path: &Path, message: String) -> HeaderError {
    HeaderError::Invalid {
        path: path.to_path_buf(),
        message,
    }
}

/// Validate header JSON `buf` of a file of `file_len` bytes. Never panics on any input.
pub fn parse_header(path: &Path, buf: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let data_offset = 8 + buf.len() as u64;
    let data_len = file_len
        .checked_sub(data_offset)
        .ok_or_else(|| invalid(path, "header longer than the file".into()))?;
    let text = std::str::from_utf8(buf).map_err(|_| invalid(path, "header is not UTF-8".into()))?;
    let value: Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| invalid(path, format!("header is not JSON: {e}")))?;
    // A JSON object keeps the last of repeated keys; a forged file could hide a tensor that
    // way, and the safetensors crate (which `eval` loads through) refuses them.
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = object_keys(text.trim_end_matches(' '))
        .map_err(|e| invalid(path, format!("header is not JSON: {e}")))?
        .into_iter()
        .find(|k| !seen.insert(k.clone()))
    {
        return Err(invalid(path, format!("tensor `{dup}` appears twice in the header")));
    }
    let obj = value
        .as_object()
        .ok_or_else(|| invalid(path, "header is not a JSON object".into()))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            let m = entry
                .as_object()
                .ok_or_else(|| invalid(path, "__metadata__ is not an object".into()))?;
            for (k, v) in m {
                let v = v
                    .as_str()
                    .ok_or_else(|| invalid(path, format!("__metadata__.{k} is not a string")))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let e = entry
            .as_object()
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: entry is not an object")))?;
        let dtype_s = e
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: no dtype")))?;
        let dtype = Dtype::parse(dtype_s)
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: unknown dtype {dtype_s:?}")))?;
        let shape: Vec<u64> = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: no shape")))?
            .iter()
            .map(|d| {
                d.as_u64().ok_or_else(|| {
                    invalid(
                        path,
                        format!("tensor `{name}`: shape entries must be non-negative integers"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let offsets = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: data_offsets must be [start, end]")))?;
        let (start, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => {
                return Err(invalid(
                    path,
                    format!("tensor `{name}`: data_offsets {offsets:?} are not an increasing pair of integers"),
                ))
            }
        };
        if end > data_len {
            return Err(invalid(path, format!("tensor `{name}`: bytes {start}..{end} lie outside the {data_len}-byte data section (truncated file?)")));
        }
        let elements = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: shape {shape:?} overflows")))?;
        let bytes = elements
            .checked_mul(dtype.size())
            .ok_or_else(|| invalid(path, format!("tensor `{name}`: size overflows")))?;
        if bytes != end - start {
            return Err(invalid(
                path,
                format!(
                    "tensor `{name}`: {dtype_s} {shape:?} needs {bytes} bytes, data_offsets give {}",
                    end - start
                ),
            ));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start,
                end,
            },
        );
    }
    // The data section must be exactly the tensors, back to back (as safetensors requires):
    // no overlap, no gap, nothing after the last one.
    let mut ranges: Vec<(u64, u64, &str)> = tensors.iter().map(|(n, t)| (t.start, t.end, n.as_str())).collect();
    ranges.sort();
    let mut expected = (0u64, "the start of the data section");
    for &(start, end, name) in &ranges {
        if start < expected.0 {
            return Err(invalid(path, format!("tensors `{}` and `{name}` overlap", expected.1)));
        }
        if start > expected.0 {
            return Err(invalid(
                path,
                format!(
                    "{} unclaimed bytes between {} and tensor `{name}`",
                    start - expected.0,
                    expected.1
                ),
            ));
        }
        expected = (end, name);
    }
    if expected.0 != data_len {
        return Err(invalid(
            path,
            format!("{} trailing bytes after the last tensor", data_len - expected.0),
        ));
    }
    Ok(Header {
        path: path.to_path_buf(),
        data_offset,
        tensors,
        metadata,
    })
}

/// The keys of a JSON object in order, repeats included (serde_json's map keeps only the
/// last of each).
fn object_keys(text: &str) -> Result<Vec<String>, serde_json::Error> {
    struct Keys(Vec<String>);
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Keys;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                keys.push(k);
            }
            Ok(Keys(keys))
        }
    }
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_str::<Keys>(text).map(|k| k.0)
}
