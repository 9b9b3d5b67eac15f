//! The client-facing network shell of a shard: accept loops and connections.

mod body;
mod commands;
pub mod connection;
mod node_ops;

use std::rc::Rc;
use std::time::Duration;

use glommio::net::TcpListener;

use crate::shard::Shard;
use crate::storage::Storage;

/// Accepts connections until the task is dropped. Beyond `connections_max` open connections
/// per shard a new connection is closed at once, so descriptors and memory stay bounded.
pub async fn accept_loop<S: Storage>(listener: TcpListener, shard: Rc<Shard<S>>) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let open = &shard.stats().connection_count;
                if open.get() >= shard.connections_max() {
                    shard
                        .stats()
                        .refused_connection_count
                        .set(shard.stats().refused_connection_count.get() + 1);
                    drop(stream);
                    continue;
                }
                open.set(open.get() + 1);
                let _ = stream.set_nodelay(true);
                let _ = stream.set_write_timeout(Some(shard.limits().write_timeout));
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    connection::serve(stream, shard.clone()).await;
                    shard.stats().connection_count.set(shard.stats().connection_count.get() - 1);
                })
                .detach();
            }
            Err(error) => {
                // Typically EMFILE: back off instead of spinning on a full descriptor table.
                tracing::warn!(shard = shard.index(), "accept: {error}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
