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
/// failed are tried again with the next); once nothing is pending and the log has grown,
/// starts it afresh.
pub async fn flush_hint_log<S: Storage, H: Host<S>>(shard: Rc<H>) {
    let Some(cluster) = shard.cluster() else { return };
    let Some(mut log) = cluster.hint_log.borrow_mut().take() else { return };
    let mut appended = 0usize;
    loop {
        glommio::timer::sleep(hint_log::FLUSH_INTERVAL).await;
        let bytes = std::mem::take(&mut *cluster.hint_log_pending.borrow_mut());
        if !bytes.is_empty() {
            match log.append(&bytes).await {
                Ok(()) => appended += bytes.len(),
                Err(error) => {
                    tracing::error!(shard = shard.index(), "appending to the hint log: {error}");
                    let mut pending = cluster.hint_log_pending.borrow_mut();
                    let newer = std::mem::replace(&mut *pending, bytes);
                    pending.extend(newer);
                }
            }
        }
        if appended > (1 << 20) && cluster.hints.borrow().pending_count() == 0 {
            match log.clear().await {
                Ok(()) => appended = 0,
                Err(error) => tracing::error!(shard = shard.index(), "starting the hint log afresh: {error}"),
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
