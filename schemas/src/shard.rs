//! Parquet shards (DESIGN §4): the one writer (`mmrec-data`) and the one reader (`mmrec-data`
//! and the loader).

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{LargeStringBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, UInt16Array, UInt32Array, UInt64Array};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::atomic::{temp_path, HashingWriter};
use crate::{columns, shard_schema, Domain, Error, IoContext, Result, TokenWidth};

/// A document ready to be written: cleaned, classified and tokenized.
pub struct ShardRow<'a> {
    pub id: &'a str,
    pub domain: Domain,
    pub lang: Option<&'a str>,
    pub source: &'a str,
    pub text: &'a str,
    pub tokens: Vec<u32>,
    pub hash: u64,
}

/// What a finished shard holds, for the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenShard {
    pub rows: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

fn writer_properties() -> WriterProperties {
    // zstd level 1 (Arrow's default level): in one comparison on the shared corpora,
    // level 3 saved 9% of the bytes and took `split` from 0.28 s to 0.48 s.
    // Dictionaries and min/max statistics pay off for the short repetitive columns only;
    // on `text` and `tokens` they cost write time and bytes for nothing.
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("zstd level 1 is valid")))
        // Row groups are whatever one `write` call holds (see `ShardWriter::write`).
        .set_max_row_group_row_count(None)
        .set_created_by(format!("mmrec-data {}", env!("CARGO_PKG_VERSION")))
        .set_dictionary_enabled(false);
    for col in [columns::DOMAIN, columns::LANG, columns::SOURCE] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(col), true);
    }
    for col in [
        vec![columns::TEXT.to_string()],
        vec![columns::TOKENS.to_string(), "list".into(), "item".into()],
        vec![columns::ID.to_string()],
    ] {
        b = b.set_column_statistics_enabled(ColumnPath::new(col), EnabledStatistics::None);
    }
    // Parquet stores uint16 tokens as INT32; split into byte streams, the two high streams
    // are all zeros, so zstd gets through them almost for free. Against plain encoding on
    // the bench corpus: shards 57.6 MB instead of 60.6, `split` 4.4 s instead of 4.9 (one
    // thread, single runs), the loader 7% faster (two runs each).
    b = b.set_column_encoding(
        ColumnPath::new(vec![columns::TOKENS.to_string(), "list".into(), "item".into()]),
        parquet::basic::Encoding::BYTE_STREAM_SPLIT,
    );
    b.build()
}

/// Writes one shard atomically: row groups as they come, then checksum, sync and rename.
pub struct ShardWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    schema: Arc<arrow_schema::Schema>,
    width: TokenWidth,
    /// None once finished (or failed in `finish`).
    writer: Option<ArrowWriter<HashingWriter<std::io::BufWriter<std::fs::File>>>>,
    rows: u64,
    tokens: u64,
}

/// A writer dropped before `finish` (an error elsewhere) takes its temporary file with it.
impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl ShardWriter {
    /// Starts `path` under a temporary name; each `write` call becomes one row group.
    pub fn create(path: &Path, width: TokenWidth) -> Result<Self> {
        let schema = shard_schema(width);
        let tmp = temp_path(path);
        let file = std::fs::File::create(&tmp).at(&tmp)?;
        let writer = ArrowWriter::try_new(
            HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file)),
            schema.clone(),
            Some(writer_properties()),
        )
        .map_err(|e| pq_err(path, e))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            schema,
            width,
            writer: Some(writer),
            rows: 0,
            tokens: 0,
        })
    }

    pub fn write(&mut self, rows: &[ShardRow]) -> Result<()> {
        let batch = to_batch(&self.path, rows, self.width, &self.schema)?;
        let writer = self.writer.as_mut().expect("a writer is open until finish");
        writer.write(&batch).map_err(|e| pq_err(&self.path, e))?;
        // The caller sizes row groups (by documents and text bytes): close this one now.
        writer.flush().map_err(|e| pq_err(&self.path, e))?;
        self.rows += rows.len() as u64;
        self.tokens += rows.iter().map(|r| r.tokens.len() as u64).sum::<u64>();
        Ok(())
    }

    pub fn finish(mut self) -> Result<WrittenShard> {
        let result = self.complete();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }

    fn complete(&mut self) -> Result<WrittenShard> {
        let writer = self.writer.take().expect("a writer is open until finish");
        let hashing = writer.into_inner().map_err(|e| pq_err(&self.path, e))?;
        let (buf, sha256, bytes) = hashing.finish();
        let file = buf.into_inner().map_err(|e| Error::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().at(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.path).at(&self.path)?;
        Ok(WrittenShard {
            rows: self.rows,
            tokens: self.tokens,
            bytes,
            sha256,
        })
    }
}

fn pq_err(path: &Path, e: parquet::errors::ParquetError) -> Error {
    Error::format(path, e.to_string())
}

fn to_batch(
    path: &Path,
    rows: &[ShardRow],
    width: TokenWidth,
    schema: &Arc<arrow_schema::Schema>,
) -> Result<RecordBatch> {
    let n = rows.len();
    let mut id = StringBuilder::with_capacity(n, n * 32);
    let mut domain = StringBuilder::with_capacity(n, n * 5);
    let mut lang = StringBuilder::with_capacity(n, n * 6);
    let mut source = StringBuilder::with_capacity(n, n * 32);
    let text_bytes: usize = rows.iter().map(|r| r.text.len()).sum();
    let mut text = LargeStringBuilder::with_capacity(n, text_bytes);
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0i32);
    let total: usize = rows.iter().map(|r| r.tokens.len()).sum();
    if total > i32::MAX as usize {
        return Err(Error::format(path, format!("a row group of {n} documents holds {total} tokens, over the 2^31 a list column allows; lower --row-group-docs")));
    }
    for r in rows {
        id.append_value(r.id);
        domain.append_value(r.domain.as_str());
        lang.append_option(r.lang);
        source.append_value(r.source);
        text.append_value(r.text);
        offsets.push(offsets.last().copied().unwrap_or(0) + r.tokens.len() as i32);
    }
    // One `extend` per row (a vectorised loop), not a `flat_map` over every token.
    let values: ArrayRef = match width {
        TokenWidth::U16 => {
            let mut flat = Vec::with_capacity(total);
            rows.iter()
                .for_each(|r| flat.extend(r.tokens.iter().map(|&t| t as u16)));
            Arc::new(UInt16Array::from(flat))
        }
        TokenWidth::U32 => {
            let mut flat = Vec::with_capacity(total);
            rows.iter().for_each(|r| flat.extend_from_slice(&r.tokens));
            Arc::new(UInt32Array::from(flat))
        }
    };
    let tokens = ListArray::new(
        Arc::new(Field::new("item", width.data_type(), false)),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        values,
        None,
    );
    let n_tokens = UInt32Array::from_iter_values(rows.iter().map(|r| r.tokens.len() as u32));
    let hash = UInt64Array::from_iter_values(rows.iter().map(|r| r.hash));
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(id.finish()),
            Arc::new(domain.finish()),
            Arc::new(lang.finish()),
            Arc::new(source.finish()),
            Arc::new(text.finish()),
            Arc::new(tokens),
            Arc::new(n_tokens),
            Arc::new(hash),
        ],
    )
    .map_err(|e| Error::format(path, format!("building a shard batch: {e}")))
}

/// Reads selected columns of a shard, one record batch per row group.
pub struct ShardReader {
    path: std::path::PathBuf,
    builder: ParquetRecordBatchReaderBuilder<std::fs::File>,
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).at(path)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::format(path, format!("not a readable Parquet shard: {e}")))?;
        Ok(ShardReader {
            path: path.to_path_buf(),
            builder,
        })
    }

    pub fn num_row_groups(&self) -> usize {
        self.builder.metadata().num_row_groups()
    }

    pub fn num_rows(&self) -> u64 {
        self.builder.metadata().file_metadata().num_rows() as u64
    }

    /// The token width, or an error naming the file when the schema is not a shard's.
    pub fn token_width(&self) -> Result<TokenWidth> {
        let schema = self.builder.schema();
        let width = match schema.field_with_name(columns::TOKENS).map(|f| f.data_type().clone()) {
            Ok(DataType::List(item)) if item.data_type() == &DataType::UInt16 => TokenWidth::U16,
            Ok(DataType::List(item)) if item.data_type() == &DataType::UInt32 => TokenWidth::U32,
            other => return Err(self.err(format!("column `tokens` must be list<uint16|uint32>, found {other:?}"))),
        };
        let expected = shard_schema(width);
        for field in expected.fields() {
            match schema.field_with_name(field.name()) {
                Ok(f) if compatible(f.data_type(), field.data_type()) => {}
                Ok(f) => {
                    return Err(self.err(format!(
                        "column `{}` is {}, expected {}",
                        field.name(),
                        f.data_type(),
                        field.data_type()
                    )))
                }
                Err(_) => return Err(self.err(format!("column `{}` is missing", field.name()))),
            }
        }
        Ok(width)
    }

    fn err(&self, message: String) -> Error {
        Error::format(&self.path, message)
    }

    /// Iterate the named columns (in the order named) of the given row groups (None = all).
    /// One row group comes as one batch; several may share batches, since row groups differ
    /// in row count.
    pub fn batches(
        self,
        cols: &[&str],
        row_groups: Option<Vec<usize>>,
    ) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
        // Readers downcast columns to the shard schema's types: a file whose schema is not
        // a shard's is an error here, not a panic there.
        self.token_width()?;
        let path = self.path.clone();
        let schema = self.builder.parquet_schema();
        let arrow_schema = self.builder.schema().clone();
        let roots: Vec<usize> = cols
            .iter()
            .map(|c| {
                arrow_schema
                    .index_of(c)
                    .map_err(|_| self.err(format!("column `{c}` is missing")))
            })
            .collect::<Result<_>>()?;
        let mask = ProjectionMask::roots(schema, roots);
        let rows_per_group = self
            .builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows() as usize)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut b = self.builder.with_projection(mask).with_batch_size(rows_per_group);
        if let Some(groups) = row_groups {
            b = b.with_row_groups(groups);
        }
        let reader = b.build().map_err(|e| Error::format(&path, e.to_string()))?;
        // A projection yields columns in the file's order; callers get the order they asked.
        let wanted: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let in_order = move |b: RecordBatch| {
            let idx: Vec<usize> = wanted
                .iter()
                .map(|c| b.schema().index_of(c).expect("projected above"))
                .collect();
            b.project(&idx)
        };
        Ok(reader.map(move |r| {
            r.and_then(|b| in_order(canonical_strings(b)))
                .map_err(|e| Error::format(&path, format!("corrupt row group: {e}")))
        }))
    }
}

/// Whether a column of type `found` can be read as `expected`: string columns in either
/// offset width, and lists whatever their item field is named (pyarrow says `element`,
/// arrow-rs `item`).
fn compatible(found: &DataType, expected: &DataType) -> bool {
    match (found, expected) {
        (DataType::Utf8 | DataType::LargeUtf8, DataType::Utf8 | DataType::LargeUtf8) => true,
        (DataType::List(a), DataType::List(b)) => a.data_type() == b.data_type(),
        (a, b) => a == b,
    }
}

/// The batch with `text` as large strings and every other string column as plain strings,
/// the widths this crate writes, so readers can rely on them whoever wrote the shard.
fn canonical_strings(batch: RecordBatch) -> RecordBatch {
    use arrow_array::{LargeStringArray, StringArray};
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        let large = field.name() == columns::TEXT;
        let col: ArrayRef = match (col.data_type(), large) {
            (DataType::Utf8, true) => Arc::new(col.as_string::<i32>().iter().collect::<LargeStringArray>()),
            (DataType::LargeUtf8, false) => Arc::new(col.as_string::<i64>().iter().collect::<StringArray>()),
            _ => col.clone(),
        };
        fields.push(Field::new(field.name(), col.data_type().clone(), field.is_nullable()));
        cols.push(col);
    }
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), cols).expect("same columns, same lengths")
}

/// Token lists of a `tokens` column, whatever its width, as u32.
pub fn token_lists(array: &dyn Array) -> Vec<Vec<u32>> {
    let list = array.as_list::<i32>();
    (0..list.len())
        .map(|i| {
            let v = list.value(i);
            match v.data_type() {
                DataType::UInt16 => v
                    .as_primitive::<UInt16Type>()
                    .values()
                    .iter()
                    .map(|&t| t as u32)
                    .collect(),
                _ => v.as_primitive::<UInt32Type>().values().to_vec(),
            }
        })
        .collect()
}
