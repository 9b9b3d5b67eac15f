//! One shard's key-value store: an in-memory index owned by the shard's thread (so no lock
//! guards it) in front of the shard's write-ahead log.
//!
//! A mutation is checked, logged and applied to the index in one synchronous step, with no
//! await in between, which makes CAS atomic per key. Its reply waits until the log
//! acknowledges it. A read that finds a version not yet acknowledged waits for it too, so no
//! client ever sees a value that a crash could take back.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use schema::Status;

use crate::clock::{now_ms, Hlc};
use crate::command::{Command, LocalReply, Reply, Version};
use crate::storage::Storage;
use crate::wal::format::{Record, RecordKind};
use crate::wal::{RecoveryReport, ShardIdentity, SyncPolicy, Wal, WalError};

/// The newest version of a key. A deletion is kept as a tombstone (`value: None`) until it
/// is acknowledged, so that reads wait for it like for any other write.
#[derive(Debug, Clone)]
struct Entry {
    value: Option<Rc<[u8]>>,
    timestamp_us: u64,
    /// Unix milliseconds; 0 for never.
    expires_at_ms: u64,
    seq: u64,
}

impl Entry {
    fn is_live(&self, now_ms: u64) -> bool {
        self.value.is_some() && (self.expires_at_ms == 0 || now_ms < self.expires_at_ms)
    }

    fn version(&self, now_ms: u64, with_value: bool) -> Version<Rc<[u8]>> {
        let ttl_left_ms =
            if self.expires_at_ms == 0 { 0 } else { self.expires_at_ms.saturating_sub(now_ms).max(1) };
        Version {
            value: if with_value { self.value.clone() } else { None },
            timestamp_us: self.timestamp_us,
            ttl_left_ms,
        }
    }
}

fn expiry(now_ms: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now_ms + ttl_ms
    }
}

fn read_reply(entry: &Entry, now_ms: u64, metadata_only: bool) -> LocalReply {
    if entry.is_live(now_ms) {
        Reply::Found(entry.version(now_ms, !metadata_only))
    } else {
        Reply::NotFound
    }
}

fn internal(error: WalError) -> LocalReply {
    match error {
        WalError::ShuttingDown => Reply::error(Status::UNAVAILABLE, "shutting down"),
        error => Reply::error(Status::INTERNAL, error.to_string()),
    }
}

pub struct Store<S: Storage> {
    index: RefCell<HashMap<Box<[u8]>, Entry, ahash::RandomState>>,
    wal: Wal<S>,
    hlc: Hlc,
}

impl<S: Storage> Store<S> {
    /// Recovers the shard from its log in `dir`.
    pub async fn open(
        storage: S,
        dir: &Path,
        identity: ShardIdentity,
        policy: SyncPolicy,
    ) -> Result<(Store<S>, RecoveryReport), WalError> {
        let mut index: HashMap<Box<[u8]>, Entry, ahash::RandomState> = HashMap::default();
        let hlc = Hlc::default();
        let replay_now_ms = now_ms();
        let (wal, report) = Wal::open(storage, dir, identity, policy, |record| {
            hlc.observe(record.timestamp_us);
            let expired = record.expires_at_ms != 0 && record.expires_at_ms <= replay_now_ms;
            if record.kind == RecordKind::Delete || expired {
                index.remove(record.key);
                return;
            }
            let entry = Entry {
                value: Some(Rc::from(record.value)),
                timestamp_us: record.timestamp_us,
                expires_at_ms: record.expires_at_ms,
                seq: record.seq,
            };
            index.insert(Box::from(record.key), entry);
        })
        .await?;
        Ok((Store { index: RefCell::new(index), wal, hlc }, report))
    }

    pub fn wal(&self) -> &Wal<S> {
        &self.wal
    }

    /// Number of keys in the index, tombstones and expired keys not yet dropped included.
    pub fn key_count(&self) -> usize {
        self.index.borrow().len()
    }

    pub async fn apply(&self, command: Command) -> LocalReply {
        match command {
            Command::Get { key, metadata_only } => self.get(&key, metadata_only).await,
            Command::Put { key, value, ttl_ms } => self.put(&key, &value, ttl_ms).await,
            Command::Delete { key } => self.delete(&key).await,
            Command::Cas { key, expected, new_value, ttl_ms } => {
                self.cas(&key, expected.as_deref(), &new_value, ttl_ms).await
            }
        }
    }

    /// The newest entry of `key`, dropping acknowledged tombstones and expired values on
    /// the way (the log keeps them until it is truncated).
    fn lookup(&self, key: &[u8], now_ms: u64) -> Option<Entry> {
        let mut index = self.index.borrow_mut();
        let entry = index.get(key)?;
        if !entry.is_live(now_ms) && entry.seq <= self.wal.acked_seq() {
            index.remove(key);
            return None;
        }
        Some(entry.clone())
    }

    /// The reply to a GET if nothing needs to wait (the key is absent or its newest entry is
    /// acknowledged); otherwise the entry to wait for.
    fn read_now(&self, key: &[u8], metadata_only: bool) -> Result<LocalReply, (Entry, u64)> {
        let now_ms = now_ms();
        let Some(entry) = self.lookup(key, now_ms) else { return Ok(Reply::NotFound) };
        if entry.seq > self.wal.acked_seq() {
            return Err((entry, now_ms));
        }
        Ok(read_reply(&entry, now_ms, metadata_only))
    }

    /// Answers a GET at once when nothing needs to wait. `None`: the newest entry is still in
    /// flight; use [`Store::get`].
    pub fn try_get(&self, key: &[u8], metadata_only: bool) -> Option<LocalReply> {
        self.read_now(key, metadata_only).ok()
    }

    pub async fn get(&self, key: &[u8], metadata_only: bool) -> LocalReply {
        match self.read_now(key, metadata_only) {
            Ok(reply) => reply,
            Err((entry, now_ms)) => match self.wal.wait_acked(entry.seq).await {
                Ok(()) => read_reply(&entry, now_ms, metadata_only),
                Err(error) => internal(error),
            },
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8], ttl_ms: u64) -> LocalReply {
        if let Err(error) = self.wal.reserve(key.len() + value.len()).await {
            return internal(error);
        }
        match self.write(key, Some(value), ttl_ms) {
            Ok(seq) => self.acked(seq).await,
            Err(error) => internal(error),
        }
    }

    pub async fn delete(&self, key: &[u8]) -> LocalReply {
        if let Err(error) = self.wal.reserve(key.len()).await {
            return internal(error);
        }
        let now_ms = now_ms();
        match self.lookup(key, now_ms) {
            Some(entry) if entry.is_live(now_ms) => match self.write(key, None, 0) {
                Ok(seq) => self.acked(seq).await,
                Err(error) => internal(error),
            },
            // Absent, but the write that made it so may not be durable yet.
            Some(entry) => match self.wal.wait_acked(entry.seq).await {
                Ok(()) => Reply::NotFound,
                Err(error) => internal(error),
            },
            None => Reply::NotFound,
        }
    }

    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new_value: &[u8],
        ttl_ms: u64,
    ) -> LocalReply {
        if let Err(error) = self.wal.reserve(key.len() + new_value.len()).await {
            return internal(error);
        }
        // From here to the log append nothing awaits: the check and the write are atomic.
        let now_ms = now_ms();
        let current = self.lookup(key, now_ms);
        let current_value =
            current.as_ref().filter(|entry| entry.is_live(now_ms)).and_then(|e| e.value.as_deref());
        if current_value == expected {
            return match self.write(key, Some(new_value), ttl_ms) {
                Ok(seq) => self.acked(seq).await,
                Err(error) => internal(error),
            };
        }
        let Some(entry) = current else { return Reply::CasFailed(None) };
        if let Err(error) = self.wal.wait_acked(entry.seq).await {
            return internal(error);
        }
        Reply::CasFailed(entry.is_live(now_ms).then(|| entry.version(now_ms, true)))
    }

    /// Logs and applies one mutation; `value: None` deletes.
    fn write(&self, key: &[u8], value: Option<&[u8]>, ttl_ms: u64) -> Result<u64, WalError> {
        let timestamp_us = self.hlc.now();
        let expires_at_ms = expiry(timestamp_us / 1000, ttl_ms);
        let record = Record {
            seq: 0,
            kind: if value.is_some() { RecordKind::Put } else { RecordKind::Delete },
            key,
            value: value.unwrap_or(&[]),
            timestamp_us,
            expires_at_ms,
        };
        let seq = self.wal.append(&record)?;
        let entry = Entry { value: value.map(Rc::from), timestamp_us, expires_at_ms, seq };
        self.index.borrow_mut().insert(Box::from(key), entry);
        Ok(seq)
    }

    async fn acked(&self, seq: u64) -> LocalReply {
        match self.wal.wait_acked(seq).await {
            Ok(()) => Reply::Done,
            Err(error) => internal(error),
        }
    }

    pub async fn close(&self) -> Result<(), WalError> {
        self.wal.close().await
    }
}
