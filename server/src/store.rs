//! One shard's key-value semantics on top of its storage engine (owned by the shard's
//! thread, so no lock guards it): TTL, DELETE's existence check, CAS, error statuses.
//!
//! A mutation is checked, logged and applied to the memtable in one synchronous step; DELETE
//! and CAS read the current version first (`Engine::read_current`) and then decide and write
//! with no await in between, which makes CAS atomic per key. A reply waits until the log
//! acknowledges the write. A read that finds a version not yet acknowledged waits for it too,
//! so no client ever sees a value that a crash could take back.

use std::path::Path;
use std::rc::Rc;

use futures::FutureExt;
use schema::Status;

use crate::clock::{now_ms, Hlc};
use crate::command::{Command, LocalReply, Reply, Version};
use crate::engine::{Engine, EngineOptions, Entry};
use crate::storage::Storage;
use crate::table::reader::TableError;
use crate::update::{self, Update};
use crate::wal::{RecoveryReport, ShardIdentity, SyncPolicy, WalError};

fn version(entry: &Entry, now_ms: u64, with_value: bool) -> Version<Rc<[u8]>> {
    let ttl_left_ms =
        if entry.expires_at_ms == 0 { 0 } else { entry.expires_at_ms.saturating_sub(now_ms).max(1) };
    Version {
        value: if with_value { entry.value.clone() } else { None },
        timestamp_us: entry.timestamp_us,
        ttl_left_ms,
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
        Reply::Found(version(entry, now_ms, !metadata_only))
    } else {
        Reply::NotFound
    }
}

fn internal(error: WalError) -> LocalReply {
    match error {
        WalError::ShuttingDown => Reply::error(Status::UNAVAILABLE, "shutting down"),
        WalError::NoSpace => Reply::error(Status::NO_SPACE, error.to_string()),
        error => Reply::error(Status::INTERNAL, error.to_string()),
    }
}

/// A read that failed: a damaged block (never served) or an I/O error.
fn read_failed(error: TableError) -> LocalReply {
    Reply::error(Status::INTERNAL, error.to_string())
}

pub struct Store<S: Storage> {
    engine: Engine<S>,
    hlc: Hlc,
}

impl<S: Storage> Store<S> {
    /// The file system the shard's files live on.
    pub fn storage(&self) -> &S {
        self.engine.storage()
    }

    /// Recovers the shard in `dir`: its tables, then the log records they do not hold.
    pub async fn open(
        storage: S,
        dir: &Path,
        identity: ShardIdentity,
        policy: SyncPolicy,
        options: EngineOptions,
    ) -> Result<(Store<S>, RecoveryReport), WalError> {
        let hlc = Hlc::default();
        let (engine, report) =
            Engine::open(storage, dir, identity, policy, options, |timestamp_us| hlc.observe(timestamp_us))
                .await?;
        Ok((Store { engine, hlc }, report))
    }

    pub fn engine(&self) -> &Engine<S> {
        &self.engine
    }

    pub fn wal(&self) -> &crate::wal::Wal<S> {
        self.engine.wal()
    }

    pub async fn apply(&self, command: Command) -> LocalReply {
        match command {
            Command::Get { key, metadata_only } => self.get(&key, metadata_only).await,
            Command::Put { key, value, ttl_ms } => self.put(&key, &value, ttl_ms).await,
            Command::Delete { key } => self.delete(&key).await,
            Command::Cas { key, expected, new_value, ttl_ms } => {
                self.cas(&key, expected.as_deref(), &new_value, ttl_ms).await
            }
            Command::Update { key, update } => self.update(&key, &update).await,
            Command::ShardStats => Reply::error(Status::INTERNAL, "stats are the shard's, not the store's"),
            Command::SnapshotShard { dir } => match self.engine.snapshot(&dir).await {
                Ok(_) => Reply::Done,
                Err(error) => {
                    Reply::error(Status::INTERNAL, format!("snapshot into {}: {error}", dir.display()))
                }
            },
            Command::EntryCount => {
                Reply::Updated(update::Answer::Integer(self.engine.entry_count_estimate() as i64))
            }
            Command::Write { .. }
            | Command::Read { .. }
            | Command::Serial { .. }
            | Command::Paxos { .. }
            | Command::Replicate { .. }
            | Command::ReadReplica { .. }
            | Command::RepairShard
            | Command::TransferShard { .. } => {
                Reply::error(Status::INTERNAL, "a cluster operation reached the store")
            }
        }
    }

    /// The reply to a GET if memory answers it and nothing needs to wait (the newest entry
    /// is acknowledged, or the key is absent and no table exists). `None`: use [`Store::get`].
    pub fn try_get(&self, key: &[u8], metadata_only: bool) -> Option<LocalReply> {
        let entry = match self.engine.try_read(key)? {
            Ok(Some(entry)) => entry,
            Ok(None) => return Some(Reply::NotFound),
            Err(error) => return Some(read_failed(error)),
        };
        if entry.seq > self.engine.wal().acked_seq() {
            return None;
        }
        // The clock is read only for a value that can expire.
        let now_ms = if entry.expires_at_ms == 0 { 0 } else { now_ms() };
        Some(read_reply(&entry, now_ms, metadata_only))
    }

    /// A PUT that can be accepted without waiting (the log and the memtables have room):
    /// logged and applied now. Returns its sequence number; the reply must wait for
    /// [`Store::wait_acked`] of it. `None`: there is no room now; use [`Store::put`].
    pub fn try_put(&self, key: &[u8], value: &[u8], ttl_ms: u64) -> Option<Result<u64, LocalReply>> {
        if let Err(error) = self.engine.reserve(key.len() + value.len()).now_or_never()? {
            return Some(Err(internal(error)));
        }
        Some(self.write(key, Some(value), ttl_ms).map_err(internal))
    }

    pub async fn get(&self, key: &[u8], metadata_only: bool) -> LocalReply {
        let entry = match self.engine.read(key).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return Reply::NotFound,
            Err(error) => return read_failed(error),
        };
        let now_ms = now_ms();
        // No client may see a version that a crash could take back.
        if let Err(error) = self.engine.wal().wait_acked(entry.seq).await {
            return internal(error);
        }
        read_reply(&entry, now_ms, metadata_only)
    }

    pub async fn put(&self, key: &[u8], value: &[u8], ttl_ms: u64) -> LocalReply {
        if let Err(error) = self.engine.reserve(key.len() + value.len()).await {
            return internal(error);
        }
        match self.write(key, Some(value), ttl_ms) {
            Ok(seq) => self.acked(seq).await,
            Err(error) => internal(error),
        }
    }

    pub async fn delete(&self, key: &[u8]) -> LocalReply {
        if let Err(error) = self.engine.reserve(key.len()).await {
            return internal(error);
        }
        // Whether the key exists decides the reply, so a DELETE reads first (a PUT never
        // does); from the read to the log append nothing awaits.
        let current = match self.engine.read_current(key).await {
            Ok(current) => current,
            Err(error) => return read_failed(error),
        };
        let now_ms = now_ms();
        match current {
            Some(entry) if entry.is_live(now_ms) => match self.write(key, None, 0) {
                Ok(seq) => self.acked(seq).await,
                Err(error) => internal(error),
            },
            // Absent, but the write that made it so may not be durable yet.
            Some(entry) => match self.engine.wal().wait_acked(entry.seq).await {
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
        if let Err(error) = self.engine.reserve(key.len() + new_value.len()).await {
            return internal(error);
        }
        // From the end of the read to the log append nothing awaits: the check and the
        // write are atomic.
        let current = match self.engine.read_current(key).await {
            Ok(current) => current,
            Err(error) => return read_failed(error),
        };
        let now_ms = now_ms();
        let current_value =
            current.as_ref().filter(|entry| entry.is_live(now_ms)).and_then(|e| e.value.as_deref());
        if current_value == expected {
            return match self.write(key, Some(new_value), ttl_ms) {
                Ok(seq) => self.acked(seq).await,
                Err(error) => internal(error),
            };
        }
        let Some(entry) = current else { return Reply::CasFailed(None) };
        if let Err(error) = self.engine.wal().wait_acked(entry.seq).await {
            return internal(error);
        }
        Reply::CasFailed(entry.is_live(now_ms).then(|| version(&entry, now_ms, true)))
    }

    /// Applies `update` atomically: reads the current version, decides, and writes with no
    /// await in between. Answers once what the key holds is durable.
    pub async fn update(&self, key: &[u8], update: &Update) -> LocalReply {
        // Room for the largest write an update can make: its own value, or the current one
        // rewritten with a new TTL.
        let size = match update {
            Update::Set { value, .. } => value.len(),
            Update::IncrementBy(_) | Update::GetDelete | Update::DeleteIf(_) => 32,
            Update::Expire { .. } | Update::Persist => schema::VALUE_SIZE_MAX,
        };
        if let Err(error) = self.engine.reserve(key.len() + size).await {
            return internal(error);
        }
        let current = match self.engine.read_current(key).await {
            Ok(current) => current,
            Err(error) => return read_failed(error),
        };
        let now_ms = now_ms();
        let live = current.as_ref().filter(|entry| entry.is_live(now_ms));
        let view = live.and_then(|entry| {
            let ttl_left_ms = version(entry, now_ms, false).ttl_left_ms;
            entry.value.as_deref().map(|value| update::Current { value, ttl_left_ms })
        });
        let (write, answer) = update::decide(update, view);
        let seq = match write {
            update::Write::Nothing => current.map_or(0, |entry| entry.seq),
            update::Write::Put { value, ttl_ms } => match self.write(key, Some(&value), ttl_ms) {
                Ok(seq) => seq,
                Err(error) => return internal(error),
            },
            update::Write::Delete => match self.write(key, None, 0) {
                Ok(seq) => seq,
                Err(error) => return internal(error),
            },
        };
        match self.engine.wal().wait_acked(seq).await {
            Ok(()) => Reply::Updated(answer),
            Err(error) => internal(error),
        }
    }

    /// A timestamp from the shard's hybrid logical clock.
    pub fn timestamp_us(&self) -> u64 {
        self.hlc.now()
    }

    /// Moves the clock past a peer's timestamp, but never more than `skew_max_us` ahead of
    /// this node's wall clock: a peer whose clock runs far ahead cannot drag this one along.
    pub fn observe_peer_timestamp(&self, timestamp_us: u64, skew_max_us: u64) {
        let bound = now_ms().saturating_mul(1000).saturating_add(skew_max_us);
        self.hlc.observe(timestamp_us.min(bound));
    }

    /// Cluster: the acknowledged bytes stored for `key` (its encoded versions), if any.
    pub async fn read_raw(&self, key: &[u8]) -> Result<Option<Rc<[u8]>>, LocalReply> {
        let Some(entry) = self.engine.read(key).await.map_err(read_failed)? else {
            return Ok(None);
        };
        self.engine.wal().wait_acked(entry.seq).await.map_err(internal)?;
        Ok(if entry.is_live(now_ms()) { entry.value } else { None })
    }

    /// Cluster: reads the bytes stored for `key` and lets `update` compute new ones (with
    /// their expiry) from them, or `None` to leave them; nothing awaits between the read and
    /// the write, so concurrent updates of one key never lose each other. Returns the new
    /// bytes (`None` when unchanged) and the sequence number to pass to
    /// [`Store::wait_acked`] before telling anyone the key holds them.
    pub async fn update_raw<F>(
        &self,
        key: &[u8],
        size: usize,
        update: F,
    ) -> Result<(Option<Vec<u8>>, u64), LocalReply>
    where
        F: FnOnce(Option<&[u8]>) -> Result<Option<(Vec<u8>, u64)>, LocalReply>,
    {
        self.engine.reserve(key.len() + size).await.map_err(internal)?;
        let current = self.engine.read_current(key).await.map_err(read_failed)?;
        let now_ms = now_ms();
        let live = current.as_ref().filter(|entry| entry.is_live(now_ms)).and_then(|e| e.value.as_deref());
        match update(live)? {
            Some((bytes, expires_at_ms)) => {
                let timestamp_us = self.hlc.now();
                let seq =
                    self.engine.write(key, Some(&bytes), timestamp_us, expires_at_ms).map_err(internal)?;
                Ok((Some(bytes), seq))
            }
            None => Ok((None, current.map_or(0, |entry| entry.seq))),
        }
    }

    /// Cluster: removes `key` if `condition` holds for the bytes stored for it, checked and
    /// removed with no await between; durable when it returns. Whether it was removed.
    pub async fn remove_raw_if<F>(&self, key: &[u8], condition: F) -> Result<bool, LocalReply>
    where
        F: FnOnce(&[u8]) -> bool,
    {
        self.engine.reserve(key.len()).await.map_err(internal)?;
        let current = self.engine.read_current(key).await.map_err(read_failed)?;
        let live = current.as_ref().filter(|entry| entry.is_live(now_ms())).and_then(|e| e.value.as_deref());
        if !live.is_some_and(condition) {
            return Ok(false);
        }
        let seq = self.engine.write(key, None, self.hlc.now(), 0).map_err(internal)?;
        self.wait_acked(seq).await?;
        Ok(true)
    }

    /// Waits until the write with sequence number `seq` is durable.
    pub async fn wait_acked(&self, seq: u64) -> Result<(), LocalReply> {
        self.engine.wal().wait_acked(seq).await.map_err(internal)
    }

    /// Logs and applies one mutation; `value: None` deletes.
    fn write(&self, key: &[u8], value: Option<&[u8]>, ttl_ms: u64) -> Result<u64, WalError> {
        let timestamp_us = self.hlc.now();
        let expires_at_ms = expiry(timestamp_us / 1000, ttl_ms);
        self.engine.write(key, value, timestamp_us, expires_at_ms)
    }

    async fn acked(&self, seq: u64) -> LocalReply {
        match self.engine.wal().wait_acked(seq).await {
            Ok(()) => Reply::Done,
            Err(error) => internal(error),
        }
    }

    pub async fn close(&self) -> Result<(), WalError> {
        self.engine.close().await
    }
}
