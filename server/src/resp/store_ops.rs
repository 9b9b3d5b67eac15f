//! What RESP commands need from the store, on a standalone node or through the cluster's
//! coordinator: read, write, delete, and compare-and-set (on a standalone node the shard's
//! CAS; in a cluster the key's Paxos round, `cluster::serial`, at SERIAL).

use std::rc::Rc;
use std::time::Duration;

use schema::Status;

use super::reply::Value;
use crate::cluster::coordinator::Consistency;
use crate::cluster::serial::SerialOp;
use crate::command::{Command, LocalReply, Reply};
use crate::shard::Shard;
use crate::storage::Storage;

/// A key's current value as RESP sees it.
#[derive(Debug, Clone)]
pub struct Current {
    pub value: Rc<[u8]>,
    /// Milliseconds left; 0: no expiry.
    pub ttl_left_ms: u64,
}

/// How RESP requests reach the store.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// Consistency of reads and writes in a cluster.
    pub consistency: RespConsistency,
    pub timeout: Duration,
}

/// How RESP commands reach a cluster's replicas: `--resp-consistency`, or per connection
/// `CLIENT CONSISTENCY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespConsistency {
    /// Plain reads and writes at this level; conditional and counter commands through the
    /// key's Paxos, committed at this level.
    Level(Consistency),
    /// Every read and write of a key through its Paxos: one linearizable order (commits wait
    /// for a quorum).
    Serial,
}

impl RespConsistency {
    /// `one`, `quorum`, `all` or `serial`, in any case.
    pub fn parse(text: &str) -> Option<RespConsistency> {
        Some(match text.to_ascii_lowercase().as_str() {
            "one" => RespConsistency::Level(Consistency::One),
            "quorum" => RespConsistency::Level(Consistency::Quorum),
            "all" => RespConsistency::Level(Consistency::All),
            "serial" => RespConsistency::Serial,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RespConsistency::Level(Consistency::One) => "one",
            RespConsistency::Level(Consistency::Quorum) => "quorum",
            RespConsistency::Level(Consistency::All) => "all",
            RespConsistency::Serial => "serial",
        }
    }

    /// Replicas a write (or a Paxos commit) waits for.
    pub fn level(self) -> Consistency {
        match self {
            RespConsistency::Level(level) => level,
            RespConsistency::Serial => Consistency::Quorum,
        }
    }

    fn serial(self) -> bool {
        self == RespConsistency::Serial
    }
}

/// `command` through the key's Paxos, committed at `access`'s level.
fn serial_command(key: &[u8], op: crate::cluster::serial::SerialOp, access: Access) -> Command {
    Command::Serial {
        key: key.to_vec(),
        op,
        commit: access.consistency.level(),
        timeout_ms: access.timeout.as_millis() as u64,
    }
}

/// A store error as a RESP error, with a code a client can match.
pub fn error_value(status: Status, message: &str) -> Value {
    let code = match status {
        Status::UNAVAILABLE => "UNAVAILABLE",
        Status::TIMEOUT => "TIMEOUT",
        Status::OVERLOADED => "OVERLOADED",
        Status::NO_SPACE => "NOSPACE",
        _ => "ERR",
    };
    let detail = match status {
        Status::KEY_EMPTY => "empty keys are not supported".to_string(),
        Status::KEY_TOO_LARGE => format!("key is larger than {} bytes", schema::KEY_SIZE_MAX),
        Status::VALUE_TOO_LARGE => format!("value is larger than {} bytes", schema::VALUE_SIZE_MAX),
        _ if message.is_empty() => format!("{status:?}").to_lowercase(),
        _ => message.to_string(),
    };
    Value::error(format!("{code} {detail}"))
}

fn failed(reply: LocalReply) -> Value {
    match reply {
        Reply::Error { status, message } => error_value(status, &message),
        other => Value::error(format!("ERR unexpected reply {other:?}")),
    }
}

/// Checks a key against the store's limits before anything is sent.
pub fn check_key(key: &[u8]) -> Result<(), Value> {
    if key.is_empty() {
        return Err(error_value(Status::KEY_EMPTY, ""));
    }
    if key.len() > schema::KEY_SIZE_MAX {
        return Err(error_value(Status::KEY_TOO_LARGE, ""));
    }
    Ok(())
}

pub fn check_value(value: &[u8]) -> Result<(), Value> {
    if value.len() > schema::VALUE_SIZE_MAX {
        return Err(error_value(Status::VALUE_TOO_LARGE, ""));
    }
    Ok(())
}

pub async fn get<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    key: &[u8],
) -> Result<Option<Current>, Value> {
    check_key(key)?;
    if shard.cluster().is_some() {
        return newest_sibling(shard, access, key).await;
    }
    match shard.execute(Command::Get { key: key.to_vec(), metadata_only: false }).await {
        Reply::Found(version) => Ok(Some(Current {
            value: version.value.unwrap_or_else(|| Rc::from(&[][..])),
            ttl_left_ms: version.ttl_left_ms,
        })),
        Reply::NotFound => Ok(None),
        other => Err(failed(other)),
    }
}

/// A cluster may hold concurrent values: the newest (by timestamp) is the value, looked for
/// through every page of siblings (a reply holds what fits in a frame).
async fn newest_sibling<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    key: &[u8],
) -> Result<Option<Current>, Value> {
    let mut newest: Option<crate::command::Version<Rc<[u8]>>> = None;
    let mut sibling_skip = 0u32;
    // Each page holds at least one sibling; a key holds at most this many.
    for _ in 0..schema::peer::STORED_SIBLING_COUNT_MAX {
        let command = if access.consistency.serial() {
            let op = SerialOp::Read { metadata_only: false, sibling_skip, shown_before: None };
            serial_command(key, op, access)
        } else {
            Command::Read {
                key: key.to_vec(),
                metadata_only: false,
                sibling_skip,
                shown_before: None,
                consistency: access.consistency.level(),
                timeout_ms: access.timeout.as_millis() as u64,
            }
        };
        let (versions, omitted) = match shard.execute(command).await {
            Reply::Siblings { versions, omitted, .. } => (versions, omitted),
            other => return Err(failed(other)),
        };
        sibling_skip += versions.len() as u32;
        for version in versions {
            if newest.as_ref().is_none_or(|n| version.timestamp_us > n.timestamp_us) {
                newest = Some(version);
            }
        }
        if omitted == 0 || sibling_skip == 0 {
            break;
        }
    }
    Ok(newest
        .map(|v| Current { value: v.value.unwrap_or_else(|| Rc::from(&[][..])), ttl_left_ms: v.ttl_left_ms }))
}

pub async fn put<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    key: &[u8],
    value: &[u8],
    ttl_ms: u64,
) -> Result<(), Value> {
    check_key(key)?;
    check_value(value)?;
    let command = if shard.cluster().is_some() && access.consistency.serial() {
        serial_command(key, SerialOp::Write { value: Some(value.to_vec()), ttl_ms }, access)
    } else if shard.cluster().is_some() {
        Command::Write {
            key: key.to_vec(),
            value: Some(value.to_vec()),
            ttl_ms,
            context: None,
            consistency: access.consistency.level(),
            timeout_ms: access.timeout.as_millis() as u64,
        }
    } else {
        Command::Put { key: key.to_vec(), value: value.to_vec(), ttl_ms }
    };
    match shard.execute(command).await {
        Reply::Done | Reply::Written(_) => Ok(()),
        other => Err(failed(other)),
    }
}

/// Deletes `key`; whether it existed. In a cluster the existence check is a read before the
/// (blind) deletion.
pub async fn delete<S: Storage>(shard: &Rc<Shard<S>>, access: Access, key: &[u8]) -> Result<bool, Value> {
    check_key(key)?;
    if shard.cluster().is_none() {
        return match shard.execute(Command::Delete { key: key.to_vec() }).await {
            Reply::Done => Ok(true),
            Reply::NotFound => Ok(false),
            other => Err(failed(other)),
        };
    }
    if access.consistency.serial() {
        // One Paxos round: it deletes, or answers NOT_FOUND if the key is absent.
        return match shard
            .execute(serial_command(key, SerialOp::Write { value: None, ttl_ms: 0 }, access))
            .await
        {
            Reply::Done | Reply::Written(_) => Ok(true),
            Reply::NotFound => Ok(false),
            other => Err(failed(other)),
        };
    }
    if get(shard, access, key).await?.is_none() {
        return Ok(false);
    }
    let command = Command::Write {
        key: key.to_vec(),
        value: None,
        ttl_ms: 0,
        context: None,
        consistency: access.consistency.level(),
        timeout_ms: access.timeout.as_millis() as u64,
    };
    match shard.execute(command).await {
        Reply::Done | Reply::Written(_) => Ok(true),
        other => Err(failed(other)),
    }
}

/// Applies an atomic update: on a standalone node at the key's owning shard; in a cluster
/// through the key's Paxos (linearizable, the commit acknowledged as `access` asks).
pub async fn update<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    key: &[u8],
    update: crate::update::Update,
) -> Result<crate::update::Answer<Rc<[u8]>>, Value> {
    check_key(key)?;
    if let crate::update::Update::Set { value, .. } = &update {
        check_value(value)?;
    }
    let command = if shard.cluster().is_some() {
        serial_command(key, SerialOp::Update(update), access)
    } else {
        Command::Update { key: key.to_vec(), update }
    };
    match shard.execute(command).await {
        Reply::Updated(answer) => Ok(answer),
        other => Err(failed(other)),
    }
}
