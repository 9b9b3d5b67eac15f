//! Node-to-node payloads (nested FlatBuffers inside a Request or Response): a key's versions,
//! gossip messages and the topology. Owned structs with one encoder and one verifying
//! decoder each, so nothing else touches these buffers.
#![deny(clippy::indexing_slicing)]

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::wire;
use crate::{KEY_SIZE_MAX, VALUE_SIZE_MAX};

/// Siblings a stored or shipped key may hold. A coordinator holds a key to
/// `SIBLING_COUNT_MAX`; merges never drop a sibling, so a key may hold more (concurrent
/// coordinators each within the limit), up to this; a merge beyond it is refused.
pub const STORED_SIBLING_COUNT_MAX: usize = 16 * crate::SIBLING_COUNT_MAX;
/// Entries in one version vector (actors: the nodes that ever coordinated a write of the key).
pub const CLOCK_ENTRY_COUNT_MAX: usize = 1024;
/// Nodes in one gossip message or topology.
pub const NODE_COUNT_MAX: usize = 1024;
/// Partition bits a topology may name.
pub const PARTITION_BITS_MAX: u8 = 16;

/// One concurrent version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSibling {
    pub actor: u32,
    pub counter: u64,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp_us: u64,
    pub expires_at_ms: u64,
    pub blind: bool,
}

/// A Paxos ballot. Ordered by time, then actor, then counter; zero (the default) is below
/// every ballot a proposer uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    pub time_us: u64,
    pub actor: u32,
    pub counter: u64,
}

impl Ballot {
    pub fn from_wire(ballot: &wire::Ballot) -> Ballot {
        Ballot { time_us: ballot.time_us(), actor: ballot.actor(), counter: ballot.counter() }
    }

    pub fn to_wire(self) -> wire::Ballot {
        wire::Ballot::new(self.time_us, self.counter, self.actor)
    }
}

/// A key's Paxos acceptor state, stored with its versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptorData {
    pub promised: Ballot,
    /// The accepted proposal not known to be committed, and its ballot.
    pub accepted: Option<(Ballot, Box<KeyVersionsData>)>,
    pub committed: Ballot,
}

/// Writes chosen by a key's Paxos that a record or proposal remembers.
pub const CHOSEN_WRITE_COUNT_MAX: usize = 32;

/// Everything one replica holds of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyVersionsData {
    /// Sorted by actor, counters above zero.
    pub clock: Vec<(u32, u64)>,
    pub siblings: Vec<StoredSibling>,
    /// The last writes the key's Paxos chose, oldest first: (ballot, actor, counter).
    pub chosen: Vec<(Ballot, u32, u64)>,
    /// Only in a stored record (and a replica's answer to Paxos); default elsewhere.
    pub acceptor: AcceptorData,
    /// The newest blind write met: (timestamp_us, actor, counter).
    pub newest_blind: Option<(u64, u32, u64)>,
}

fn options() -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 8,
        max_tables: 8 * NODE_COUNT_MAX + 4 * STORED_SIBLING_COUNT_MAX + 64,
        max_apparent_size: 1 << 30,
        ignore_missing_null_terminator: false,
    }
}

pub fn encode_key_versions(versions: &KeyVersionsData) -> Vec<u8> {
    let size: usize = versions.siblings.iter().map(|s| s.value.as_ref().map_or(0, Vec::len) + 64).sum();
    let mut builder = FlatBufferBuilder::with_capacity(size + versions.clock.len() * 16 + 64);
    let siblings: Vec<_> = versions
        .siblings
        .iter()
        .map(|sibling| {
            let value = sibling.value.as_ref().map(|value| builder.create_vector(value));
            wire::StoredSibling::create(
                &mut builder,
                &wire::StoredSiblingArgs {
                    actor: sibling.actor,
                    counter: sibling.counter,
                    value,
                    tombstone: sibling.value.is_none(),
                    timestamp_us: sibling.timestamp_us,
                    expires_at_ms: sibling.expires_at_ms,
                    blind: sibling.blind,
                },
            )
        })
        .collect();
    let siblings = builder.create_vector(&siblings);
    let clock: Vec<_> =
        versions.clock.iter().map(|&(actor, counter)| wire::ClockEntry::new(actor, counter)).collect();
    let clock = builder.create_vector(&clock);
    let chosen: Vec<_> = versions
        .chosen
        .iter()
        .map(|&(ballot, actor, counter)| wire::ChosenWrite::new(&ballot.to_wire(), actor, counter))
        .collect();
    let chosen = (!chosen.is_empty()).then(|| builder.create_vector(&chosen));
    let newest_blind = versions
        .newest_blind
        .map(|(timestamp_us, actor, counter)| wire::BlindWrite::new(timestamp_us, counter, actor));
    let acceptor = &versions.acceptor;
    let has_state = *acceptor != AcceptorData::default();
    let promised = acceptor.promised.to_wire();
    let committed = acceptor.committed.to_wire();
    let accepted = acceptor.accepted.as_ref().map(|(ballot, _)| ballot.to_wire());
    let accepted_proposal =
        acceptor.accepted.as_ref().map(|(_, proposal)| builder.create_vector(&encode_key_versions(proposal)));
    let root = wire::KeyVersions::create(
        &mut builder,
        &wire::KeyVersionsArgs {
            clock: Some(clock),
            siblings: Some(siblings),
            promised: has_state.then_some(&promised),
            accepted: accepted.as_ref(),
            accepted_proposal,
            committed: has_state.then_some(&committed),
            chosen,
            newest_blind: newest_blind.as_ref(),
        },
    );
    builder.finish_minimal(root);
    builder.finished_data().to_vec()
}

/// Verifies and copies out a key's versions; checks order, counts and sizes.
pub fn decode_key_versions(bytes: &[u8]) -> Result<KeyVersionsData, String> {
    decode_versions(bytes, true)
}

/// `may_hold_acceptor` is false for a proposal inside a record, which may not hold acceptor
/// state of its own (so decoding never recurses twice).
fn decode_versions(bytes: &[u8], may_hold_acceptor: bool) -> Result<KeyVersionsData, String> {
    if bytes.len() > crate::STORED_VALUE_SIZE_MAX {
        return Err(format!("versions of {} bytes exceed the stored-value limit", bytes.len()));
    }
    let root = flatbuffers::root_with_opts::<wire::KeyVersions>(&options(), bytes)
        .map_err(|error| format!("invalid versions: {error}"))?;
    let clock: Vec<(u32, u64)> =
        root.clock().iter().flatten().map(|entry| (entry.actor(), entry.counter())).collect();
    if clock.len() > CLOCK_ENTRY_COUNT_MAX {
        return Err(format!("version vector of {} entries", clock.len()));
    }
    let disordered = clock.windows(2).any(|pair| matches!(pair, [a, b] if a.0 >= b.0));
    if disordered || clock.iter().any(|&(_, counter)| counter == 0) {
        return Err("version vector out of order or with a zero counter".into());
    }
    let siblings = root.siblings();
    if siblings.map_or(0, |s| s.len()) > STORED_SIBLING_COUNT_MAX {
        return Err("too many siblings".into());
    }
    let mut out = Vec::new();
    for sibling in siblings.iter().flatten() {
        let value = sibling.value().map(|v| v.bytes().to_vec());
        if sibling.tombstone() != value.is_none() {
            return Err("a sibling must be a tombstone or hold a value, not both".into());
        }
        if value.as_ref().is_some_and(|v| v.len() > VALUE_SIZE_MAX) {
            return Err("sibling value beyond the size limit".into());
        }
        if sibling.counter() == 0 {
            return Err("sibling with a zero counter".into());
        }
        out.push(StoredSibling {
            actor: sibling.actor(),
            counter: sibling.counter(),
            value,
            timestamp_us: sibling.timestamp_us(),
            expires_at_ms: sibling.expires_at_ms(),
            blind: sibling.blind(),
        });
    }
    let has_acceptor = root.promised().is_some()
        || root.accepted().is_some()
        || root.accepted_proposal().is_some()
        || root.committed().is_some();
    if has_acceptor && !may_hold_acceptor {
        return Err("a proposal with acceptor state of its own".into());
    }
    let accepted = match (root.accepted(), root.accepted_proposal()) {
        (None, None) => None,
        (Some(ballot), Some(proposal)) => {
            Some((Ballot::from_wire(ballot), Box::new(decode_versions(proposal.bytes(), false)?)))
        }
        _ => return Err("an accepted ballot without its proposal, or the reverse".into()),
    };
    let chosen: Vec<(Ballot, u32, u64)> = root
        .chosen()
        .iter()
        .flatten()
        .map(|write| (Ballot::from_wire(write.ballot()), write.actor(), write.counter()))
        .collect();
    if chosen.len() > CHOSEN_WRITE_COUNT_MAX {
        return Err(format!("{} chosen writes remembered", chosen.len()));
    }
    let acceptor = AcceptorData {
        promised: root.promised().map(Ballot::from_wire).unwrap_or_default(),
        accepted,
        committed: root.committed().map(Ballot::from_wire).unwrap_or_default(),
    };
    let newest_blind =
        root.newest_blind().map(|write| (write.timestamp_us(), write.actor(), write.counter()));
    if newest_blind.is_some_and(|(_, _, counter)| counter == 0) {
        return Err("a blind write with a zero counter".into());
    }
    Ok(KeyVersionsData { clock, siblings: out, chosen, acceptor, newest_blind })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipKind {
    Digest,
    Reply,
    States,
}

/// A ring change a node drives: transfers done and planned, bytes copied, time spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamProgress {
    pub ranges_done: u32,
    pub ranges_total: u32,
    pub bytes: u64,
    pub elapsed_ms: u64,
}

/// What a node says about itself (see `wire::GossipNodeState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipNode {
    pub node: String,
    pub generation: u64,
    pub heartbeat: u64,
    pub address: String,
    pub status: wire::NodeStatus,
    pub shard_ports: Vec<u16>,
    /// The client port (--listen), on the IP of `address`; 0 if not announced.
    pub client_port: u16,
    pub load_bytes: u64,
    pub members: Vec<String>,
    pub replica_count: u8,
    pub partition_bits: u8,
    pub ring_version: u64,
    pub stream: StreamProgress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipData {
    pub kind: GossipKind,
    pub from: String,
    pub address: String,
    pub versions: Vec<(String, u64, u64)>,
    pub states: Vec<GossipNode>,
    pub wanted: Vec<String>,
}

fn strings<'b>(
    builder: &mut FlatBufferBuilder<'b>,
    items: &[String],
) -> WIPOffset<flatbuffers::Vector<'b, flatbuffers::ForwardsUOffset<&'b str>>> {
    let offsets: Vec<_> = items.iter().map(|item| builder.create_string(item)).collect();
    builder.create_vector(&offsets)
}

pub fn encode_gossip(message: &GossipData) -> Vec<u8> {
    let mut builder = FlatBufferBuilder::with_capacity(1024);
    let from = builder.create_string(&message.from);
    let address = builder.create_string(&message.address);
    let versions: Vec<_> = message
        .versions
        .iter()
        .map(|(node, generation, heartbeat)| {
            let node = builder.create_string(node);
            wire::GossipVersion::create(
                &mut builder,
                &wire::GossipVersionArgs { node: Some(node), generation: *generation, heartbeat: *heartbeat },
            )
        })
        .collect();
    let versions = builder.create_vector(&versions);
    let states: Vec<_> = message
        .states
        .iter()
        .map(|state| {
            let node = builder.create_string(&state.node);
            let address = builder.create_string(&state.address);
            let shard_ports = builder.create_vector(&state.shard_ports);
            let members = strings(&mut builder, &state.members);
            wire::GossipNodeState::create(
                &mut builder,
                &wire::GossipNodeStateArgs {
                    node: Some(node),
                    generation: state.generation,
                    heartbeat: state.heartbeat,
                    address: Some(address),
                    status: state.status,
                    shard_ports: Some(shard_ports),
                    client_port: state.client_port,
                    load_bytes: state.load_bytes,
                    members: Some(members),
                    replica_count: state.replica_count,
                    partition_bits: state.partition_bits,
                    ring_version: state.ring_version,
                    stream_ranges_done: state.stream.ranges_done,
                    stream_ranges_total: state.stream.ranges_total,
                    stream_bytes: state.stream.bytes,
                    stream_elapsed_ms: state.stream.elapsed_ms,
                },
            )
        })
        .collect();
    let states = builder.create_vector(&states);
    let wanted = strings(&mut builder, &message.wanted);
    let kind = match message.kind {
        GossipKind::Digest => wire::GossipKind::DIGEST,
        GossipKind::Reply => wire::GossipKind::REPLY,
        GossipKind::States => wire::GossipKind::STATES,
    };
    let root = wire::GossipMessage::create(
        &mut builder,
        &wire::GossipMessageArgs {
            kind,
            from: Some(from),
            address: Some(address),
            versions: Some(versions),
            states: Some(states),
            wanted: Some(wanted),
        },
    );
    builder.finish_minimal(root);
    builder.finished_data().to_vec()
}

fn check_node_count(count: usize) -> Result<(), String> {
    if count > NODE_COUNT_MAX {
        return Err(format!("{count} nodes in one message"));
    }
    Ok(())
}

pub fn decode_gossip(bytes: &[u8]) -> Result<GossipData, String> {
    let root = flatbuffers::root_with_opts::<wire::GossipMessage>(&options(), bytes)
        .map_err(|error| format!("invalid gossip: {error}"))?;
    let kind = match root.kind() {
        wire::GossipKind::DIGEST => GossipKind::Digest,
        wire::GossipKind::REPLY => GossipKind::Reply,
        wire::GossipKind::STATES => GossipKind::States,
        other => return Err(format!("unknown gossip kind {}", other.0)),
    };
    let versions: Vec<_> = root
        .versions()
        .iter()
        .flatten()
        .map(|v| (v.node().unwrap_or("").to_string(), v.generation(), v.heartbeat()))
        .collect();
    check_node_count(versions.len())?;
    let mut states = Vec::new();
    for state in root.states().iter().flatten() {
        if state.status().variant_name().is_none() {
            return Err(format!("unknown node status {}", state.status().0));
        }
        if state.partition_bits() > PARTITION_BITS_MAX {
            return Err(format!("{} partition bits", state.partition_bits()));
        }
        let members: Vec<String> = state.members().iter().flatten().map(str::to_string).collect();
        check_node_count(members.len())?;
        states.push(GossipNode {
            node: state.node().unwrap_or("").to_string(),
            generation: state.generation(),
            heartbeat: state.heartbeat(),
            address: state.address().unwrap_or("").to_string(),
            status: state.status(),
            shard_ports: state.shard_ports().map(|p| p.iter().collect()).unwrap_or_default(),
            client_port: state.client_port(),
            load_bytes: state.load_bytes(),
            members,
            replica_count: state.replica_count(),
            partition_bits: state.partition_bits(),
            ring_version: state.ring_version(),
            stream: StreamProgress {
                ranges_done: state.stream_ranges_done(),
                ranges_total: state.stream_ranges_total(),
                bytes: state.stream_bytes(),
                elapsed_ms: state.stream_elapsed_ms(),
            },
        });
    }
    check_node_count(states.len())?;
    let wanted: Vec<String> = root.wanted().iter().flatten().map(str::to_string).collect();
    check_node_count(wanted.len())?;
    Ok(GossipData {
        kind,
        from: root.from().unwrap_or("").to_string(),
        address: root.address().unwrap_or("").to_string(),
        versions,
        states,
        wanted,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyNode {
    pub name: String,
    /// Shard 0's own address (where nodes reach it).
    pub address: String,
    pub shard_ports: Vec<u16>,
    /// The port clients connect to, on the IP of `address`; 0 if unknown.
    pub client_port: u16,
    pub up: bool,
    pub status: wire::NodeStatus,
    pub load_bytes: u64,
    pub stream: StreamProgress,
}

/// The cluster as one node sees it (see `wire::TopologyReply`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyData {
    pub formed: bool,
    pub replica_count: u8,
    pub partition_bits: u8,
    pub owners: Vec<u16>,
    pub nodes: Vec<TopologyNode>,
    pub ring_version: u64,
}

impl TopologyData {
    /// The replicas of `key`, as indexes into `nodes`: the owner of the key's partition (the
    /// top `partition_bits` bits of [`crate::key_hash`]) and the owners of the next
    /// partitions clockwise, distinct, up to `replica_count`. The server's ring computes the
    /// same (`server/cluster/src/ring.rs`, checked against this in its tests).
    pub fn replicas(&self, key: &[u8]) -> Vec<usize> {
        let mut replicas = Vec::with_capacity(self.replica_count as usize);
        if !self.formed || self.owners.is_empty() || self.partition_bits == 0 {
            return replicas;
        }
        let partition = (crate::key_hash(key) >> (64 - u32::from(self.partition_bits))) as usize;
        for step in 0..self.owners.len() {
            if replicas.len() == self.replica_count as usize {
                break;
            }
            let Some(&owner) = self.owners.get((partition + step) % self.owners.len()) else { break };
            let owner = usize::from(owner);
            if !replicas.contains(&owner) {
                replicas.push(owner);
            }
        }
        replicas
    }
}

pub fn encode_topology(topology: &TopologyData) -> Vec<u8> {
    let mut builder = FlatBufferBuilder::with_capacity(1024);
    let nodes: Vec<_> = topology
        .nodes
        .iter()
        .map(|node| {
            let name = builder.create_string(&node.name);
            let address = builder.create_string(&node.address);
            let shard_ports = builder.create_vector(&node.shard_ports);
            wire::TopologyNode::create(
                &mut builder,
                &wire::TopologyNodeArgs {
                    name: Some(name),
                    address: Some(address),
                    shard_ports: Some(shard_ports),
                    client_port: node.client_port,
                    up: node.up,
                    status: node.status,
                    load_bytes: node.load_bytes,
                    stream_ranges_done: node.stream.ranges_done,
                    stream_ranges_total: node.stream.ranges_total,
                    stream_bytes: node.stream.bytes,
                    stream_elapsed_ms: node.stream.elapsed_ms,
                },
            )
        })
        .collect();
    let nodes = builder.create_vector(&nodes);
    let owners = builder.create_vector(&topology.owners);
    let root = wire::TopologyReply::create(
        &mut builder,
        &wire::TopologyReplyArgs {
            formed: topology.formed,
            replica_count: topology.replica_count,
            partition_bits: topology.partition_bits,
            owners: Some(owners),
            nodes: Some(nodes),
            ring_version: topology.ring_version,
        },
    );
    builder.finish_minimal(root);
    builder.finished_data().to_vec()
}

/// Verifies a topology, including that every owner names a listed node.
pub fn decode_topology(bytes: &[u8]) -> Result<TopologyData, String> {
    let root = flatbuffers::root_with_opts::<wire::TopologyReply>(&options(), bytes)
        .map_err(|error| format!("invalid topology: {error}"))?;
    let nodes: Vec<_> = root
        .nodes()
        .iter()
        .flatten()
        .map(|node| TopologyNode {
            name: node.name().unwrap_or("").to_string(),
            address: node.address().unwrap_or("").to_string(),
            shard_ports: node.shard_ports().map(|p| p.iter().collect()).unwrap_or_default(),
            client_port: node.client_port(),
            up: node.up(),
            status: node.status(),
            load_bytes: node.load_bytes(),
            stream: StreamProgress {
                ranges_done: node.stream_ranges_done(),
                ranges_total: node.stream_ranges_total(),
                bytes: node.stream_bytes(),
                elapsed_ms: node.stream_elapsed_ms(),
            },
        })
        .collect();
    check_node_count(nodes.len())?;
    let owners: Vec<u16> = root.owners().map(|o| o.iter().collect()).unwrap_or_default();
    if root.partition_bits() > PARTITION_BITS_MAX {
        return Err(format!("{} partition bits", root.partition_bits()));
    }
    if root.formed() && owners.len() != 1 << root.partition_bits() {
        return Err(format!("{} owners for {} partition bits", owners.len(), root.partition_bits()));
    }
    if owners.iter().any(|&owner| owner as usize >= nodes.len()) {
        return Err("a partition owner names no node".into());
    }
    Ok(TopologyData {
        formed: root.formed(),
        replica_count: root.replica_count(),
        partition_bits: root.partition_bits(),
        owners,
        nodes,
        ring_version: root.ring_version(),
    })
}

/// Leaves of a partition's Merkle tree (a bit each in `AntiEntropy.leaves`).
pub const MERKLE_LEAF_COUNT: usize = 64;
/// Keys one `MerkleReply` may list (the asker asks for fewer leaves at a time if needed).
pub const MERKLE_KEY_COUNT_MAX: usize = 1 << 16;

/// One replica's answer to `AntiEntropy` (see `wire::MerkleReply`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MerkleData {
    /// Empty, or exactly [`MERKLE_LEAF_COUNT`] leaf hashes.
    pub leaves: Vec<u64>,
    /// Keys and the digests of their versions.
    pub keys: Vec<(Vec<u8>, u64)>,
}

pub fn encode_merkle(merkle: &MerkleData) -> Vec<u8> {
    let mut builder = FlatBufferBuilder::with_capacity(1024);
    let keys: Vec<_> = merkle
        .keys
        .iter()
        .map(|(key, digest)| {
            let key = builder.create_vector(key);
            wire::KeyDigest::create(&mut builder, &wire::KeyDigestArgs { key: Some(key), digest: *digest })
        })
        .collect();
    let keys = builder.create_vector(&keys);
    let leaves = builder.create_vector(&merkle.leaves);
    let root = wire::MerkleReply::create(
        &mut builder,
        &wire::MerkleReplyArgs { leaves: Some(leaves), keys: Some(keys) },
    );
    builder.finish_minimal(root);
    builder.finished_data().to_vec()
}

/// Verifies a Merkle reply: a whole tree or none, valid keys, bounded counts.
pub fn decode_merkle(bytes: &[u8]) -> Result<MerkleData, String> {
    let root = flatbuffers::root_with_opts::<wire::MerkleReply>(&options(), bytes)
        .map_err(|error| format!("invalid Merkle reply: {error}"))?;
    let leaves: Vec<u64> = root.leaves().map(|l| l.iter().collect()).unwrap_or_default();
    if !leaves.is_empty() && leaves.len() != MERKLE_LEAF_COUNT {
        return Err(format!("{} Merkle leaves, expected {MERKLE_LEAF_COUNT}", leaves.len()));
    }
    let entries = root.keys().unwrap_or_default();
    if entries.len() > MERKLE_KEY_COUNT_MAX {
        return Err(format!("{} keys in a Merkle reply", entries.len()));
    }
    let mut keys = Vec::with_capacity(entries.len());
    for entry in entries {
        let key = entry.key().map(|k| k.bytes()).unwrap_or(&[]);
        if !key_is_valid(key) {
            return Err("a Merkle reply names an invalid key".into());
        }
        keys.push((key.to_vec(), entry.digest()));
    }
    Ok(MerkleData { leaves, keys })
}

/// Checks a key from a peer the way a client's is checked.
pub fn key_is_valid(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= KEY_SIZE_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_versions_roundtrip_and_reject_disorder() {
        let versions = KeyVersionsData {
            clock: vec![(1, 5), (7, 2)],
            siblings: vec![
                StoredSibling {
                    actor: 1,
                    counter: 5,
                    value: Some(b"v".to_vec()),
                    timestamp_us: 3,
                    expires_at_ms: 0,
                    blind: false,
                },
                StoredSibling {
                    actor: 7,
                    counter: 2,
                    value: None,
                    timestamp_us: 4,
                    expires_at_ms: 9,
                    blind: true,
                },
            ],
            chosen: vec![(Ballot { time_us: 5, actor: 1, counter: 2 }, 1, 5)],
            acceptor: AcceptorData::default(),
            newest_blind: Some((4, 7, 2)),
        };
        assert_eq!(decode_key_versions(&encode_key_versions(&versions)), Ok(versions.clone()));
        // A stored record: the acceptor state round-trips too, and a proposal may not nest
        // acceptor state of its own.
        let ballot = |time_us| Ballot { time_us, actor: 3, counter: 1 };
        let record = KeyVersionsData {
            acceptor: AcceptorData {
                promised: ballot(9),
                accepted: Some((ballot(8), Box::new(versions.clone()))),
                committed: ballot(7),
            },
            ..versions.clone()
        };
        assert_eq!(decode_key_versions(&encode_key_versions(&record)), Ok(record.clone()));
        let nested = KeyVersionsData {
            acceptor: AcceptorData { accepted: Some((ballot(10), Box::new(record))), ..Default::default() },
            ..versions
        };
        assert!(decode_key_versions(&encode_key_versions(&nested)).is_err());
        let disordered =
            KeyVersionsData { clock: vec![(7, 2), (1, 5)], siblings: Vec::new(), ..Default::default() };
        assert!(decode_key_versions(&encode_key_versions(&disordered)).is_err());
        assert!(decode_key_versions(b"\x01\x02").is_err());
    }

    #[test]
    fn gossip_and_topology_roundtrip() {
        let gossip = GossipData {
            kind: GossipKind::Reply,
            from: "a".into(),
            address: "127.0.0.1:1".into(),
            versions: vec![("a".into(), 1, 2)],
            states: vec![GossipNode {
                node: "a".into(),
                generation: 1,
                heartbeat: 2,
                address: "127.0.0.1:1".into(),
                status: wire::NodeStatus::NORMAL,
                shard_ports: vec![1, 2],
                client_port: 7,
                load_bytes: 3,
                members: vec!["a".into(), "b".into()],
                replica_count: 3,
                partition_bits: 8,
                ring_version: 4,
                stream: StreamProgress { ranges_done: 1, ranges_total: 2, bytes: 3, elapsed_ms: 4 },
            }],
            wanted: vec!["b".into()],
        };
        assert_eq!(decode_gossip(&encode_gossip(&gossip)), Ok(gossip));
        let topology = TopologyData {
            formed: true,
            replica_count: 1,
            partition_bits: 1,
            owners: vec![0, 0],
            nodes: vec![TopologyNode {
                name: "a".into(),
                address: "x".into(),
                shard_ports: vec![5],
                client_port: 8,
                up: true,
                status: wire::NodeStatus::NORMAL,
                load_bytes: 0,
                stream: StreamProgress { ranges_done: 5, ranges_total: 6, bytes: 7, elapsed_ms: 8 },
            }],
            ring_version: 9,
        };
        assert_eq!(decode_topology(&encode_topology(&topology)), Ok(topology.clone()));
        let bad = TopologyData { owners: vec![0, 1], ..topology };
        assert!(decode_topology(&encode_topology(&bad)).is_err());
        let merkle = MerkleData { leaves: vec![7; MERKLE_LEAF_COUNT], keys: vec![(b"k".to_vec(), 9)] };
        assert_eq!(decode_merkle(&encode_merkle(&merkle)), Ok(merkle));
        let short = MerkleData { leaves: vec![7; 3], keys: Vec::new() };
        assert!(decode_merkle(&encode_merkle(&short)).is_err());
    }
}
