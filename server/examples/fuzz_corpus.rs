//! Writes the seed corpora of the `peer_decode` and `durable_files_decode` fuzz targets:
//! real encodings of every payload they decode, made by the encoders the server uses.
//!
//! `cargo run -p server --example fuzz_corpus` (run again when a format changes, and commit
//! what it writes under `server/fuzz/corpus/`).

use std::path::Path;

use schema::peer::{
    encode_gossip, encode_key_versions, encode_merkle, encode_topology, AcceptorData, Ballot, GossipData,
    GossipKind, GossipNode, KeyVersionsData, MerkleData, StoredSibling, StreamProgress, TopologyData,
    TopologyNode, MERKLE_LEAF_COUNT,
};
use schema::wire::NodeStatus;
use server::cluster::hint_log::{self, LoggedHint};
use server::cluster::lease;
use server::cluster::ring_file;
use server::cluster::ring_state::{RingAcceptor, RingState};
use server::engine::manifest::{self, LiveTable, Manifest, TokenRange};
use server::meta::{self, NodeMeta};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn versions() -> KeyVersionsData {
    let sibling = |actor, counter, value: Option<&[u8]>, blind| StoredSibling {
        actor,
        counter,
        value: value.map(<[u8]>::to_vec),
        timestamp_us: 1_700_000_000_000_000 + counter,
        expires_at_ms: 0,
        blind,
    };
    KeyVersionsData {
        clock: vec![(1, 5), (7, 2)],
        siblings: vec![sibling(1, 5, Some(b"value"), false), sibling(7, 2, None, true)],
        chosen: vec![(Ballot { time_us: 5, actor: 1, counter: 2 }, 1, 5)],
        acceptor: AcceptorData::default(),
        newest_blind: Some((1_700_000_000_000_002, 7, 2)),
    }
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let peer = root.join("peer_decode");
    write(&peer, "versions", &encode_key_versions(&versions()))?;
    let ballot = |time_us| Ballot { time_us, actor: 3, counter: 1 };
    let record = KeyVersionsData {
        acceptor: AcceptorData {
            promised: ballot(9),
            accepted: Some((ballot(8), Box::new(versions()))),
            committed: ballot(7),
        },
        ..versions()
    };
    write(&peer, "record", &encode_key_versions(&record))?;
    let stream = StreamProgress { ranges_done: 1, ranges_total: 2, bytes: 3, elapsed_ms: 4 };
    let gossip = GossipData {
        kind: GossipKind::Reply,
        from: "n0".into(),
        address: "127.0.0.2:7401".into(),
        versions: vec![("n0".into(), 1, 2), ("n1".into(), 3, 4)],
        states: vec![GossipNode {
            node: "n0".into(),
            generation: 1,
            heartbeat: 2,
            address: "127.0.0.2:7401".into(),
            status: NodeStatus::NORMAL,
            shard_ports: vec![7401, 7402],
            client_port: 7400,
            load_bytes: 3,
            members: vec!["n0".into(), "n1".into()],
            replica_count: 3,
            partition_bits: 8,
            ring_version: 4,
            stream,
        }],
        wanted: vec!["n1".into()],
    };
    write(&peer, "gossip", &encode_gossip(&gossip))?;
    let topology = TopologyData {
        formed: true,
        replica_count: 1,
        partition_bits: 1,
        owners: vec![0, 0],
        nodes: vec![TopologyNode {
            name: "n0".into(),
            address: "127.0.0.2:7401".into(),
            shard_ports: vec![7401],
            client_port: 7400,
            up: true,
            status: NodeStatus::NORMAL,
            load_bytes: 10,
            stream,
        }],
        ring_version: 9,
    };
    write(&peer, "topology", &encode_topology(&topology))?;
    let tree = MerkleData { leaves: vec![7; MERKLE_LEAF_COUNT], keys: Vec::new() };
    write(&peer, "merkle-tree", &encode_merkle(&tree))?;
    let keys = MerkleData { leaves: Vec::new(), keys: vec![(b"k1".to_vec(), 9), (b"k2".to_vec(), 10)] };
    write(&peer, "merkle-keys", &encode_merkle(&keys))?;

    let files = root.join("durable_files_decode");
    let tables = vec![
        LiveTable { id: 3, tokens: TokenRange { first: 0, last: 1 << 63 } },
        LiveTable { id: 1, tokens: TokenRange::ALL },
    ];
    let manifest = Manifest { shard_index: 1, shard_count: 2, flushed_seq: 99, next_table_id: 4, tables };
    write(&files, "manifest", &manifest::encode(&manifest))?;
    write(&files, "node", &meta::encode(&NodeMeta { node_id: "n0123456789abcdef".into(), shard_count: 2 }))?;
    write(&files, "lease", &lease::encode(3 << 20))?;
    let ring = RingState::formed(vec!["n0".into(), "n1".into(), "n2".into()], 3, 4)
        .map_err(std::io::Error::other)?;
    let mut acceptor = RingAcceptor::new(ring.clone());
    acceptor.accept((7, 1, 1), ring.plan_join("n3").map_err(std::io::Error::other)?);
    write(&files, "cluster", &ring_file::encode(&acceptor))?;
    let hint =
        LoggedHint { id: 5, target: 1, key: b"key".to_vec(), versions: encode_key_versions(&versions()) };
    let mut log = hint_log::add_record(&hint);
    log.extend(hint_log::acknowledged_record(1, 5));
    log.extend(hint_log::add_record(&LoggedHint { id: 6, ..hint }));
    write(&files, "hint-log", &log)?;
    println!("corpora written under {}", root.display());
    Ok(())
}
