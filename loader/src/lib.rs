//! Prefetching loader: shards → packed `[B, T+1]` token batches, ahead of the trainer.
//!
//! Worker threads only decode Parquet row groups. One assembler thread owns every decision
//! that shapes the batch stream (row-group order, shuffle buffer, packing, domain mixing)
//! and takes decoded row groups strictly in plan order, so the batches depend on the seed
//! and the data alone, never on the worker count or on timing. The assembler runs ahead of
//! the consumer through a bounded channel; the consumer only receives.
//!
//! Each batch carries the [`Cursor`] just after it. The cursor is small (positions, buffered
//! document references, RNG state) and restoring it re-decodes only the row groups those
//! references point into, so a resumed loader yields exactly the batches an uninterrupted
//! one would have.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type, UInt64Type};
use arrow_array::Array;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use mmrec_schemas::{columns, Domain};
use serde::{Deserialize, Serialize};

pub use mmrec_schemas::checkpoint::{Cursor, Lane, StreamCursor};
use mmrec_schemas::rng::splitmix;
use mmrec_schemas::shard::ShardReader;
use mmrec_schemas::special::{EOT, PAD};
use mmrec_schemas::{read_manifest, MANIFEST};

/// Why the loader cannot start or continue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Schema(#[from] mmrec_schemas::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn manifest_err(path: &std::path::Path, message: String) -> Error {
    mmrec_schemas::Error::format(path, message).into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Tokens per training position; rows hold `seq_len + 1` tokens (inputs and targets).
    pub seq_len: usize,
    pub batch_size: usize,
    pub workers: usize,
    /// Batches the assembler may run ahead of the consumer.
    pub prefetch: usize,
    /// Row groups per domain decoded ahead of the assembler.
    pub lookahead: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Documents held in each domain's shuffle buffer.
    pub shuffle_buffer: usize,
    /// Mixing weights; domains left out are not read. Normalised internally.
    pub weights: BTreeMap<Domain, f64>,
    /// Documents whose hash falls in this many per mille form the held-out split.
    pub val_permille: u32,
    pub split: Split,
    /// Mask the target that is a document's first token (it cannot be predicted from the
    /// previous, unrelated document).
    pub boundary_mask: bool,
    /// sha256 of the tokenizer the model was built for; a mismatch is an error.
    pub tokenizer_sha256: Option<String>,
    /// Segment training: each row continues its own stream of documents from one batch to
    /// the next (a row's first token is the same row's last of the batch before), with
    /// domains chosen per document so that tokens follow the weights.
    pub streams: bool,
    /// Data parallelism, (rank, world size): every rank assembles the same global batch of
    /// `world × batch_size` rows from the same plan and keeps its own `batch_size` rows, so
    /// each token is read once per epoch across the ranks, the cursor is the same on every
    /// rank, and the global stream does not depend on how many ranks share it.
    pub ranks: Option<(usize, usize)>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seq_len: 512,
            batch_size: 8,
            workers: 2,
            prefetch: 8,
            lookahead: 4,
            seed: 0,
            shuffle: true,
            shuffle_buffer: 1024,
            weights: Domain::ALL.iter().map(|d| (*d, 1.0)).collect(),
            val_permille: 10,
            split: Split::Train,
            boundary_mask: false,
            tokenizer_sha256: None,
            streams: false,
            ranks: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Endless, shuffled, mixed by weight.
    Train,
    /// One pass over the held-out documents, domain after domain, in order.
    Validation,
}

/// A batch of `batch_size` rows of `seq_len + 1` tokens.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Vec<u32>,
    /// 1 where the token is real (and, with `boundary_mask`, predictable), 0 on padding.
    pub mask: Vec<u8>,
    /// The domain each row was drawn from.
    pub domains: Vec<Domain>,
    pub cursor: Cursor,
}

impl Batch {
    /// Rows `from..from + n` of the batch (a rank's share), with the batch's cursor.
    pub fn rows(&self, from: usize, n: usize) -> Batch {
        let row_len = self.tokens.len() / self.domains.len().max(1);
        let cut = from * row_len..(from + n) * row_len;
        Batch {
            tokens: self.tokens[cut.clone()].to_vec(),
            mask: self.mask[cut].to_vec(),
            domains: self.domains[from..from + n].to_vec(),
            cursor: self.cursor.clone(),
        }
    }
}

/// One row group of one domain's shards.
#[derive(Debug, Clone)]
struct RowGroupRef {
    path: Arc<PathBuf>,
    index: usize,
}

/// Decoded documents of a row group that belong to the requested split.
#[derive(Debug)]
struct Decoded {
    tokens: Vec<u32>,
    /// Per row: Some(start..end) in `tokens` when the row is in the split.
    rows: Vec<Option<(usize, usize)>>,
}

type Key = (Domain, u64, usize); // domain, epoch, position in the epoch's order

struct Task {
    key: Key,
    group: RowGroupRef,
}

pub struct Loader {
    batches: Receiver<Result<Batch>>,
    stop: Sender<()>,
    threads: Vec<JoinHandle<()>>,
    last: Option<Cursor>,
    waited: Duration,
    received: u64,
}

impl Loader {
    /// Open shard directories (each with its `manifest.json`) and start the threads,
    /// continuing from `cursor` when given.
    pub fn open(dirs: &[PathBuf], cfg: LoaderConfig, cursor: Option<Cursor>) -> Result<Self> {
        let (cfg, rank) = match cfg.ranks {
            Some((rank, world)) if rank >= world => {
                return Err(Error::Invalid(format!("rank {rank} of a world of {world}")));
            }
            // The assembler builds the global batch; this rank's rows are cut from it.
            Some((rank, world)) => (
                LoaderConfig {
                    batch_size: cfg.batch_size * world,
                    ..cfg
                },
                Some((rank, cfg.batch_size)),
            ),
            None => (cfg, None),
        };
        let plan = Plan::open(dirs, &cfg)?;
        let (task_tx, task_rx) = unbounded::<Task>();
        let (done_tx, done_rx) = unbounded::<(Key, Result<Decoded>)>();
        let (batch_tx, batch_rx) = bounded::<Result<Batch>>(cfg.prefetch.max(1));
        let (stop_tx, stop_rx) = bounded::<()>(1);
        let mut threads = Vec::new();
        for _ in 0..cfg.workers.max(1) {
            let (rx, tx, split, permille) = (task_rx.clone(), done_tx.clone(), cfg.split, cfg.val_permille);
            threads.push(std::thread::spawn(move || {
                for task in rx {
                    let out = decode(&task.group, split, permille);
                    if tx.send((task.key, out)).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(done_tx);
        let mut asm = Assembler::new(plan, cfg, task_tx, done_rx, cursor)?;
        threads.push(std::thread::spawn(move || asm.run(batch_tx, stop_rx, rank)));
        Ok(Loader {
            batches: batch_rx,
            stop: stop_tx,
            threads,
            last: None,
            waited: Duration::ZERO,
            received: 0,
        })
    }

    /// The next batch, or None at the end of a validation pass. Errors (a corrupt or
    /// missing shard) name the file.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        let started = Instant::now();
        let got = self.batches.recv().ok();
        self.waited += started.elapsed();
        if let Some(Ok(b)) = &got {
            self.last = Some(b.cursor.clone());
            self.received += 1;
        }
        got
    }

    /// Cursor after the last batch received (None before the first).
    pub fn cursor(&self) -> Option<&Cursor> {
        self.last.as_ref()
    }

    /// Total time the consumer spent waiting in `next_batch`.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        // Unblock the assembler if it is waiting to hand over a batch.
        while self.batches.try_recv().is_ok() {}
        let assembler = self.threads.pop();
        if let Some(a) = assembler {
            while !a.is_finished() {
                while self.batches.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = a.join();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the loader reads: per domain, its row groups; plus the special token ids.
struct Plan {
    groups: BTreeMap<Domain, Vec<RowGroupRef>>,
    eot: u32,
    pad: u32,
}

impl Plan {
    fn open(dirs: &[PathBuf], cfg: &LoaderConfig) -> Result<Self> {
        if cfg.seq_len == 0 || cfg.batch_size == 0 {
            return Err(Error::Invalid("seq_len and batch_size must be at least 1".into()));
        }
        let mut groups: BTreeMap<Domain, Vec<RowGroupRef>> = BTreeMap::new();
        let mut specials: Option<(String, u32, u32)> = None;
        for dir in dirs {
            let m = read_manifest(dir)?;
            let mpath = dir.join(MANIFEST);
            if let Some(want) = &cfg.tokenizer_sha256 {
                if &m.tokenizer.sha256 != want {
                    return Err(manifest_err(
                        &mpath,
                        format!(
                            "shards were tokenized with tokenizer {}, the model expects {want}",
                            m.tokenizer.sha256
                        ),
                    ));
                }
            }
            let eot = *m
                .tokenizer
                .special_tokens
                .get(EOT)
                .ok_or_else(|| manifest_err(&mpath.clone(), format!("tokenizer has no {EOT}")))?;
            let pad = m.tokenizer.special_tokens.get(PAD).copied().unwrap_or(eot);
            match &specials {
                Some((sha, _, _)) if sha != &m.tokenizer.sha256 => {
                    return Err(manifest_err(
                        &mpath,
                        format!(
                            "tokenizer {} differs from the other directories' {sha}",
                            m.tokenizer.sha256
                        ),
                    ))
                }
                Some(_) => {}
                None => specials = Some((m.tokenizer.sha256.clone(), eot, pad)),
            }
            for (domain, shards) in &m.domains {
                if !cfg.weights.contains_key(domain) {
                    continue;
                }
                for s in shards {
                    let path = dir.join(&s.file);
                    let n = ShardReader::open(&path)?.num_row_groups();
                    let path = Arc::new(path);
                    groups
                        .entry(*domain)
                        .or_default()
                        .extend((0..n).map(|index| RowGroupRef {
                            path: path.clone(),
                            index,
                        }));
                }
            }
        }
        let (_, eot, pad) = specials.ok_or_else(|| Error::Invalid("no shard directories given".into()))?;
        for (d, w) in &cfg.weights {
            if *w > 0.0 && groups.get(d).is_none_or(|g| g.is_empty()) && cfg.split == Split::Train {
                return Err(Error::Invalid(format!("domain {d} has weight {w} but no shards")));
            }
        }
        groups.retain(|d, _| cfg.weights.get(d).is_some_and(|w| *w > 0.0));
        Ok(Plan { groups, eot, pad })
    }
}

fn decode(group: &RowGroupRef, split: Split, permille: u32) -> Result<Decoded> {
    let reader = ShardReader::open(&group.path)?;
    let mut tokens = Vec::new();
    let mut rows = Vec::new();
    for batch in reader.batches(&[columns::TOKENS, columns::HASH], Some(vec![group.index]))? {
        let batch = batch?;
        let list = batch.column(0).as_list::<i32>();
        let hashes = batch.column(1).as_primitive::<UInt64Type>();
        let offsets = list.value_offsets();
        let values = list.values();
        let start = tokens.len();
        match values.data_type() {
            arrow_schema::DataType::UInt16 => {
                tokens.extend(values.as_primitive::<UInt16Type>().values().iter().map(|&t| t as u32))
            }
            _ => tokens.extend_from_slice(values.as_primitive::<UInt32Type>().values()),
        }
        for i in 0..list.len() {
            let held_out = in_validation(hashes.value(i), permille);
            let keep = held_out == (split == Split::Validation);
            let (a, b) = (
                offsets[i] as usize - offsets[0] as usize,
                offsets[i + 1] as usize - offsets[0] as usize,
            );
            rows.push(keep.then_some((start + a, start + b)));
        }
    }
    Ok(Decoded { tokens, rows })
}

/// Every held-out document of `domains`, whole, in shard order, each after the end-of-text
/// id (as documents follow one another in training): for evaluations that need documents
/// rather than packed rows, such as loss against position.
pub fn held_out_documents(dirs: &[PathBuf], domains: &[Domain], val_permille: u32) -> Result<Vec<(Domain, Vec<u32>)>> {
    let cfg = LoaderConfig {
        seq_len: 1,
        batch_size: 1,
        weights: domains.iter().map(|d| (*d, 1.0)).collect(),
        val_permille,
        split: Split::Validation,
        ..LoaderConfig::default()
    };
    let plan = Plan::open(dirs, &cfg)?;
    let mut docs = Vec::new();
    for (domain, groups) in &plan.groups {
        for group in groups {
            let decoded = decode(group, Split::Validation, val_permille)?;
            docs.extend(decoded.rows.iter().flatten().map(|&(a, b)| {
                (
                    *domain,
                    std::iter::once(plan.eot)
                        .chain(decoded.tokens[a..b].iter().copied())
                        .collect(),
                )
            }));
        }
    }
    Ok(docs)
}

/// Held-out membership by document hash: stable across runs, shard layouts and seeds.
pub fn in_validation(hash: u64, permille: u32) -> bool {
    // Remix so the split is independent of the partition (which uses the high bits).
    (splitmix(hash) % 1000) < permille as u64
}

/// Seeded permutation of 0..n (Fisher–Yates with splitmix).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = splitmix(s);
        p.swap(i, (s % (i as u64 + 1)) as usize);
    }
    p
}

struct Stream {
    domain: Domain,
    groups: Vec<RowGroupRef>,
    order: Vec<usize>,
    cur: StreamCursor,
    /// Keys requested from workers and not yet taken, in plan order.
    requested: VecDeque<Key>,
    /// Plan position of the next row group to request: (epoch, position).
    ahead: (u64, usize),
}

struct Assembler {
    plan: Plan,
    cfg: LoaderConfig,
    tasks: Sender<Task>,
    done: Receiver<(Key, Result<Decoded>)>,
    arrived: HashMap<Key, Result<Decoded>>,
    /// Decoded row groups that buffered references still point into, by (domain, group).
    cache: HashMap<(Domain, u32), Arc<Decoded>>,
    streams: BTreeMap<Domain, Stream>,
    credits: BTreeMap<Domain, f64>,
    tokens: BTreeMap<Domain, u64>,
    batches: u64,
    /// Validation: domains not yet finished, in order.
    validation_order: VecDeque<Domain>,
    /// Segment training: one stream per batch row.
    lanes: Vec<Lane>,
}

impl Assembler {
    fn new(
        plan: Plan,
        cfg: LoaderConfig,
        tasks: Sender<Task>,
        done: Receiver<(Key, Result<Decoded>)>,
        cursor: Option<Cursor>,
    ) -> Result<Self> {
        let mut streams = BTreeMap::new();
        for (d, groups) in &plan.groups {
            let seed = cfg.seed ^ (*d as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F);
            let cur = match cursor.as_ref().and_then(|c| c.streams.get(d)) {
                Some(c) => c.clone(),
                None => StreamCursor {
                    epoch: 0,
                    next: 0,
                    buffer: Vec::new(),
                    current: None,
                    rng: seed,
                    exhausted: false,
                },
            };
            let order = epoch_order(groups.len(), &cfg, *d, cur.epoch);
            let ahead = (cur.epoch, cur.next);
            streams.insert(
                *d,
                Stream {
                    domain: *d,
                    groups: groups.clone(),
                    order,
                    cur,
                    requested: VecDeque::new(),
                    ahead,
                },
            );
        }
        let credits = cursor
            .as_ref()
            .map(|c| c.credits.clone())
            .unwrap_or_else(|| streams.keys().map(|d| (*d, 0.0)).collect());
        let tokens = cursor
            .as_ref()
            .map(|c| c.tokens.clone())
            .unwrap_or_else(|| streams.keys().map(|d| (*d, 0)).collect());
        let batches = cursor.as_ref().map_or(0, |c| c.batches);
        let lanes = match (cfg.streams, cursor.as_ref().map(|c| &c.lanes)) {
            (false, _) => Vec::new(),
            (true, Some(lanes)) if batches > 0 => {
                if lanes.len() != cfg.batch_size {
                    return Err(Error::Invalid(format!(
                        "the cursor continues {} row streams; this loader has {} rows (segment training keeps its batch size)",
                        lanes.len(),
                        cfg.batch_size
                    )));
                }
                lanes.clone()
            }
            (true, _) => vec![Lane::default(); cfg.batch_size],
        };
        if cfg.streams && cfg.split != Split::Train {
            return Err(Error::Invalid(
                "row streams are for training; validation reads documents whole".into(),
            ));
        }
        let validation_order = streams
            .iter()
            .filter(|(_, s)| !s.cur.exhausted)
            .map(|(d, _)| *d)
            .collect();
        let mut asm = Assembler {
            plan,
            cfg,
            tasks,
            done,
            arrived: HashMap::new(),
            cache: HashMap::new(),
            streams,
            credits,
            tokens,
            batches,
            validation_order,
            lanes,
        };
        asm.restore_referenced_groups()?;
        Ok(asm)
    }

    /// Decode the row groups a restored cursor's references point into (shuffle buffers,
    /// documents being packed, row streams).
    fn restore_referenced_groups(&mut self) -> Result<()> {
        let domains: Vec<Domain> = self.streams.keys().copied().collect();
        for d in domains {
            let s = &self.streams[&d];
            let in_lanes = self.lanes.iter().filter_map(|l| l.current).filter(|c| c.0 == d);
            let mut needed: Vec<u32> = s
                .cur
                .buffer
                .iter()
                .map(|(g, _)| *g)
                .chain(s.cur.current.map(|(g, _, _)| g))
                .chain(in_lanes.map(|c| c.1))
                .collect();
            needed.sort_unstable();
            needed.dedup();
            for g in needed {
                let group = s.groups.get(g as usize).ok_or_else(|| {
                    Error::Invalid(format!(
                        "cursor refers to row group {g} of {d}, which has {}",
                        s.groups.len()
                    ))
                })?;
                let decoded = decode(group, self.cfg.split, self.cfg.val_permille)?;
                self.cache.insert((d, g), Arc::new(decoded));
            }
        }
        Ok(())
    }

    /// Assemble batches until stopped; with `rank` = (rank, rows), hand over only that
    /// rank's rows of each global batch.
    fn run(&mut self, out: Sender<Result<Batch>>, stop: Receiver<()>, rank: Option<(usize, usize)>) {
        loop {
            if stop.try_recv().is_ok() {
                return;
            }
            match self.next_batch() {
                Ok(Some(b)) => {
                    let b = match rank {
                        Some((r, rows)) => b.rows(r * rows, rows),
                        None => b,
                    };
                    if out.send(Ok(b)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = out.send(Err(e));
                    return;
                }
            }
        }
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.cfg.streams {
            return self.next_stream_batch();
        }
        let (b, row_len) = (self.cfg.batch_size, self.cfg.seq_len + 1);
        let mut tokens = vec![self.plan.pad; b * row_len];
        let mut mask = vec![0u8; b * row_len];
        let mut domains = Vec::with_capacity(b);
        let mut any = false;
        'rows: for r in 0..b {
            loop {
                let Some(d) = self.pick_domain() else { break 'rows };
                let row = r * row_len..(r + 1) * row_len;
                let filled = self.fill_row(d, &mut tokens[row.clone()], &mut mask[row])?;
                if filled > 0 {
                    any = true;
                    domains.push(d);
                    *self.tokens.get_mut(&d).expect("domain has a counter") += filled as u64;
                }
                // A validation row short of full means its domain is done; an empty one
                // is refilled from the next domain.
                if self.cfg.split == Split::Validation && filled < row_len {
                    self.validation_order.pop_front();
                    self.streams.get_mut(&d).expect("stream").cur.exhausted = true;
                    if filled == 0 {
                        continue;
                    }
                }
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        domains.resize(b, *domains.last().expect("at least one row"));
        Ok(Some(self.deliver(tokens, mask, domains)))
    }

    /// The batch, counted, with the cursor just after it.
    fn deliver(&mut self, tokens: Vec<u32>, mask: Vec<u8>, domains: Vec<Domain>) -> Batch {
        self.batches += 1;
        Batch {
            tokens,
            mask,
            domains,
            cursor: self.cursor(),
        }
    }

    /// Segment training: every row continues its own stream of documents.
    fn next_stream_batch(&mut self) -> Result<Option<Batch>> {
        let (b, row_len) = (self.cfg.batch_size, self.cfg.seq_len + 1);
        let mut tokens = vec![self.plan.pad; b * row_len];
        let mut mask = vec![0u8; b * row_len];
        let mut domains = Vec::with_capacity(b);
        for r in 0..b {
            let row = r * row_len..(r + 1) * row_len;
            domains.push(self.fill_lane(r, &mut tokens[row.clone()], &mut mask[row])?);
        }
        Ok(Some(self.deliver(tokens, mask, domains)))
    }

    /// Row `r` of a stream batch: the row's last token of the batch before, then its
    /// documents from where it stopped; the domain it starts in.
    fn fill_lane(&mut self, r: usize, row: &mut [u32], mask: &mut [u8]) -> Result<Domain> {
        let mut at = 0;
        if let Some(last) = self.lanes[r].last {
            (row[0], mask[0], at) = (last, 1, 1);
        }
        let mut first = None;
        while at < row.len() {
            let (d, doc) = match self.lanes[r].current {
                Some((d, g, i, used)) => (d, (g, i, used)),
                None => {
                    let d = self.domain_below_its_share();
                    let doc = self
                        .current_doc(d)?
                        .ok_or_else(|| Error::Invalid(format!("domain {d} has no documents in the training split")))?;
                    // The document is the lane's now, not the domain's.
                    self.streams.get_mut(&d).expect("stream").cur.current = None;
                    (d, doc)
                }
            };
            first.get_or_insert(d);
            let (taken, rest) = self.copy_doc(d, doc, &mut row[at..], &mut mask[at..]);
            at += taken;
            *self.tokens.get_mut(&d).expect("domain has a counter") += taken as u64;
            self.lanes[r].current = rest.map(|(g, i, used)| (d, g, i, used));
            if rest.is_none() {
                self.release(d, doc.0);
            }
        }
        self.lanes[r].last = row.last().copied();
        Ok(first.expect("a row of at least one token"))
    }

    /// The domain furthest below its weight's share of the tokens assigned so far (delivered,
    /// plus the rest of the documents rows are reading): streams choose a domain per
    /// document, so tokens, not rows, follow the weights.
    fn domain_below_its_share(&self) -> Domain {
        let mut assigned: BTreeMap<Domain, f64> = self.tokens.iter().map(|(d, t)| (*d, *t as f64)).collect();
        for (d, g, r, used) in self.lanes.iter().filter_map(|l| l.current) {
            let (a, b) = self.cache[&(d, g)].rows[r as usize].expect("lanes read rows of the split");
            *assigned.entry(d).or_default() += (b - a + 1) as f64 - used as f64;
        }
        let total_w: f64 = self.streams.keys().map(|d| self.cfg.weights[d]).sum();
        let total_t = assigned.values().sum::<f64>() + 1.0;
        let deficit = |d: &Domain| self.cfg.weights[d] / total_w * total_t - assigned.get(d).copied().unwrap_or(0.0);
        *self
            .streams
            .keys()
            .max_by(|a, b| deficit(a).partial_cmp(&deficit(b)).expect("finite").then(b.cmp(a)))
            .expect("at least one domain")
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            batches: self.batches,
            credits: self.credits.clone(),
            streams: self.streams.iter().map(|(d, s)| (*d, s.cur.clone())).collect(),
            tokens: self.tokens.clone(),
            lanes: self.lanes.clone(),
        }
    }

    /// Smooth weighted round-robin: every domain earns its weight, the richest is chosen
    /// and pays the total. Row counts follow the weights to within one row.
    fn pick_domain(&mut self) -> Option<Domain> {
        if self.cfg.split == Split::Validation {
            return self.validation_order.front().copied();
        }
        let total: f64 = self.streams.keys().map(|d| self.cfg.weights[d]).sum();
        for (d, c) in self.credits.iter_mut() {
            *c += self.cfg.weights[d];
        }
        let (&d, _) = self
            .credits
            .iter()
            .max_by(|a, b| a.1.partial_cmp(b.1).expect("finite credits").then(b.0.cmp(a.0)))?;
        *self.credits.get_mut(&d).expect("credit") -= total;
        Some(d)
    }

    /// Pack documents of domain `d` into one row; returns the tokens written (less than the
    /// row only at the end of a validation pass).
    fn fill_row(&mut self, d: Domain, row: &mut [u32], mask: &mut [u8]) -> Result<usize> {
        let mut at = 0;
        while at < row.len() {
            let Some(doc) = self.current_doc(d)? else {
                break;
            };
            let (taken, rest) = self.copy_doc(d, doc, &mut row[at..], &mut mask[at..]);
            at += taken;
            self.streams.get_mut(&d).expect("stream").cur.current = rest;
            if rest.is_none() {
                self.release(d, doc.0);
            }
        }
        Ok(at)
    }

    /// Copy document `(g, r, used)` of domain `d`, then `<|endoftext|>`, from its token `used`
    /// into `row` as far as it goes; the tokens written, and the document's reference to
    /// continue from unless it is finished.
    fn copy_doc(
        &self,
        d: Domain,
        (g, r, used): (u32, u32, u32),
        row: &mut [u32],
        mask: &mut [u8],
    ) -> (usize, Option<(u32, u32, u32)>) {
        let doc = &self.cache[&(d, g)];
        let (a, b) = doc.rows[r as usize].expect("buffered rows are in the split");
        let len = b - a + 1;
        let take = (len - used as usize).min(row.len());
        for k in 0..take {
            let pos = used as usize + k;
            row[k] = if pos < b - a {
                doc.tokens[a + pos]
            } else {
                self.plan.eot
            };
            mask[k] = u8::from(!(self.cfg.boundary_mask && pos == 0));
        }
        let rest = (used as usize + take < len).then_some((g, r, used + take as u32));
        (take, rest)
    }

    /// The document being packed, taking a new one from the shuffle buffer if needed.
    fn current_doc(&mut self, d: Domain) -> Result<Option<(u32, u32, u32)>> {
        if let Some(c) = self.streams[&d].cur.current {
            return Ok(Some(c));
        }
        self.refill(d)?;
        let shuffle = self.cfg.shuffle && self.cfg.split == Split::Train;
        let s = self.streams.get_mut(&d).expect("stream");
        if s.cur.buffer.is_empty() {
            return Ok(None);
        }
        let i = if shuffle {
            s.cur.rng = splitmix(s.cur.rng);
            (s.cur.rng % s.cur.buffer.len() as u64) as usize
        } else {
            0
        };
        let (g, r) = if shuffle {
            s.cur.buffer.swap_remove(i)
        } else {
            s.cur.buffer.remove(0)
        };
        s.cur.current = Some((g, r, 0));
        Ok(Some((g, r, 0)))
    }

    fn release(&mut self, d: Domain, g: u32) {
        let s = &self.streams[&d];
        let in_lane = self
            .lanes
            .iter()
            .any(|l| l.current.is_some_and(|c| c.0 == d && c.1 == g));
        if !in_lane && !s.cur.buffer.iter().any(|(x, _)| *x == g) && s.cur.current.is_none_or(|(x, _, _)| x != g) {
            self.cache.remove(&(d, g));
        }
    }

    /// Top up the shuffle buffer from the next row groups in plan order.
    fn refill(&mut self, d: Domain) -> Result<()> {
        let cap = if self.cfg.shuffle && self.cfg.split == Split::Train {
            self.cfg.shuffle_buffer.max(1)
        } else {
            1
        };
        let mut empty_epochs = 0;
        loop {
            self.request_ahead(d);
            let s = &self.streams[&d];
            if s.cur.buffer.len() >= cap {
                return Ok(());
            }
            if s.cur.next >= s.order.len() {
                if self.cfg.split == Split::Validation {
                    return Ok(());
                }
                let s = self.streams.get_mut(&d).expect("stream");
                if s.cur.buffer.is_empty() && s.cur.current.is_none() {
                    empty_epochs += 1;
                    if empty_epochs > 1 {
                        return Err(Error::Invalid(format!(
                            "domain {d} has no documents in the {:?} split",
                            self.cfg.split
                        )));
                    }
                }
                s.cur.epoch += 1;
                s.cur.next = 0;
                s.order = epoch_order(s.groups.len(), &self.cfg, d, s.cur.epoch);
                continue;
            }
            let key = (d, s.cur.epoch, s.cur.next);
            let g = s.order[s.cur.next] as u32;
            let decoded = Arc::new(self.take(key)?);
            let s = self.streams.get_mut(&d).expect("stream");
            s.cur.next += 1;
            s.requested.pop_front();
            let rows: Vec<(u32, u32)> = decoded
                .rows
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_some())
                .map(|(i, _)| (g, i as u32))
                .collect();
            if !rows.is_empty() {
                s.cur.buffer.extend(rows);
                self.cache.insert((d, g), decoded);
            }
        }
    }

    /// Keep `lookahead` row groups of this domain requested from the workers, across
    /// epoch boundaries, so a new epoch starts without a stall.
    fn request_ahead(&mut self, d: Domain) {
        let look = self.cfg.lookahead.max(1);
        let validation = self.cfg.split == Split::Validation;
        let cfg = self.cfg.clone();
        let s = self.streams.get_mut(&d).expect("stream");
        while s.requested.len() < look {
            let (mut epoch, mut pos) = s.ahead;
            if pos >= s.groups.len() {
                if validation || s.groups.is_empty() {
                    return;
                }
                epoch += 1;
                pos = 0;
            }
            let order = if epoch == s.cur.epoch {
                s.order.clone()
            } else {
                epoch_order(s.groups.len(), &cfg, d, epoch)
            };
            let key = (s.domain, epoch, pos);
            let _ = self.tasks.send(Task {
                key,
                group: s.groups[order[pos]].clone(),
            });
            s.requested.push_back(key);
            s.ahead = (epoch, pos + 1);
        }
    }

    /// Wait for a specific decoded row group, keeping others that arrive first.
    fn take(&mut self, key: Key) -> Result<Decoded> {
        loop {
            if let Some(r) = self.arrived.remove(&key) {
                return r;
            }
            match self.done.recv() {
                Ok((k, r)) => {
                    self.arrived.insert(k, r);
                }
                Err(_) => return Err(Error::Invalid("loader workers stopped".into())),
            }
        }
    }
}

fn epoch_order(n: usize, cfg: &LoaderConfig, d: Domain, epoch: u64) -> Vec<usize> {
    if cfg.shuffle && cfg.split == Split::Train {
        permutation(
            n,
            cfg.seed ^ splitmix(epoch.wrapping_mul(31).wrapping_add(d as u64 + 7)),
        )
    } else {
        (0..n).collect()
    }
}

/// Parse `text=0.4,code=0.4,mixed=0.2`.
pub fn parse_weights(s: &str) -> Result<BTreeMap<Domain, f64>, String> {
    let mut w = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (d, v) = part
            .split_once('=')
            .ok_or_else(|| format!("weight {part:?} must look like domain=0.4"))?;
        let v: f64 = v.trim().parse().map_err(|_| format!("weight {v:?} is not a number"))?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("weight {v} must be finite and non-negative"));
        }
        w.insert(d.trim().parse()?, v);
    }
    if w.values().all(|v| *v == 0.0) {
        return Err("at least one weight must be positive".into());
    }
    Ok(w)
}
