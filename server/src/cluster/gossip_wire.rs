//! Gossip messages on the wire: the sans-IO gossip machine's messages and node states to and
//! from `schema::peer`'s `GossipData` (FlatBuffers).

use schema::peer::{GossipData, GossipKind, GossipNode};
use schema::wire;

use super::gossip::{Message, NodeState, NodeStatus};

fn status_to_wire(status: NodeStatus) -> wire::NodeStatus {
    match status {
        NodeStatus::Joining => wire::NodeStatus::JOINING,
        NodeStatus::Normal => wire::NodeStatus::NORMAL,
        NodeStatus::Leaving => wire::NodeStatus::LEAVING,
        NodeStatus::Left => wire::NodeStatus::LEFT,
    }
}

fn status_from_wire(status: wire::NodeStatus) -> NodeStatus {
    match status {
        wire::NodeStatus::NORMAL => NodeStatus::Normal,
        wire::NodeStatus::LEAVING => NodeStatus::Leaving,
        wire::NodeStatus::LEFT => NodeStatus::Left,
        _ => NodeStatus::Joining,
    }
}

fn state_to_wire(node: &str, state: &NodeState) -> GossipNode {
    GossipNode {
        node: node.to_string(),
        generation: state.generation,
        heartbeat: state.heartbeat,
        address: state.address.clone(),
        status: status_to_wire(state.status),
        shard_ports: state.shard_ports.clone(),
        client_port: state.client_port,
        load_bytes: state.load_bytes,
        members: state.members.clone(),
        replica_count: state.replica_count,
        partition_bits: state.partition_bits,
        ring_version: state.ring_version,
        stream: state.stream,
    }
}

fn state_from_wire(node: GossipNode) -> (String, NodeState) {
    let state = NodeState {
        generation: node.generation,
        heartbeat: node.heartbeat,
        address: node.address,
        status: status_from_wire(node.status),
        shard_ports: node.shard_ports,
        client_port: node.client_port,
        load_bytes: node.load_bytes,
        members: node.members,
        replica_count: node.replica_count,
        partition_bits: node.partition_bits,
        ring_version: node.ring_version,
        stream: node.stream,
    };
    (node.node, state)
}

pub fn message_to_wire(message: &Message) -> GossipData {
    match message {
        Message::Digest { from, address, versions } => GossipData {
            kind: GossipKind::Digest,
            from: from.clone(),
            address: address.clone(),
            versions: versions.clone(),
            states: Vec::new(),
            wanted: Vec::new(),
        },
        Message::Reply { from, address, states, wanted } => GossipData {
            kind: GossipKind::Reply,
            from: from.clone(),
            address: address.clone(),
            versions: Vec::new(),
            states: states.iter().map(|(name, state)| state_to_wire(name, state)).collect(),
            wanted: wanted.clone(),
        },
        Message::States { from, states } => GossipData {
            kind: GossipKind::States,
            from: from.clone(),
            address: String::new(),
            versions: Vec::new(),
            states: states.iter().map(|(name, state)| state_to_wire(name, state)).collect(),
            wanted: Vec::new(),
        },
    }
}

pub fn message_from_wire(data: GossipData) -> Message {
    let states = || data.states.clone().into_iter().map(state_from_wire).collect();
    match data.kind {
        GossipKind::Digest => {
            Message::Digest { from: data.from, address: data.address, versions: data.versions }
        }
        GossipKind::Reply => {
            Message::Reply { states: states(), from: data.from, address: data.address, wanted: data.wanted }
        }
        GossipKind::States => Message::States { states: states(), from: data.from },
    }
}
