//! Cross-shard forwarding over glommio's channel mesh (one bounded SPSC ring per ordered
//! pair of shards).
//!
//! A request that reaches the wrong shard crosses once to its owner and the reply comes back
//! on the reverse ring. A receiving shard drains every message queued on a ring per wake-up,
//! so a burst of hops pays for one wake-up of a sleeping core, not one per message.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use futures::channel::oneshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;
use schema::Status;

use crate::command::{Command, RemoteReply, Reply};

/// Slots in each ring between two shards.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug)]
pub enum Message {
    /// The first message on every ring: which shard sends on it (glommio numbers mesh peers
    /// by executor creation order, which need not be the shard order).
    Introduce {
        shard_index: usize,
    },
    Request {
        tag: u64,
        command: Command,
    },
    Reply {
        tag: u64,
        reply: RemoteReply,
    },
    /// Shard 0 tells the others what the cluster looks like now.
    View(std::sync::Arc<crate::cluster::view::ClusterView>),
}

pub fn builder(shard_count: usize) -> MeshBuilder<Message, Full> {
    MeshBuilder::full(shard_count, MESH_CHANNEL_CAPACITY)
}

/// The receiving ends of the rings from every peer, with the peer's mesh index.
pub struct PeerReceivers(Vec<(usize, ConnectedReceiver<Message>)>);

/// This shard's end of the mesh.
pub struct Mesh {
    senders: Senders<Message>,
    /// `peer_of_shard[shard]`: the mesh peer index of each shard.
    peer_of_shard: Vec<usize>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<RemoteReply>>>,
    next_tag: Cell<u64>,
    hop_count: Cell<u64>,
}

impl Mesh {
    /// Joins the mesh and learns which peer is which shard. Returns the mesh and, per peer,
    /// the receiver to hand to [`Mesh::serve`].
    pub async fn join(
        builder: MeshBuilder<Message, Full>,
        shard_index: usize,
        shard_count: usize,
    ) -> anyhow::Result<(Rc<Mesh>, PeerReceivers)> {
        let (senders, mut receivers) =
            builder.join().await.map_err(|error| anyhow::anyhow!("joining the shard mesh: {error}"))?;
        let my_peer = senders.peer_id();
        for peer in (0..shard_count).filter(|&peer| peer != my_peer) {
            senders
                .send_to(peer, Message::Introduce { shard_index })
                .await
                .map_err(|_| anyhow::anyhow!("shard mesh closed during start-up"))?;
        }
        let mut peer_of_shard = vec![usize::MAX; shard_count];
        peer_of_shard[shard_index] = my_peer;
        let streams = receivers.streams();
        for (peer, receiver) in &streams {
            let peer = *peer;
            match receiver.recv().await {
                Some(Message::Introduce { shard_index: peer_shard }) if peer_shard < shard_count => {
                    peer_of_shard[peer_shard] = peer;
                }
                other => anyhow::bail!("shard mesh: expected an introduction, got {other:?}"),
            }
        }
        assert!(peer_of_shard.iter().all(|&peer| peer < shard_count), "{peer_of_shard:?}");
        let mesh = Mesh {
            senders,
            peer_of_shard,
            waiting: RefCell::new(HashMap::new()),
            next_tag: Cell::new(1),
            hop_count: Cell::new(0),
        };
        Ok((Rc::new(mesh), PeerReceivers(streams)))
    }

    pub fn hop_count(&self) -> u64 {
        self.hop_count.get()
    }

    /// Runs `command` on shard `target` and waits for its reply.
    pub async fn forward(&self, target: usize, command: Command) -> RemoteReply {
        let tag = self.next_tag.get();
        self.next_tag.set(tag + 1);
        let (sender, receiver) = oneshot::channel();
        self.waiting.borrow_mut().insert(tag, sender);
        self.hop_count.set(self.hop_count.get() + 1);
        let peer = self.peer_of_shard[target];
        if self.senders.send_to(peer, Message::Request { tag, command }).await.is_err() {
            self.waiting.borrow_mut().remove(&tag);
            return Reply::error(Status::UNAVAILABLE, format!("shard {target} is shutting down"));
        }
        receiver
            .await
            .unwrap_or_else(|_| Reply::error(Status::UNAVAILABLE, format!("shard {target} went away")))
    }

    /// Sends `view` to every other shard (in the background).
    pub fn broadcast_view(self: &Rc<Self>, view: std::sync::Arc<crate::cluster::view::ClusterView>) {
        for (shard, &peer) in self.peer_of_shard.iter().enumerate() {
            if peer == self.senders.peer_id() {
                continue;
            }
            let mesh = self.clone();
            let view = view.clone();
            glommio::spawn_local(async move {
                if mesh.senders.send_to(peer, Message::View(view)).await.is_err() {
                    tracing::warn!("shard mesh: shard {shard} did not take the cluster view");
                }
            })
            .detach();
        }
    }

    /// Serves the rings from every peer: runs requests with `execute`, hands cluster views
    /// to `on_view`, and completes the forwards whose replies arrive. Returns when every
    /// peer has closed its ring.
    pub async fn serve<F, Fut, V>(self: Rc<Self>, receivers: PeerReceivers, execute: F, on_view: V)
    where
        F: Fn(Command) -> Fut + Clone + 'static,
        Fut: std::future::Future<Output = RemoteReply> + 'static,
        V: Fn(std::sync::Arc<crate::cluster::view::ClusterView>) + Clone + 'static,
    {
        let tasks: Vec<_> = receivers
            .0
            .into_iter()
            .map(|(peer, receiver)| {
                let mesh = self.clone();
                let execute = execute.clone();
                let on_view = on_view.clone();
                glommio::spawn_local(async move {
                    while let Some(message) = receiver.recv().await {
                        match message {
                            Message::Request { tag, command } => {
                                let mesh = mesh.clone();
                                let reply = execute(command);
                                glommio::spawn_local(async move {
                                    let reply = reply.await;
                                    // A closed ring means the peer is shutting down and no
                                    // longer waits for the reply.
                                    let _ = mesh.senders.send_to(peer, Message::Reply { tag, reply }).await;
                                })
                                .detach();
                            }
                            Message::Reply { tag, reply } => {
                                if let Some(waiter) = mesh.waiting.borrow_mut().remove(&tag) {
                                    let _ = waiter.send(reply);
                                }
                            }
                            Message::View(view) => on_view(view),
                            Message::Introduce { .. } => {
                                tracing::warn!("shard mesh: unexpected second introduction from peer {peer}");
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
    }

    /// Closes this shard's sending side, so peers' serve loops end.
    pub fn close(&self) {
        self.senders.close();
    }
}
