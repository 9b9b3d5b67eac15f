//! What a shard knows of the cluster: the ring once formed, and every known node with its
//! ports and whether it is up. Built by shard 0 (which runs gossip) and handed to the other
//! shards over the mesh as an immutable snapshot; nothing locks it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use schema::peer::{TopologyData, TopologyNode};
use schema::{shard_of, wire};

use crate::gossip::NodeStatus;
use crate::ring::{NodeId, PreferenceList, Ring};
use crate::ring_state::{ChangeKind, RingState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where its shard 0 listens (gossip goes there).
    pub address: SocketAddr,
    pub shard_ports: Vec<u16>,
    /// The port clients connect to, on the IP of `address` (0: not announced).
    pub client_port: u16,
    pub up: bool,
    pub status: NodeStatus,
    pub load_bytes: u64,
    pub stream: schema::peer::StreamProgress,
}

impl NodeInfo {
    /// The address of the shard of this node that owns `key`.
    pub fn shard_address(&self, key: &[u8]) -> Option<SocketAddr> {
        let port = *self.shard_ports.get(shard_of(key, self.shard_ports.len().max(1)))?;
        Some(SocketAddr::new(self.address.ip(), port))
    }
}

/// The cluster's agreed ring: ring node `i` is `members[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formed {
    pub members: Vec<String>,
    pub replica_count: usize,
    pub partition_bits: u32,
    pub ring: Ring,
    /// The ring version.
    pub version: u64,
    /// While a change is pending: the ring once it completes (writes go to both).
    pub pending: Option<Ring>,
    /// The pending change and its subject.
    pub change: Option<(ChangeKind, NodeId)>,
    pub left: Vec<NodeId>,
}

impl Formed {
    pub fn from_state(state: &RingState) -> Result<Formed, String> {
        Ok(Formed {
            members: state.members.clone(),
            replica_count: state.replica_count,
            partition_bits: state.partition_bits,
            ring: state.ring()?,
            version: state.version,
            pending: state.pending_ring(),
            change: state.pending.as_ref().map(|p| (p.kind, p.node)),
            left: state.left.clone(),
        })
    }

    /// What the ring says of a member's status.
    pub fn status_of(&self, node: NodeId) -> NodeStatus {
        match self.change {
            Some((ChangeKind::Join | ChangeKind::Replace { .. }, subject)) if subject == node => {
                NodeStatus::Joining
            }
            Some((ChangeKind::Leave | ChangeKind::Remove, subject)) if subject == node => NodeStatus::Leaving,
            _ if self.left.contains(&node) => NodeStatus::Left,
            _ => NodeStatus::Normal,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub me: String,
    pub formed: Option<Formed>,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Why requests are refused while forming ("2 of 3 nodes known", say).
    pub forming_note: String,
}

impl ClusterView {
    pub fn forming(me: String, note: String) -> ClusterView {
        ClusterView { me, formed: None, nodes: BTreeMap::new(), forming_note: note }
    }

    pub fn member(&self, node: NodeId) -> Option<(&str, &NodeInfo)> {
        let formed = self.formed.as_ref()?;
        let name = formed.members.get(node as usize)?;
        Some((name, self.nodes.get(name)?))
    }

    pub fn my_id(&self) -> Option<NodeId> {
        let formed = self.formed.as_ref()?;
        formed.members.iter().position(|name| *name == self.me).map(|i| i as NodeId)
    }

    pub fn is_live(&self, node: NodeId) -> bool {
        Some(node) == self.my_id() || self.member(node).is_some_and(|(_, info)| info.up)
    }

    pub fn preference_list(&self, key: &[u8]) -> Option<PreferenceList> {
        let formed = self.formed.as_ref()?;
        Some(formed.ring.preference_list(key, formed.replica_count))
    }

    /// The nodes that will be replicas of `key` once the pending ring change completes and
    /// are not now: writes go to them too (pending ownership).
    pub fn pending_replicas(&self, key: &[u8]) -> PreferenceList {
        let Some(formed) = self.formed.as_ref() else { return PreferenceList::new() };
        let Some(pending) = &formed.pending else { return PreferenceList::new() };
        let now = formed.ring.preference_list(key, formed.replica_count);
        pending.preference_list(key, formed.replica_count).into_iter().filter(|n| !now.contains(n)).collect()
    }

    /// Where `node`'s shard for `key` listens.
    pub fn replica_address(&self, node: NodeId, key: &[u8]) -> Option<SocketAddr> {
        self.member(node)?.1.shard_address(key)
    }

    pub fn topology(&self) -> TopologyData {
        let status = |status| match status {
            NodeStatus::Joining => wire::NodeStatus::JOINING,
            NodeStatus::Normal => wire::NodeStatus::NORMAL,
            NodeStatus::Leaving => wire::NodeStatus::LEAVING,
            NodeStatus::Left => wire::NodeStatus::LEFT,
        };
        let names: Vec<&String> = match &self.formed {
            Some(formed) => formed.members.iter().collect(),
            None => self.nodes.keys().collect(),
        };
        let nodes = names
            .iter()
            .map(|name| {
                let info = self.nodes.get(*name);
                TopologyNode {
                    name: name.to_string(),
                    address: info.map(|i| i.address.to_string()).unwrap_or_default(),
                    shard_ports: info.map(|i| i.shard_ports.clone()).unwrap_or_default(),
                    client_port: info.map_or(0, |i| i.client_port),
                    up: **name == self.me || info.is_some_and(|i| i.up),
                    status: status(info.map_or(NodeStatus::Joining, |i| i.status)),
                    load_bytes: info.map_or(0, |i| i.load_bytes),
                    stream: info.map_or(Default::default(), |i| i.stream),
                }
            })
            .collect();
        match &self.formed {
            Some(formed) => TopologyData {
                formed: true,
                replica_count: formed.replica_count as u8,
                partition_bits: formed.partition_bits as u8,
                owners: (0..formed.ring.partition_count()).map(|p| formed.ring.owner(p) as u16).collect(),
                nodes,
                ring_version: formed.version,
            },
            None => TopologyData { nodes, ..TopologyData::default() },
        }
    }
}

/// Parses a gossiped address; gossip from a hostile peer may hold anything.
pub fn parse_address(address: &str) -> Option<SocketAddr> {
    address.parse().ok()
}
