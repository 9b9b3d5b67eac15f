//! What the cluster runtime needs of the shard it runs on: the store, the shard's
//! replication state, and where the shard sits among the node's. `Shard` implements it; the
//! runtime names no shard type, so the shard can depend on the runtime and not the reverse.

use std::rc::Rc;

use super::state::ClusterShard;
use crate::storage::Storage;
use crate::store::Store;

pub trait Host<S: Storage>: 'static {
    fn store(&self) -> &Store<S>;
    /// The shard's replication state; `None` on a standalone node.
    fn cluster(&self) -> Option<&ClusterShard<S>>;
    /// This shard's index among the node's `count()`.
    fn index(&self) -> usize;
    fn count(&self) -> usize;
}

/// Tasks hold their shard by `Rc`.
impl<S: Storage, H: Host<S>> Host<S> for Rc<H> {
    fn store(&self) -> &Store<S> {
        (**self).store()
    }

    fn cluster(&self) -> Option<&ClusterShard<S>> {
        (**self).cluster()
    }

    fn index(&self) -> usize {
        (**self).index()
    }

    fn count(&self) -> usize {
        (**self).count()
    }
}
