//! What a shard knows of the cluster: the ring once formed, and every known node with its
//! ports and whether it is up. Built by shard 0 (which runs gossip) and handed to the other
//! shards over the mesh as an immutable snapshot; nothing locks it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use schema::peer::{TopologyData, TopologyNode};
use schema::{shard_of, wire};

use super::gossip::NodeStatus;
use super::ring::{NodeId, PreferenceList, Ring};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where its shard 0 listens (gossip goes there).
    pub address: SocketAddr,
    pub shard_ports: Vec<u16>,
    pub up: bool,
    pub status: NodeStatus,
    pub load_bytes: u64,
}

impl NodeInfo {
    /// The address of the shard of this node that owns `key`.
    pub fn shard_address(&self, key: &[u8]) -> Option<SocketAddr> {
        let port = *self.shard_ports.get(shard_of(key, self.shard_ports.len().max(1)))?;
        Some(SocketAddr::new(self.address.ip(), port))
    }
}

/// The cluster once its members are fixed: ring node `i` is `members[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formed {
    pub members: Vec<String>,
    pub replica_count: usize,
    pub partition_bits: u32,
    pub ring: Ring,
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

    /// Where `node`'s shard for `key` listens.
    pub fn replica_address(&self, node: NodeId, key: &[u8]) -> Option<SocketAddr> {
        self.member(node)?.1.shard_address(key)
    }

    pub fn topology(&self) -> TopologyData {
        let status = |status| match status {
            NodeStatus::Joining => wire::NodeStatus::JOINING,
            NodeStatus::Normal => wire::NodeStatus::NORMAL,
            NodeStatus::Leaving => wire::NodeStatus::LEAVING,
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
                    up: **name == self.me || info.is_some_and(|i| i.up),
                    status: status(info.map_or(NodeStatus::Joining, |i| i.status)),
                    load_bytes: info.map_or(0, |i| i.load_bytes),
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
            },
            None => TopologyData { nodes, ..TopologyData::default() },
        }
    }
}

/// Parses a gossiped address; gossip from a hostile peer may hold anything.
pub fn parse_address(address: &str) -> Option<SocketAddr> {
    address.parse().ok()
}
