//! The per-shard write-ahead log: recovery at start-up and group commit while serving.
//!
//! Writers append records to an in-memory pending batch and wait for their sequence number
//! to be acknowledged. One flusher task per shard takes everything pending, writes it as one
//! block-aligned batch (one O_DIRECT write), and, under `SyncPolicy::Always`, one
//! `fdatasync`; then it acknowledges the whole batch. Writes that arrive during that I/O form
//! the next batch, so the cost of a sync is shared by everyone who waited for it.
//!
//! A failed write or sync stops the write path for good (fail-stop): the batch's writers
//! get an error, later writes are refused, and a restart recovers from what the disk holds.
//! After a failed `fdatasync` the kernel may already have dropped the dirty state, so
//! retrying it could report success for data that is gone.

pub mod format;
mod recovery;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use crate::event::Event;
use crate::storage::{block_align_up, Storage, StorageFile, BLOCK_SIZE};
use format::{Record, SegmentHeader, BATCH_HEADER_SIZE, BATCH_PAYLOAD_SIZE_MAX, BATCH_PAYLOAD_SIZE_TARGET};
use recovery::{recover, Recovered};

/// Size a segment is preallocated to; a new segment starts when a batch would not fit.
pub const SEGMENT_SIZE: u64 = 64 << 20;
/// Bytes of records that may wait for the flusher; writers beyond it wait for room (a record
/// larger than this is let in once nothing else is pending).
pub const PENDING_SIZE_MAX: usize = 3 * BATCH_PAYLOAD_SIZE_TARGET;

const _: () = assert!(SEGMENT_SIZE >= BLOCK_SIZE as u64 + 2 * BATCH_PAYLOAD_SIZE_MAX as u64);

/// When an append counts as acknowledged, and what each choice can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Acknowledge after the batch's `fdatasync`: survives a process crash and a power loss.
    Always,
    /// Acknowledge after the batch's write reaches the device; `fdatasync` every interval.
    /// Survives a process crash; a power loss can lose up to one interval of writes.
    Interval(Duration),
    /// Acknowledge after the write; `fdatasync` only at shutdown. Survives a
    /// process crash; a power loss can lose whatever the device had not persisted.
    Never,
}

impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncPolicy::Always => write!(f, "always"),
            SyncPolicy::Never => write!(f, "never"),
            SyncPolicy::Interval(interval) => write!(f, "interval:{}", interval.as_millis()),
        }
    }
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<SyncPolicy, String> {
        match text {
            "always" => Ok(SyncPolicy::Always),
            "never" => Ok(SyncPolicy::Never),
            _ => {
                let ms = text
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| format!("expected always, never or interval:MS, got {text:?}"))?;
                Ok(SyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalError {
    /// An I/O error during recovery.
    Io {
        path: PathBuf,
        message: String,
    },
    /// Damage that is not a torn tail: startup must stop.
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    /// The write path stopped after an I/O error; the node must be restarted.
    Failed {
        message: Rc<str>,
    },
    /// The file system is full: writes are refused until space is freed.
    NoSpace,
    ShuttingDown,
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { path, message } => write!(f, "{}: {message}", path.display()),
            WalError::Corrupt { path, offset, detail } => {
                write!(f, "{}: corrupt at offset {offset}: {detail}", path.display())
            }
            WalError::Failed { message } => {
                write!(f, "write-ahead log stopped after an I/O error: {message}")
            }
            WalError::NoSpace => write!(f, "no space left on the data directory's file system"),
            WalError::ShuttingDown => write!(f, "shutting down"),
        }
    }
}

impl std::error::Error for WalError {}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segment_count: usize,
    pub record_count: u64,
    /// A torn tail that was cut off: the file and the offset it now ends at.
    pub truncated: Option<(PathBuf, u64)>,
    /// Damage in segments written under `interval` or `never` (acknowledged before sync):
    /// the file and offset from which records were dropped.
    pub lossy: Vec<(PathBuf, u64)>,
    pub next_seq: u64,
}

/// Which shard a log belongs to; every segment header records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardIdentity {
    pub shard_index: u32,
    pub shard_count: u32,
}

fn segment_name(segment_index: u64) -> String {
    format!("wal-{segment_index:016}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?.strip_suffix(".log")?.parse().ok()
}

/// Records appended but not yet taken by the flusher, built in place as the next batch:
/// room for the batch header, then the records, so that taking a batch copies nothing.
struct Pending {
    batch: Vec<u8>,
    /// End offset in the payload (after the header) of each record, so a batch can be cut
    /// at a record boundary.
    record_ends: VecDeque<usize>,
    first_seq: u64,
    /// A written batch's buffer, kept to build the next one in (no allocation per batch).
    spare: Option<Vec<u8>>,
}

impl Pending {
    fn new(first_seq: u64) -> Pending {
        Pending { batch: vec![0; BATCH_HEADER_SIZE], record_ends: VecDeque::new(), first_seq, spare: None }
    }

    /// Gives back a batch's buffer once it is written.
    fn recycle(&mut self, mut buffer: Vec<u8>) {
        // A buffer grown by a burst is not kept beyond a few batches' worth.
        if buffer.capacity() <= 2 * BATCH_PAYLOAD_SIZE_TARGET {
            buffer.clear();
            self.spare = Some(buffer);
        }
    }

    fn payload_size(&self) -> usize {
        self.batch.len() - BATCH_HEADER_SIZE
    }

    fn clear(&mut self) {
        self.batch.truncate(BATCH_HEADER_SIZE);
        self.record_ends.clear();
    }

    /// Takes the first `cut` payload bytes (whole records: `record_count` of them) as a
    /// sealed batch; the records after them stay pending.
    fn take(&mut self, cut: usize, record_count: u64) -> Vec<u8> {
        let mut rest = self.spare.take().unwrap_or_default();
        rest.resize(BATCH_HEADER_SIZE, 0);
        rest.extend_from_slice(&self.batch[BATCH_HEADER_SIZE + cut..]);
        let mut batch = std::mem::replace(&mut self.batch, rest);
        batch.truncate(BATCH_HEADER_SIZE + cut);
        format::seal_batch(&mut batch, self.first_seq, record_count as u32);
        self.first_seq += record_count;
        batch
    }
}

struct State {
    next_seq: u64,
    pending: Pending,
    waiters: VecDeque<(u64, oneshot::Sender<Result<(), WalError>>)>,
    failed: Option<WalError>,
    closing: bool,
}

struct Shared<S: Storage> {
    storage: S,
    dir: PathBuf,
    identity: ShardIdentity,
    policy: SyncPolicy,
    state: RefCell<State>,
    /// Highest sequence number acknowledged under the policy.
    acked_seq: Cell<u64>,
    /// Wakes the flusher: records are pending or the log is closing.
    work: Event,
    /// Wakes writers waiting for room in the pending buffer.
    room: Event,
    /// Set by the flusher once a close has written and synced everything.
    closed: Cell<bool>,
    /// The next segment could not be prepared for want of space: new writes are refused
    /// (those already accepted still fit in the current segment) until a retry succeeds.
    no_space: Cell<bool>,
    /// (segment index, first seq) of every segment on disk, oldest first; the last is the
    /// one being written.
    segments: RefCell<VecDeque<(u64, u64)>>,
    /// A next segment is prepared on disk (allocated, not yet started).
    prepared: Cell<bool>,
    bytes_written: Cell<u64>,
    batch_count: Cell<u64>,
    /// Time from a batch write's start to its completion, summed over batches.
    write_wait_us: Cell<u64>,
    sync_count: Cell<u64>,
}

struct Segment<F> {
    file: F,
    path: PathBuf,
    segment_index: u64,
    write_offset: u64,
    synced: bool,
}

/// The write-ahead log of one shard. Cheap to clone; all clones share one log.
pub struct Wal<S: Storage> {
    shared: Rc<Shared<S>>,
}

impl<S: Storage> Clone for Wal<S> {
    fn clone(&self) -> Self {
        Wal { shared: self.shared.clone() }
    }
}

impl<S: Storage> Wal<S> {
    /// Replays every segment in `dir` through `apply`, cuts off a torn tail, starts a new
    /// segment and spawns the flusher on the current glommio executor.
    ///
    /// Records up to `flushed_seq` are already in sorted tables: they are not replayed, the
    /// segments that held only such records may be gone, and new records are numbered after
    /// it.
    pub async fn open(
        storage: S,
        dir: &Path,
        identity: ShardIdentity,
        policy: SyncPolicy,
        flushed_seq: u64,
        mut apply: impl FnMut(&Record<'_>),
    ) -> Result<(Wal<S>, RecoveryReport), WalError> {
        let io_error = |path: &Path, error: std::io::Error| WalError::Io {
            path: path.to_path_buf(),
            message: error.to_string(),
        };
        let Recovered { report, mut segments, headerless, last_index } =
            recover(&storage, dir, identity, flushed_seq, &mut apply).await?;

        // New records go to a new segment, or to a prepared one that never got a header.
        let (segment_index, file) = match headerless {
            Some(index) => (index, reopen_prepared(&storage, &dir.join(segment_name(index))).await),
            None => {
                let index = last_index.map_or(1, |last| last + 1);
                (index, prepare_segment(&storage, dir, index).await)
            }
        };
        let path = dir.join(segment_name(segment_index));
        let file = file.map_err(|e| io_error(&path, e))?;
        let segment = start_segment(file, path.clone(), identity, policy, segment_index, report.next_seq)
            .await
            .map_err(|e| io_error(&path, e))?;
        segments.push_back((segment_index, report.next_seq));

        let shared = Rc::new(Shared {
            storage,
            dir: dir.to_path_buf(),
            identity,
            policy,
            state: RefCell::new(State {
                next_seq: report.next_seq,
                pending: Pending::new(report.next_seq),
                waiters: VecDeque::new(),
                failed: None,
                closing: false,
            }),
            acked_seq: Cell::new(report.next_seq - 1),
            work: Event::default(),
            room: Event::default(),
            closed: Cell::new(false),
            no_space: Cell::new(false),
            segments: RefCell::new(segments),
            prepared: Cell::new(false),
            bytes_written: Cell::new(0),
            batch_count: Cell::new(0),
            write_wait_us: Cell::new(0),
            sync_count: Cell::new(0),
        });
        glommio::spawn_local(flusher(shared.clone(), segment)).detach();
        Ok((Wal { shared }, report))
    }

    /// The next sequence number `append` will assign.
    pub fn next_seq(&self) -> u64 {
        self.shared.state.borrow().next_seq
    }

    /// Highest sequence number acknowledged under the sync policy.
    pub fn acked_seq(&self) -> u64 {
        self.shared.acked_seq.get()
    }

    pub fn batch_count(&self) -> u64 {
        self.shared.batch_count.get()
    }

    /// Microseconds batch writes took from their start to their completion, summed (with
    /// `log_batch_count`, the mean time a writer waits for the device).
    pub fn write_wait_us(&self) -> u64 {
        self.shared.write_wait_us.get()
    }

    pub fn sync_count(&self) -> u64 {
        self.shared.sync_count.get()
    }

    /// Bytes written to log segments since the shard started.
    pub fn bytes_written(&self) -> u64 {
        self.shared.bytes_written.get()
    }

    pub fn segment_count(&self) -> usize {
        self.shared.segments.borrow().len()
    }

    /// Bytes the log takes on disk: its segments, and the next one once it is prepared
    /// (segments are allocated whole).
    pub fn disk_bytes(&self) -> u64 {
        let files = self.shared.segments.borrow().len() + usize::from(self.shared.prepared.get());
        files as u64 * SEGMENT_SIZE
    }

    /// The error that stopped the write path, if one did.
    pub fn failure(&self) -> Option<WalError> {
        self.shared.state.borrow().failed.clone()
    }

    /// Whether new writes are refused for want of space.
    pub fn no_space(&self) -> bool {
        self.shared.no_space.get()
    }

    /// Stops the write path for good, as a failed log write would (for a failed table
    /// sync, after which the shard must not accept writes).
    pub fn fail_stop(&self, message: &str) {
        self.shared.fail(WalError::Failed { message: message.into() });
    }

    /// Removes the segments that hold only records up to `flushed_seq` (now in durable
    /// sorted tables). The segment being written is never removed.
    pub async fn release_through(&self, flushed_seq: u64) -> Result<(), WalError> {
        let mut removed = false;
        loop {
            let oldest = {
                let segments = self.shared.segments.borrow();
                match (segments.front(), segments.get(1)) {
                    // A segment's records end where the next one's begin.
                    (Some(&(index, _)), Some(&(_, next_first_seq))) if next_first_seq <= flushed_seq + 1 => {
                        Some(index)
                    }
                    _ => None,
                }
            };
            let Some(index) = oldest else { break };
            let path = self.shared.dir.join(segment_name(index));
            self.shared
                .storage
                .remove(&path)
                .await
                .map_err(|error| WalError::Io { path: path.clone(), message: error.to_string() })?;
            self.shared.segments.borrow_mut().pop_front();
            removed = true;
        }
        if removed {
            // Not needed for safety (recovery skips flushed records), but frees the space
            // for good.
            let dir = &self.shared.dir;
            self.shared
                .storage
                .sync_dir(dir)
                .await
                .map_err(|error| WalError::Io { path: dir.clone(), message: error.to_string() })?;
        }
        Ok(())
    }

    /// Waits until the pending buffer has room for `size` more bytes. The caller must call
    /// `append` without awaiting anything in between, so no other writer can take the room.
    pub async fn reserve(&self, size: usize) -> Result<(), WalError> {
        loop {
            let listener = self.shared.room.listen();
            {
                let state = self.shared.state.borrow();
                if let Some(error) = &state.failed {
                    return Err(error.clone());
                }
                if state.closing {
                    return Err(WalError::ShuttingDown);
                }
                if self.shared.no_space.get() {
                    return Err(WalError::NoSpace);
                }
                let pending_size = state.pending.payload_size();
                if pending_size == 0 || pending_size + size <= PENDING_SIZE_MAX {
                    return Ok(());
                }
            }
            listener.await;
        }
    }

    /// Adds a record to the pending batch and returns its sequence number (the record's own
    /// `seq` is ignored). Durability comes later: wait for it with [`Wal::wait_acked`].
    pub fn append(&self, record: &Record<'_>) -> Result<u64, WalError> {
        let mut state = self.shared.state.borrow_mut();
        if let Some(error) = &state.failed {
            return Err(error.clone());
        }
        if state.closing {
            return Err(WalError::ShuttingDown);
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let pending = &mut state.pending;
        if pending.record_ends.is_empty() {
            pending.first_seq = seq;
        }
        format::encode_record(&mut pending.batch, &Record { seq, ..*record });
        let end = pending.payload_size();
        pending.record_ends.push_back(end);
        debug_assert_eq!(pending.first_seq + pending.record_ends.len() as u64, state.next_seq);
        drop(state);
        self.shared.work.notify_all();
        Ok(seq)
    }

    /// Completes when `seq` is acknowledged under the sync policy, or fails with the error
    /// that stopped the log before it was.
    pub async fn wait_acked(&self, seq: u64) -> Result<(), WalError> {
        if seq <= self.shared.acked_seq.get() {
            return Ok(());
        }
        let receiver = {
            let mut state = self.shared.state.borrow_mut();
            if let Some(error) = &state.failed {
                return Err(error.clone());
            }
            let (sender, receiver) = oneshot::channel();
            // Waiters are kept in sequence order; appends are in order, but a reader may wait
            // for an older sequence number than the newest writer.
            let position = state.waiters.partition_point(|(waiting, _)| *waiting <= seq);
            state.waiters.insert(position, (seq, sender));
            receiver
        };
        receiver.await.unwrap_or(Err(WalError::ShuttingDown))
    }

    /// Writes and syncs everything pending, whatever the policy, then stops the flusher.
    pub async fn close(&self) -> Result<(), WalError> {
        self.shared.state.borrow_mut().closing = true;
        self.shared.work.notify_all();
        self.shared.room.notify_all();
        loop {
            let listener = self.shared.room.listen();
            if self.shared.closed.get() {
                return Ok(());
            }
            if let Some(error) = self.shared.state.borrow().failed.clone() {
                return Err(error);
            }
            listener.await;
        }
    }
}

impl<S: Storage> Shared<S> {
    fn acknowledge(&self, seq: u64) {
        debug_assert!(seq >= self.acked_seq.get());
        self.acked_seq.set(seq);
        let mut state = self.state.borrow_mut();
        while state.waiters.front().is_some_and(|(waiting, _)| *waiting <= seq) {
            if let Some((_, sender)) = state.waiters.pop_front() {
                let _ = sender.send(Ok(()));
            }
        }
    }

    fn fail(&self, error: WalError) {
        tracing::error!(shard = self.identity.shard_index, "{error}; refusing writes until restart");
        let mut state = self.state.borrow_mut();
        state.failed = Some(error.clone());
        state.pending.clear();
        for (_, sender) in state.waiters.drain(..) {
            let _ = sender.send(Err(error.clone()));
        }
        drop(state);
        self.room.notify_all();
    }

    /// Cuts the next batch off the pending records: as many whole records as fit in the
    /// target, and always the first.
    fn take_batch(&self) -> Option<(u64, u64, Vec<u8>)> {
        let mut state = self.state.borrow_mut();
        let pending = &mut state.pending;
        let &first_end = pending.record_ends.front()?;
        assert!(first_end <= BATCH_PAYLOAD_SIZE_MAX);
        let mut record_count = 0;
        let mut cut = 0;
        while let Some(&end) = pending.record_ends.front() {
            if end > BATCH_PAYLOAD_SIZE_TARGET && record_count > 0 {
                break;
            }
            cut = end;
            record_count += 1;
            pending.record_ends.pop_front();
        }
        for end in pending.record_ends.iter_mut() {
            *end -= cut;
        }
        let first_seq = pending.first_seq;
        let batch = pending.take(cut, record_count);
        Some((first_seq, first_seq + record_count - 1, batch))
    }
}

/// Creates segment file `segment_index`, allocated to `SEGMENT_SIZE` (reads as zeros), with
/// its allocation and its directory entry durable. It holds no header yet: an all-zero
/// segment is empty.
///
/// Measured here: zero-filling the segment instead (so that later syncs flush only data)
/// doubled write p99 under `always`, because every device cache flush then also flushes the
/// background zeros; fallocate's unwritten extents cost less.
async fn prepare_segment<S: Storage>(
    storage: &S,
    dir: &Path,
    segment_index: u64,
) -> std::io::Result<S::File> {
    let path = dir.join(segment_name(segment_index));
    let file = storage.create(&path).await?;
    file.allocate(SEGMENT_SIZE).await?;
    file.sync_data().await?;
    // The segment's directory entry must be durable before any record in it is acknowledged.
    storage.sync_dir(dir).await?;
    Ok(file)
}

/// Prepares segment `segment_index`, waiting for space while the file system is full (the
/// log refuses new writes meanwhile). Other errors are returned.
async fn prepare_segment_when_space<S: Storage>(
    shared: &Shared<S>,
    segment_index: u64,
) -> std::io::Result<S::File> {
    loop {
        match prepare_segment(&shared.storage, &shared.dir, segment_index).await {
            Ok(file) => {
                shared.prepared.set(true);
                if shared.no_space.replace(false) {
                    tracing::info!(
                        shard = shared.identity.shard_index,
                        "space available again; accepting writes"
                    );
                }
                return Ok(file);
            }
            Err(error) if crate::storage::is_no_space(&error) => {
                if !shared.no_space.replace(true) {
                    tracing::warn!(
                        shard = shared.identity.shard_index,
                        "no space for the next log segment; refusing writes until there is"
                    );
                    shared.room.notify_all();
                }
                let _ = shared.storage.remove(&shared.dir.join(segment_name(segment_index))).await;
                if shared.state.borrow().closing {
                    return Err(error);
                }
                glommio::timer::sleep(NO_SPACE_RETRY_INTERVAL).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How often a log that ran out of space tries again.
pub const NO_SPACE_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Opens a prepared segment that recovery found without a header; its preparation may have
/// been cut short by a crash, so it is allocated again where needed.
async fn reopen_prepared<S: Storage>(storage: &S, path: &Path) -> std::io::Result<S::File> {
    let file = storage.open(path).await?;
    if file.size().await? < SEGMENT_SIZE {
        file.allocate(SEGMENT_SIZE).await?;
        file.sync_data().await?;
    }
    Ok(file)
}

/// Opens a prepared (all-zero) segment for records from `first_seq`: writes its header and
/// makes it durable.
async fn start_segment<F: StorageFile>(
    file: F,
    path: PathBuf,
    identity: ShardIdentity,
    policy: SyncPolicy,
    segment_index: u64,
    first_seq: u64,
) -> std::io::Result<Segment<F>> {
    let flags = match policy {
        SyncPolicy::Always => 0,
        SyncPolicy::Interval(_) | SyncPolicy::Never => format::SEGMENT_FLAG_ACK_BEFORE_SYNC,
    };
    let header = SegmentHeader {
        shard_index: identity.shard_index,
        shard_count: identity.shard_count,
        flags,
        segment_index,
        first_seq,
    };
    file.write_at(0, &format::encode_segment_header(&header)).await?;
    file.sync_data().await?;
    Ok(Segment { file, path, segment_index, write_offset: BLOCK_SIZE as u64, synced: true })
}

async fn flusher<S: Storage>(shared: Rc<Shared<S>>, mut segment: Segment<S::File>) {
    let mut last_sync = Instant::now();
    // The next segment, prepared in the background once this one is half full (a few
    // milliseconds of metadata I/O kept off the write path), so that rotation costs one
    // header write and its sync.
    let mut next_segment: Option<glommio::task::JoinHandle<std::io::Result<S::File>>> = None;
    loop {
        let listener = shared.work.listen();
        let has_work = !shared.state.borrow().pending.record_ends.is_empty();
        if !has_work {
            if shared.state.borrow().closing {
                break;
            }
            match shared.policy {
                SyncPolicy::Interval(interval) if !segment.synced => {
                    let deadline = last_sync + interval;
                    let sleep = glommio::timer::sleep(deadline.saturating_duration_since(Instant::now()));
                    futures_lite::future::or(listener, sleep).await;
                    if Instant::now() >= deadline {
                        if let Err(error) = sync_segment(&shared, &mut segment).await {
                            return shared.fail(error);
                        }
                        last_sync = Instant::now();
                    }
                }
                _ => listener.await,
            }
            continue;
        }
        let Some((first_seq, last_seq, batch)) = shared.take_batch() else { continue };
        shared.room.notify_all();
        if next_segment.is_none() && segment.write_offset > SEGMENT_SIZE / 2 {
            let (preparing, index) = (shared.clone(), segment.segment_index + 1);
            let task =
                glommio::spawn_local(async move { prepare_segment_when_space(&preparing, index).await });
            next_segment = Some(task.detach());
        }
        if let Err(error) = write_batch(&shared, &mut segment, &mut next_segment, first_seq, &batch).await {
            return shared.fail(error);
        }
        shared.state.borrow_mut().pending.recycle(batch);

        shared.batch_count.set(shared.batch_count.get() + 1);
        let sync_now = match shared.policy {
            SyncPolicy::Always => true,
            SyncPolicy::Interval(interval) => last_sync.elapsed() >= interval,
            SyncPolicy::Never => false,
        };
        if sync_now {
            if let Err(error) = sync_segment(&shared, &mut segment).await {
                return shared.fail(error);
            }
            last_sync = Instant::now();
        }
        shared.acknowledge(last_seq);
    }
    // Closing: make everything durable whatever the policy, then report the log closed.
    if let Err(error) = sync_segment(&shared, &mut segment).await {
        return shared.fail(error);
    }
    let _ = segment.file.close().await;
    shared.closed.set(true);
    shared.room.notify_all();
}

async fn sync_segment<S: Storage>(
    shared: &Shared<S>,
    segment: &mut Segment<S::File>,
) -> Result<(), WalError> {
    if segment.synced {
        return Ok(());
    }
    segment.file.sync_data().await.map_err(|error| WalError::Failed {
        message: format!("fdatasync {}: {error}", segment.path.display()).into(),
    })?;
    shared.sync_count.set(shared.sync_count.get() + 1);
    segment.synced = true;
    Ok(())
}

async fn write_batch<S: Storage>(
    shared: &Rc<Shared<S>>,
    segment: &mut Segment<S::File>,
    next_segment: &mut Option<glommio::task::JoinHandle<std::io::Result<S::File>>>,
    first_seq: u64,
    batch: &[u8],
) -> Result<(), WalError> {
    debug_assert_eq!(batch.len() % BLOCK_SIZE, 0);
    if segment.write_offset + batch.len() as u64 > SEGMENT_SIZE {
        if shared.policy == SyncPolicy::Always {
            // Everything in the old segment is durable before the log moves on (a no-op:
            // every batch was synced), so recovery may treat damage anywhere but in the
            // newest segment as corruption.
            sync_segment(shared, segment).await?;
        }
        let next_index = segment.segment_index + 1;
        let failed =
            |error: std::io::Error| WalError::Failed { message: format!("new log segment: {error}").into() };
        let prepared = match next_segment.take() {
            Some(task) => {
                task.await.unwrap_or_else(|| Err(std::io::Error::other("segment preparation cancelled")))
            }
            None => prepare_segment_when_space(shared, next_index).await,
        };
        let path = shared.dir.join(segment_name(next_index));
        let next = start_segment(
            prepared.map_err(failed)?,
            path,
            shared.identity,
            shared.policy,
            next_index,
            first_seq,
        )
        .await
        .map_err(failed)?;
        shared.segments.borrow_mut().push_back((next_index, first_seq));
        shared.prepared.set(false);
        let mut old = std::mem::replace(segment, next);
        if old.synced || shared.policy == SyncPolicy::Never {
            // `never` means never: syncing a whole segment at rotation (ext4 commits its
            // extents, about 100 ms here) stalled every writer behind it.
            let _ = old.file.close().await;
        } else {
            // Under `interval`, the old segment's last interval is synced beside new writes.
            let shared = shared.clone();
            glommio::spawn_local(async move {
                match sync_segment(&shared, &mut old).await {
                    Ok(()) => {
                        let _ = old.file.close().await;
                    }
                    Err(error) => shared.fail(error),
                }
            })
            .detach();
        }
    }
    let offset = segment.write_offset;
    debug_assert_eq!(block_align_up(offset), offset);
    let started = Instant::now();
    segment.file.write_at(offset, batch).await.map_err(|error| WalError::Failed {
        message: format!("write {} at offset {offset}: {error}", segment.path.display()).into(),
    })?;
    shared.write_wait_us.set(shared.write_wait_us.get() + started.elapsed().as_micros() as u64);
    segment.write_offset += batch.len() as u64;
    shared.bytes_written.set(shared.bytes_written.get() + batch.len() as u64);
    segment.synced = false;
    debug_assert!(batch.len() >= BATCH_HEADER_SIZE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_policy_parses() {
        assert_eq!("always".parse(), Ok(SyncPolicy::Always));
        assert_eq!("never".parse(), Ok(SyncPolicy::Never));
        assert_eq!("interval:5".parse(), Ok(SyncPolicy::Interval(Duration::from_millis(5))));
        assert!("interval:0".parse::<SyncPolicy>().is_err());
        assert!("sometimes".parse::<SyncPolicy>().is_err());
    }
}
