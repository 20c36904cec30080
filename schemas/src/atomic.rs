//! Crash-safe writes and hashing. Everything goes to a temporary name in the destination's
//! directory and is renamed into place when complete, so a reader never sees half a file.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{IoContext, Result};

/// Hidden temporary name beside `dest`; the pid keeps concurrent writers apart.
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Whether a file name is one of [`temp_path`]'s, left behind by a killed writer.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// A file being written under its temporary name: `commit` syncs and renames it into place;
/// dropped uncommitted (an error, a panic) it removes itself.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<std::fs::File>>,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<Self> {
        let tmp = temp_path(dest);
        let file = std::fs::File::create(&tmp).at(&tmp)?;
        Ok(AtomicFile {
            dest: dest.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Where writes go (buffered; seekable).
    pub fn writer(&mut self) -> &mut BufWriter<std::fs::File> {
        self.writer.as_mut().expect("open until commit")
    }

    /// The temporary path, for error messages about writes into it.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flush, then (when `durable`, so the file survives a power loss too) sync the data,
    /// then rename into place.
    pub fn commit(mut self, durable: bool) -> Result<()> {
        let writer = self.writer.take().expect("open until commit");
        let result = Self::flush_and_sync(writer, durable).at(&self.tmp);
        let result = result.and_then(|()| std::fs::rename(&self.tmp, &self.dest).at(&self.dest));
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }

    fn flush_and_sync(writer: BufWriter<std::fs::File>, durable: bool) -> std::io::Result<()> {
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        if durable {
            // fdatasync covers what reading the file back needs (its size included).
            file.sync_data()?;
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `bytes` to `dest` atomically and durably.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.writer().write_all(bytes).at(temp_path(dest))?;
    f.commit(true)
}

/// A writer that hashes and counts what passes through, so a file's sha256 costs no second
/// read of it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex(&self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 (hex) and size of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut w = HashingWriter::new(std::io::sink());
    std::io::copy(&mut f, &mut w).at(path)?;
    let (_, sha, bytes) = w.finish();
    Ok((sha, bytes))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_file_leaves_nothing_and_a_committed_one_replaces_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f.json");
        std::fs::write(&dest, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.writer().write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
        write_atomic(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(file_sha256(&dest).unwrap(), (sha256_hex(b"new"), 3));
    }
}
