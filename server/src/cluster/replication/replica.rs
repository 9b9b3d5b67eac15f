//! The replica side: merging versions another node sends (`Replicate`, transfers, hand-offs)
//! into this shard's records, and reading a record for a coordinator.

use schema::peer::decode_key_versions;
use schema::Status;

use super::{decode_record, encode_bounded, CLOCK_SKEW_MAX_US};
use crate::cluster::host::Host;
use crate::cluster::record::{versions_from_data, Record, Value};
use crate::cluster::versions::Versions;
use crate::command::{LocalReply, Reply};
use crate::storage::Storage;

/// Replica side: merges `bytes` (verified versions) into what this replica holds of `key`.
pub async fn replicate<S: Storage, H: Host<S>>(shard: &H, key: &[u8], bytes: &[u8]) -> LocalReply {
    let incoming = match decode_key_versions(bytes) {
        Ok(data) => versions_from_data(data),
        Err(error) => return Reply::error(Status::BAD_REQUEST, error),
    };
    for sibling in incoming.siblings() {
        shard.store().observe_peer_timestamp(sibling.timestamp_us, CLOCK_SKEW_MAX_US);
    }
    match merge_local(shard, key, &incoming).await {
        Ok(()) => Reply::Done,
        Err(reply) => reply,
    }
}

pub(crate) async fn merge_local<S: Storage, H: Host<S>>(
    shard: &H,
    key: &[u8],
    incoming: &Versions<Value>,
) -> Result<(), LocalReply> {
    let size: usize =
        incoming.siblings().iter().map(|s| s.value.as_ref().map_or(0, |v| v.0.len()) + 48).sum();
    let (_, seq) = shard
        .store()
        .update_raw(key, size, |current| {
            let mut mine = decode_record(current)?;
            let before = mine.versions.clone();
            mine.versions.merge(incoming);
            if mine.versions == before {
                return Ok(None);
            }
            encode_bounded(shard.cluster(), &mine).map(Some)
        })
        .await?;
    shard.store().wait_acked(seq).await
}

/// Takes on another replica's whole record of `key`: its versions merged, its Paxos acceptor
/// state absorbed (a ring change's transfer: the new replica stands in for the one it
/// displaces). Whether anything changed here.
pub(crate) async fn absorb_record<S: Storage, H: Host<S>>(
    shard: &H,
    key: &[u8],
    theirs: &Record,
) -> Result<bool, LocalReply> {
    let size: usize =
        theirs.versions.siblings().iter().map(|s| s.value.as_ref().map_or(0, |v| v.0.len()) + 48).sum();
    let (changed, seq) = shard
        .store()
        .update_raw(key, size, |current| {
            let mut mine = decode_record(current)?;
            let before = mine.clone();
            mine.versions.merge(&theirs.versions);
            mine.acceptor.absorb(&theirs.acceptor);
            if mine == before {
                return Ok(None);
            }
            encode_bounded(shard.cluster(), &mine).map(Some)
        })
        .await?;
    shard.store().wait_acked(seq).await?;
    Ok(changed.is_some())
}

/// Replica side: the versions this replica holds of `key`, encoded (empty: none).
pub async fn read_replica<S: Storage, H: Host<S>>(shard: &H, key: &[u8]) -> LocalReply {
    match shard.store().read_raw(key).await {
        Ok(Some(bytes)) => Reply::Versions(bytes.to_vec()),
        Ok(None) => Reply::Versions(Vec::new()),
        Err(reply) => reply,
    }
}
