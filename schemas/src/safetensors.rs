//! Safetensors model files: the one reader and the one writer of the toolkit.
//!
//! The reader lets the `safetensors` crate decide what a valid file is (the same validation
//! candle loads through: offsets contiguous from 0, sizes matching dtype × shape, no bytes
//! after the last tensor) and adds what the crate lets through (a tensor name repeated in
//! the header JSON, where the last one silently wins). When the crate refuses a file, the
//! message says which tensor and which bytes are wrong instead of its terse error name.
//! The writer lays tensors out in name order with sorted metadata, so identical inputs give
//! byte-identical files, and writes them atomically.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::atomic::AtomicFile;
use crate::{Error, IoContext, ModelMeta, Result};

/// Element types the toolkit reads; the float ones a model file may be written in are
/// the command-line values (`f32`, `bf16`, `f16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, clap::ValueEnum)]
pub enum Dtype {
    #[value(skip)]
    F64,
    F32,
    F16,
    BF16,
    #[value(skip)]
    I64,
    #[value(skip)]
    I32,
    #[value(skip)]
    I16,
    #[value(skip)]
    I8,
    #[value(skip)]
    U8,
    #[value(skip)]
    Bool,
}

impl Dtype {
    fn from_crate(d: ::safetensors::Dtype) -> Option<Self> {
        use ::safetensors::Dtype as D;
        Some(match d {
            D::F64 => Dtype::F64,
            D::F32 => Dtype::F32,
            D::F16 => Dtype::F16,
            D::BF16 => Dtype::BF16,
            D::I64 => Dtype::I64,
            D::I32 => Dtype::I32,
            D::I16 => Dtype::I16,
            D::I8 => Dtype::I8,
            D::U8 => Dtype::U8,
            D::BOOL => Dtype::Bool,
            _ => return None,
        })
    }

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

impl Header {
    /// The toolkit's metadata, or an error naming the file when it has none.
    pub fn model_meta(&self) -> Result<ModelMeta> {
        if self.metadata.is_empty() {
            return Err(Error::format(
                &self.path,
                "no __metadata__: not a file written by the MM-Rec toolkit",
            ));
        }
        ModelMeta::from_map(&self.path, &self.metadata)
    }
}

/// Read and validate the header of `path`. Maps the file (nothing is read but the header
/// and what the kernel needs to know its length).
pub fn read_header(path: &Path) -> Result<Header> {
    let file = std::fs::File::open(path).at(path)?;
    // SAFETY: read-only map; files are replaced by rename, never written in place, so the
    // mapping stays valid while it lives.
    let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
    parse(path, &map)
}

/// The toolkit metadata of a model file.
pub fn read_meta(path: &Path) -> Result<ModelMeta> {
    read_header(path)?.model_meta()
}

/// Validate a whole safetensors file held in `bytes`. Never panics on any input.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let invalid = |message: String| Error::format(path, format!("not a valid safetensors file: {message}"));
    let (n, metadata) = match ::safetensors::SafeTensors::read_metadata(bytes) {
        Ok(ok) => ok,
        Err(e) => return Err(invalid(diagnose(bytes).unwrap_or_else(|| e.to_string()))),
    };
    let text = std::str::from_utf8(&bytes[8..8 + n]).map_err(|e| invalid(e.to_string()))?;
    if let Some(fault) = repeated_key(text) {
        return Err(invalid(fault));
    }
    let mut tensors = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        let dtype = Dtype::from_crate(info.dtype)
            .ok_or_else(|| invalid(format!("tensor `{name}`: dtype {:?} is not supported", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let shape = info.shape.iter().map(|&d| d as u64).collect();
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                start: start as u64,
                end: end as u64,
            },
        );
    }
    Ok(Header {
        path: path.to_path_buf(),
        data_offset: 8 + n as u64,
        tensors,
        metadata: metadata.metadata().clone().unwrap_or_default().into_iter().collect(),
    })
}

/// Why the crate refused `bytes`, in words naming the tensor and bytes at fault; None when
/// no check here finds the fault (the crate's own message is used then).
fn diagnose(bytes: &[u8]) -> Option<String> {
    let Some(len) = bytes.get(..8) else {
        return Some(format!(
            "{} bytes is too short for the 8-byte header length",
            bytes.len()
        ));
    };
    let n = u64::from_le_bytes(len.try_into().ok()?);
    let data_len = (bytes.len() as u64 - 8).checked_sub(n).filter(|_| n <= 100 << 20);
    let Some(data_len) = data_len else {
        return Some(format!(
            "header length {n} runs past the end of the {}-byte file",
            bytes.len()
        ));
    };
    let Ok(text) = std::str::from_utf8(&bytes[8..8 + n as usize]) else {
        return Some("header is not UTF-8".into());
    };
    if let Some(fault) = repeated_key(text) {
        return Some(fault);
    }
    let value: Value = match serde_json::from_str(text.trim_end_matches(' ')) {
        Ok(v) => v,
        Err(e) => return Some(format!("header is not JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return Some("header is not a JSON object".into());
    };
    let mut ranges = Vec::new();
    for (name, entry) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        match entry_range(name, entry, data_len) {
            Ok(r) => ranges.push((r.0, r.1, name.as_str())),
            Err(message) => return Some(message),
        }
    }
    layout_fault(ranges, data_len)
}

/// A JSON object keeps the last of repeated keys, and so does the crate: a forged file
/// could hide a tensor that way. The fault, if a key repeats.
fn repeated_key(text: &str) -> Option<String> {
    let keys = match object_keys(text.trim_end_matches(' ')) {
        Ok(keys) => keys,
        Err(e) => return Some(format!("header is not JSON: {e}")),
    };
    let mut seen = std::collections::HashSet::new();
    keys.into_iter()
        .find(|k| !seen.insert(k.clone()))
        .map(|dup| format!("tensor `{dup}` appears twice in the header"))
}

/// The byte range a header entry claims, checked against its dtype, shape and the data
/// section's length.
fn entry_range(name: &str, entry: &Value, data_len: u64) -> Result<(u64, u64), String> {
    let e = entry
        .as_object()
        .ok_or_else(|| format!("tensor `{name}`: entry is not an object"))?;
    let dtype_s = e
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tensor `{name}`: no dtype"))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| format!("tensor `{name}`: unknown dtype {dtype_s:?}"))?;
    let shape: Vec<u64> = e
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tensor `{name}`: no shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| format!("tensor `{name}`: shape entries must be non-negative integers"))
        })
        .collect::<Result<_, _>>()?;
    let offsets = e
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| format!("tensor `{name}`: data_offsets must be [start, end]"))?;
    let (start, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
        (Some(s), Some(e)) if s <= e => (s, e),
        _ => {
            return Err(format!(
                "tensor `{name}`: data_offsets {offsets:?} are not an increasing pair of integers"
            ))
        }
    };
    if end > data_len {
        return Err(format!(
            "tensor `{name}`: bytes {start}..{end} lie outside the {data_len}-byte data section (truncated file?)"
        ));
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor `{name}`: shape {shape:?} overflows"))?;
    if bytes != end - start {
        return Err(format!(
            "tensor `{name}`: {dtype_s} {shape:?} needs {bytes} bytes, data_offsets give {}",
            end - start
        ));
    }
    Ok((start, end))
}

/// The data section must be exactly the tensors, back to back: no overlap, no gap, nothing
/// after the last one.
fn layout_fault(mut ranges: Vec<(u64, u64, &str)>, data_len: u64) -> Option<String> {
    ranges.sort();
    let mut expected = (0u64, "the start of the data section");
    for &(start, end, name) in &ranges {
        if start < expected.0 {
            return Some(format!("tensors `{}` and `{name}` overlap", expected.1));
        }
        if start > expected.0 {
            return Some(format!(
                "{} unclaimed bytes between {} and tensor `{name}`",
                start - expected.0,
                expected.1
            ));
        }
        expected = (end, name);
    }
    (expected.0 != data_len).then(|| format!("{} trailing bytes after the last tensor", data_len - expected.0))
}

/// Writes a safetensors file: the header first (tensors in name order, packed back to back;
/// metadata keys sorted), then each tensor's bytes in that order through `Write`, then
/// `commit`. The file appears complete or not at all.
pub struct Writer {
    out: AtomicFile,
    header: Vec<u8>,
    /// Data bytes still to come.
    remaining: u64,
    patched: bool,
}

impl Writer {
    /// `tensors`: (name, dtype, shape), in strictly increasing name order.
    pub fn create(
        dest: &Path,
        tensors: &[(String, Dtype, Vec<u64>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        if let Some(w) = tensors.windows(2).find(|w| w[0].0 >= w[1].0) {
            return Err(Error::format(
                dest,
                format!("tensors `{}` and `{}` out of name order", w[0].0, w[1].0),
            ));
        }
        let mut hdr = serde_json::Map::new();
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<u64>() * dtype.size();
            hdr.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        if !metadata.is_empty() {
            hdr.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("strings serialise"),
            );
        }
        let mut header = serde_json::to_vec(&hdr).expect("header serialises");
        // The data section stays 8-byte aligned, as safetensors pads it.
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = AtomicFile::create(dest)?;
        let tmp = out.tmp_path().to_path_buf();
        let w = out.writer();
        w.write_all(&(header.len() as u64).to_le_bytes()).at(&tmp)?;
        w.write_all(&header).at(&tmp)?;
        Ok(Writer {
            out,
            header,
            remaining: offset,
            patched: false,
        })
    }

    /// Replace the first `placeholder` in the header by `value` of the same length (a hash
    /// known only once the data is written); the header is rewritten at `commit`.
    pub fn patch_header(&mut self, placeholder: &[u8], value: &[u8]) -> bool {
        assert_eq!(placeholder.len(), value.len(), "a patch keeps the header's length");
        let at = self.header.windows(placeholder.len()).position(|w| w == placeholder);
        if let Some(pos) = at {
            self.header[pos..pos + value.len()].copy_from_slice(value);
            self.patched = true;
        }
        at.is_some()
    }

    /// Check every byte the header promised was written, then sync (when `durable`) and
    /// rename into place.
    pub fn commit(mut self, durable: bool) -> Result<()> {
        let tmp = self.out.tmp_path().to_path_buf();
        if self.remaining != 0 {
            return Err(Error::format(&tmp, format!("{} tensor bytes missing", self.remaining)));
        }
        if self.patched {
            let header = std::mem::take(&mut self.header);
            let w = self.out.writer();
            w.flush().at(&tmp)?;
            if durable {
                // Flush the tensors first: then only the header page is left for the final
                // sync, with no size change and so no journal commit.
                w.get_ref().sync_data().at(&tmp)?;
            }
            w.seek(SeekFrom::Start(8)).at(&tmp)?;
            w.write_all(&header).at(&tmp)?;
        }
        self.out.commit(durable)
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.remaining {
            return Err(std::io::Error::other("more tensor bytes than the header declares"));
        }
        let n = self.out.writer().write(buf)?;
        self.remaining -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.writer().flush()
    }
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
