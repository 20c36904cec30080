//! The one helper module of the MM-Rec test suites: where the fixtures are, the
//! workspace's binaries, fixture shards made by the real `mmrec-data`, and shards written
//! the way other tools write them.
//!
//! The binaries are the ones `cargo build --workspace --bins` left beside the test
//! executable (`.ci/run` and the README's test command build them first).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::cast::AsArray;

/// The bundled fixtures (corpora, tokenizer, source tree).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// The directory cargo builds binaries into (`target/debug`): the test executable lives
/// in its `deps/`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("a directory");
    deps.parent().unwrap_or(deps).to_path_buf()
}

/// Path of a workspace binary (`mmrec-data`, `mmrec-train`, `mmrec-transfer`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

pub fn command(name: &str) -> Command {
    Command::new(bin(name))
}

/// Send SIGTERM to a child process (what `kill` and schedulers send).
pub fn terminate(child: &std::process::Child) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) on a child of this process.
    unsafe { kill(child.id() as i32, 15) };
}

/// Run a binary to completion; its stderr is echoed when it fails, for the test log.
pub fn run<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> Output {
    let out = command(name).args(args).output().expect("the binary runs");
    if !out.status.success() {
        eprintln!("{name} stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// Shards of the fixture corpora (text, code and chat as mixed), made once per test binary
/// and `name` by `mmrec-data split` under the target directory.
pub fn fixture_shards(name: &str, shard_docs: usize, row_group_docs: usize) -> PathBuf {
    static MADE: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().expect("shards lock");
    if let Some((_, dir)) = made.iter().find(|(n, _)| n == name) {
        return dir.clone();
    }
    // Not a TempDir: a static is never dropped, so it would outlive every run; a fixed
    // name per binary, removed first, keeps one copy.
    let dir = bin_dir().join("test-shards").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let c = fixtures().join("corpora");
    let args: Vec<PathBuf> = vec![
        "split".into(),
        "--text".into(),
        c.join("wikitext.jsonl"),
        "--code".into(),
        c.join("python_stdlib.jsonl"),
        "--mixed".into(),
        c.join("chat.jsonl"),
        "--tokenizer".into(),
        fixtures().join("tokenizer.json"),
        "--out".into(),
        dir.clone(),
        "--shard-docs".into(),
        shard_docs.to_string().into(),
        "--row-group-docs".into(),
        row_group_docs.to_string().into(),
    ];
    assert!(
        run("mmrec-data", &args).status.success(),
        "mmrec-data split of the fixtures"
    );
    made.push((name.into(), dir.clone()));
    dir
}

/// Rewrite the shard `file` of `dir` as another writer might have: `text` as a plain
/// (32-bit offset) string and the token list's item named `element`, as pyarrow writes
/// them. With `empty_copy`, write the same schema with no row group at all to `empty_copy`
/// and list it as a shard of its own. The manifest is updated.
pub fn rewrite_foreign(dir: &Path, file: &str, empty_copy: Option<&str>) {
    let path = dir.join(file);
    let batch = mmrec_schemas::shard::ShardReader::open(&path)
        .unwrap()
        .batches(
            &["id", "domain", "lang", "source", "text", "tokens", "n_tokens", "hash"],
            None,
        )
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let text: arrow_array::StringArray = batch.column(4).as_string::<i64>().iter().collect();
    let tokens = batch.column(5).as_list::<i32>();
    let item = arrow_schema::Field::new("element", tokens.values().data_type().clone(), true);
    let tokens = arrow_array::ListArray::new(
        Arc::new(item.clone()),
        tokens.offsets().clone(),
        tokens.values().clone(),
        None,
    );
    let mut fields: Vec<arrow_schema::Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[4] = arrow_schema::Field::new("text", arrow_schema::DataType::Utf8, false);
    fields[5] = arrow_schema::Field::new("tokens", arrow_schema::DataType::List(Arc::new(item)), false);
    let schema = Arc::new(arrow_schema::Schema::new(fields));
    let mut cols = batch.columns().to_vec();
    cols[4] = Arc::new(text);
    cols[5] = Arc::new(tokens);
    let batch = arrow_array::RecordBatch::try_new(schema.clone(), cols).unwrap();
    let write = |path: &Path, rows: bool| {
        let mut w =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema.clone(), None).unwrap();
        if rows {
            w.write(&batch).unwrap();
        }
        w.close().unwrap();
        let bytes = std::fs::read(path).unwrap();
        (mmrec_schemas::atomic::sha256_hex(&bytes), bytes.len() as u64)
    };
    let mut m = mmrec_schemas::read_manifest(dir).unwrap();
    let (sha256, bytes) = write(&path, true);
    let domain = m
        .domains
        .iter_mut()
        .find(|(_, v)| v.iter().any(|s| s.file == file))
        .unwrap()
        .1;
    let entry = domain.iter_mut().find(|s| s.file == file).unwrap();
    (entry.sha256, entry.bytes) = (sha256, bytes);
    if let Some(copy) = empty_copy {
        let (sha256, bytes) = write(&dir.join(copy), false);
        domain.push(mmrec_schemas::ShardInfo {
            file: copy.into(),
            rows: 0,
            tokens: 0,
            bytes,
            sha256,
        });
    }
    mmrec_schemas::write_manifest(dir, &m).unwrap();
}
