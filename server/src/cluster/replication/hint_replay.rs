//! Hints with I/O: appending them to the hint log, and replaying them to replicas that are
//! up again.

use std::rc::Rc;
use std::time::Duration;

use schema::{Op, Status};

use super::{cluster_link_call, HINT_REPLAY_INTERVAL};
use crate::cluster::hint_log::{self};
use crate::cluster::host::Host;
use crate::cluster::peer::PeerRequest;
use crate::cluster::state::monotonic_us;
use crate::storage::Storage;

/// Appends the hint log's new records every `FLUSH_INTERVAL`, forever (records whose append
/// failed are tried again with the next); once the log has grown past twice what the pending
/// hints need, rewrites it with just them (`HintLog::wants_rewrite`), so that its size
/// follows the hints kept in memory, which are bounded.
pub async fn flush_hint_log<S: Storage, H: Host<S>>(shard: Rc<H>) {
    let Some(cluster) = shard.cluster() else { return };
    let Some(mut log) = cluster.hint_log.borrow_mut().take() else { return };
    // Puts records that could not be written back in front of those queued since.
    let requeue = |bytes: Vec<u8>| {
        let mut pending = cluster.hint_log_pending.borrow_mut();
        let newer = std::mem::replace(&mut *pending, bytes);
        pending.extend(newer);
    };
    loop {
        glommio::timer::sleep(hint_log::FLUSH_INTERVAL).await;
        let bytes = std::mem::take(&mut *cluster.hint_log_pending.borrow_mut());
        if !bytes.is_empty() {
            if let Err(error) = log.append(&bytes).await {
                tracing::error!(shard = shard.index(), "appending to the hint log: {error}");
                requeue(bytes);
            }
        }
        let (count, bytes) = {
            let hints = cluster.hints.borrow();
            (hints.pending_count(), hints.pending_bytes())
        };
        if log.wants_rewrite(count, bytes) {
            // The hints in memory are what the log means, records not yet appended included:
            // those are dropped here and written back only if the rewrite fails.
            let unwritten = std::mem::take(&mut *cluster.hint_log_pending.borrow_mut());
            let kept: Vec<hint_log::LoggedHint> = cluster
                .hints
                .borrow()
                .iter()
                .map(|(target, hint)| hint_log::LoggedHint {
                    id: hint.id,
                    target,
                    key: hint.write.0.clone(),
                    versions: hint.write.1.to_vec(),
                })
                .collect();
            if let Err(error) = log.replace(&kept).await {
                tracing::error!(shard = shard.index(), "rewriting the hint log: {error}");
                requeue(unwritten);
            }
        }
    }
}

/// Replays hints to replicas that are up again, forever; drops those past their age.
pub async fn replay_hints<S: Storage, H: Host<S>>(shard: Rc<H>) {
    loop {
        glommio::timer::sleep(HINT_REPLAY_INTERVAL).await;
        let Some(cluster) = shard.cluster() else { return };
        cluster.hints.borrow_mut().expire(monotonic_us());
        let view = cluster.view();
        let targets = cluster.hints.borrow().targets();
        for target in targets.into_iter().filter(|&t| view.is_live(t)) {
            let batch = cluster.hints.borrow_mut().replay(target);
            for hint in batch {
                let (key, bytes) = &hint.write;
                let Some(address) = view.replica_address(target, key) else {
                    // No address known yet: send the batch again later rather than leave it
                    // marked in flight for good.
                    cluster.hints.borrow_mut().replay_failed(target);
                    break;
                };
                let op = Op::Replicate { key, versions: bytes };
                let timeout = Duration::from_secs(2);
                let request =
                    PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout };
                if cluster_link_call(&shard, address, request).await == Some(Status::OK) {
                    cluster.hint_acknowledged(target, hint.id);
                } else {
                    cluster.hints.borrow_mut().replay_failed(target);
                    break;
                }
            }
        }
    }
}
