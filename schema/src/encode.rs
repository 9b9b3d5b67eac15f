//! Encoding of frames: a 4-byte little-endian length prefix and one FlatBuffers buffer.

use flatbuffers::FlatBufferBuilder;

use crate::wire;
use crate::{Op, RequestView, ShardFunction, Status, PEER_FRAME_SIZE_MAX};

/// What a Hello reply tells a client about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    pub protocol_version: u32,
    pub node_id: String,
    pub shard_count: u16,
    pub shard_function: ShardFunction,
    pub shard_hash_seed: u64,
    pub client_port: u16,
    /// `(shard, port)` for every shard's own port.
    pub shard_ports: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, Copy)]
pub struct SiblingOut<'a> {
    /// `None` in replies to a metadata-only read: the field is left out.
    pub value: Option<&'a [u8]>,
    pub timestamp_us: u64,
    pub ttl_left_ms: u64,
}

/// A response to encode.
#[derive(Debug, Clone, Copy)]
pub struct ResponseOut<'a> {
    pub id: u64,
    pub status: Status,
    pub message: &'a str,
    pub siblings: &'a [SiblingOut<'a>],
    pub context: &'a [u8],
    pub hello: Option<&'a HelloInfo>,
    pub stats_json: Option<&'a str>,
    /// Nested `KeyVersions` bytes; empty: absent.
    pub versions: &'a [u8],
    /// Nested `TopologyReply` bytes; empty: absent.
    pub topology: &'a [u8],
    /// Nested `MerkleReply` bytes; empty: absent.
    pub merkle: &'a [u8],
    /// The reply to RingChange (JSON).
    pub ring: Option<&'a str>,
    /// Siblings left out of a read's reply (they follow those in `siblings`).
    pub siblings_omitted: u32,
}

impl<'a> ResponseOut<'a> {
    pub fn status(id: u64, status: Status, message: &'a str) -> ResponseOut<'a> {
        ResponseOut {
            id,
            status,
            message,
            siblings: &[],
            context: &[],
            hello: None,
            stats_json: None,
            versions: &[],
            topology: &[],
            merkle: &[],
            ring: None,
            siblings_omitted: 0,
        }
    }
}

fn finish_frame(builder: &mut FlatBufferBuilder<'_>, out: &mut Vec<u8>) {
    let data = builder.finished_data();
    assert!(data.len() <= PEER_FRAME_SIZE_MAX, "encoded frame of {} bytes", data.len());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    builder.reset();
}

/// Appends one response frame to `out`. `builder` is reused across calls.
pub fn encode_response(builder: &mut FlatBufferBuilder<'_>, out: &mut Vec<u8>, response: &ResponseOut<'_>) {
    if !crate::fast::encode_response(out, response) {
        encode_response_general(builder, out, response);
    }
}

/// [`encode_response`] through the FlatBuffers builder alone, for every shape.
#[doc(hidden)]
pub fn encode_response_general(
    builder: &mut FlatBufferBuilder<'_>,
    out: &mut Vec<u8>,
    response: &ResponseOut<'_>,
) {
    let message = (!response.message.is_empty()).then(|| builder.create_string(response.message));
    let siblings = if response.siblings.is_empty() {
        None
    } else {
        let offsets: Vec<_> = response
            .siblings
            .iter()
            .map(|sibling| {
                let value = sibling.value.map(|value| builder.create_vector(value));
                wire::Sibling::create(
                    builder,
                    &wire::SiblingArgs {
                        value,
                        timestamp_us: sibling.timestamp_us,
                        ttl_left_ms: sibling.ttl_left_ms,
                    },
                )
            })
            .collect();
        Some(builder.create_vector(&offsets))
    };
    let context = (!response.context.is_empty()).then(|| builder.create_vector(response.context));
    let hello = response.hello.map(|hello| {
        let node_id = builder.create_string(&hello.node_id);
        let ports: Vec<_> = hello
            .shard_ports
            .iter()
            .map(|&(shard, port)| wire::ShardPort::create(builder, &wire::ShardPortArgs { shard, port }))
            .collect();
        let shard_ports = builder.create_vector(&ports);
        wire::HelloReply::create(
            builder,
            &wire::HelloReplyArgs {
                protocol_version: hello.protocol_version,
                node_id: Some(node_id),
                shard_count: hello.shard_count,
                shard_function: hello.shard_function,
                shard_hash_seed: hello.shard_hash_seed,
                client_port: hello.client_port,
                shard_ports: Some(shard_ports),
            },
        )
    });
    let stats_json = response.stats_json.map(|json| builder.create_string(json));
    let versions = (!response.versions.is_empty()).then(|| builder.create_vector(response.versions));
    let topology = (!response.topology.is_empty()).then(|| builder.create_vector(response.topology));
    let merkle = (!response.merkle.is_empty()).then(|| builder.create_vector(response.merkle));
    let ring = response.ring.map(|ring| builder.create_string(ring));
    let root = wire::Response::create(
        builder,
        &wire::ResponseArgs {
            id: response.id,
            status: response.status,
            message,
            siblings,
            context,
            hello,
            stats_json,
            versions,
            topology,
            merkle,
            ring,
            siblings_omitted: response.siblings_omitted,
        },
    );
    builder.finish_minimal(root);
    finish_frame(builder, out);
}

/// Appends one request frame to `out`. `builder` is reused across calls.
pub fn encode_request(builder: &mut FlatBufferBuilder<'_>, out: &mut Vec<u8>, request: &RequestView<'_>) {
    if !crate::fast::encode_request(out, request) {
        encode_request_general(builder, out, request);
    }
}

/// [`encode_request`] through the FlatBuffers builder alone, for every shape.
#[doc(hidden)]
pub fn encode_request_general(
    builder: &mut FlatBufferBuilder<'_>,
    out: &mut Vec<u8>,
    request: &RequestView<'_>,
) {
    let (op_type, op) = match request.op {
        Op::Hello { protocol_version, client_name } => {
            let client_name = builder.create_string(client_name);
            let args = wire::HelloArgs { protocol_version, client_name: Some(client_name) };
            (wire::Operation::Hello, wire::Hello::create(builder, &args).as_union_value())
        }
        Op::Stats => {
            (wire::Operation::Stats, wire::Stats::create(builder, &wire::StatsArgs {}).as_union_value())
        }
        Op::Topology => (
            wire::Operation::Topology,
            wire::Topology::create(builder, &wire::TopologyArgs {}).as_union_value(),
        ),
        Op::Snapshot { dir } => {
            let dir = builder.create_string(dir);
            let args = wire::SnapshotArgs { dir: Some(dir) };
            (wire::Operation::Snapshot, wire::Snapshot::create(builder, &args).as_union_value())
        }
        Op::Replicate { key, versions } => {
            let key = builder.create_vector(key);
            let versions = builder.create_vector(versions);
            let args = wire::ReplicateArgs { key: Some(key), versions: Some(versions) };
            (wire::Operation::Replicate, wire::Replicate::create(builder, &args).as_union_value())
        }
        Op::ReadReplica { key } => {
            let key = builder.create_vector(key);
            let args = wire::ReadReplicaArgs { key: Some(key) };
            (wire::Operation::ReadReplica, wire::ReadReplica::create(builder, &args).as_union_value())
        }
        Op::Paxos { key, phase, ballot, proposal, ring_version } => {
            let key = builder.create_vector(key);
            let proposal = builder.create_vector(proposal);
            let ballot = ballot.to_wire();
            let args = wire::PaxosArgs {
                key: Some(key),
                phase,
                ballot: Some(&ballot),
                proposal: Some(proposal),
                ring_version,
            };
            (wire::Operation::Paxos, wire::Paxos::create(builder, &args).as_union_value())
        }
        Op::AntiEntropy { partition, partition_bits, shard_count, shard_index, leaves } => {
            let args = wire::AntiEntropyArgs { partition, partition_bits, shard_count, shard_index, leaves };
            (wire::Operation::AntiEntropy, wire::AntiEntropy::create(builder, &args).as_union_value())
        }
        Op::RingChange { phase, version, ballot, state } => {
            let state = builder.create_string(state);
            let ballot = ballot.to_wire();
            let args = wire::RingChangeArgs { phase, version, ballot: Some(&ballot), state: Some(state) };
            (wire::Operation::RingChange, wire::RingChange::create(builder, &args).as_union_value())
        }
        Op::Transfer { partition, sources } => {
            let sources = builder.create_string(sources);
            let args = wire::TransferArgs { partition, sources: Some(sources) };
            (wire::Operation::Transfer, wire::Transfer::create(builder, &args).as_union_value())
        }
        Op::ChangeMembership { action, node } => {
            let node = builder.create_string(node);
            let args = wire::ChangeMembershipArgs { action, node: Some(node) };
            (
                wire::Operation::ChangeMembership,
                wire::ChangeMembership::create(builder, &args).as_union_value(),
            )
        }
        Op::Repair => {
            (wire::Operation::Repair, wire::Repair::create(builder, &wire::RepairArgs {}).as_union_value())
        }
        Op::Gossip { message } => {
            let message = builder.create_vector(message);
            let args = wire::GossipArgs { message: Some(message) };
            (wire::Operation::Gossip, wire::Gossip::create(builder, &args).as_union_value())
        }
        Op::Put { key, value, ttl_ms } => {
            let key = builder.create_vector(key);
            let value = builder.create_vector(value);
            let args = wire::PutArgs { key: Some(key), value: Some(value), ttl_ms };
            (wire::Operation::Put, wire::Put::create(builder, &args).as_union_value())
        }
        Op::Get { key, metadata_only, sibling_skip } => {
            let key = builder.create_vector(key);
            let args = wire::GetArgs { key: Some(key), metadata_only, sibling_skip };
            (wire::Operation::Get, wire::Get::create(builder, &args).as_union_value())
        }
        Op::Delete { key } => {
            let key = builder.create_vector(key);
            let args = wire::DeleteArgs { key: Some(key) };
            (wire::Operation::Delete, wire::Delete::create(builder, &args).as_union_value())
        }
        Op::Cas { key, expected, new_value, ttl_ms } => {
            let key = builder.create_vector(key);
            let expected = expected.map(|expected| builder.create_vector(expected));
            let new_value = builder.create_vector(new_value);
            let args = wire::CasArgs {
                key: Some(key),
                expect_absent: expected.is_none(),
                expected,
                new_value: Some(new_value),
                ttl_ms,
            };
            (wire::Operation::Cas, wire::Cas::create(builder, &args).as_union_value())
        }
    };
    let context = (!request.context.is_empty()).then(|| builder.create_vector(request.context));
    let write_id = request.write_id.map(|write_id| builder.create_vector(write_id));
    let root = wire::Request::create(
        builder,
        &wire::RequestArgs {
            id: request.id,
            timeout_ms: request.timeout_ms,
            consistency: request.consistency,
            context,
            write_id,
            op_type,
            op: Some(op),
        },
    );
    builder.finish_minimal(root);
    finish_frame(builder, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_request, parse_response, split_frame, Consistency, KEY_SIZE_MAX, VALUE_SIZE_MAX};

    fn request(op: Op<'_>) -> RequestView<'_> {
        RequestView {
            id: 7,
            timeout_ms: 100,
            consistency: Consistency::QUORUM,
            context: &[],
            write_id: None,
            op,
        }
    }

    fn roundtrip(op: Op<'_>) -> Result<Op<'static>, crate::ParseError> {
        let mut builder = FlatBufferBuilder::new();
        let mut out = Vec::new();
        encode_request(&mut builder, &mut out, &request(op));
        let payload = split_frame(&out).expect("frame size").expect("whole frame");
        assert_eq!(payload.len() + 4, out.len());
        let parsed = parse_request(payload)?;
        assert_eq!(parsed.id, 7);
        // Leak for the test only, so the borrowed view can be returned.
        let parsed: RequestView<'static> = parse_request(Box::leak(payload.to_vec().into_boxed_slice()))?;
        Ok(parsed.op)
    }

    #[test]
    fn requests_roundtrip() {
        let cases = [
            Op::Hello { protocol_version: 1, client_name: "test" },
            Op::Put { key: b"k", value: b"", ttl_ms: 5 },
            Op::Get { key: b"k", metadata_only: true, sibling_skip: 3 },
            Op::Delete { key: b"k" },
            Op::Cas { key: b"k", expected: None, new_value: b"v", ttl_ms: 0 },
            Op::Cas { key: b"k", expected: Some(b""), new_value: b"v", ttl_ms: 0 },
        ];
        for op in cases {
            assert_eq!(roundtrip(op), Ok(op));
        }
    }

    #[test]
    fn limits_have_their_own_status() {
        let long_key = vec![b'k'; KEY_SIZE_MAX + 1];
        let max_key = vec![b'k'; KEY_SIZE_MAX];
        let long_value = vec![0u8; VALUE_SIZE_MAX + 1];
        let max_value = vec![0u8; VALUE_SIZE_MAX];
        let status = |op| roundtrip(op).map(|_| Status::OK).unwrap_or_else(|e| e.status);
        assert_eq!(status(Op::Get { key: b"", metadata_only: false, sibling_skip: 0 }), Status::KEY_EMPTY);
        let get_long = Op::Get { key: &long_key, metadata_only: false, sibling_skip: 0 };
        assert_eq!(status(get_long), Status::KEY_TOO_LARGE);
        assert_eq!(status(Op::Put { key: &max_key, value: &max_value, ttl_ms: 0 }), Status::OK);
        assert_eq!(status(Op::Put { key: b"k", value: &long_value, ttl_ms: 0 }), Status::VALUE_TOO_LARGE);
        let cas = Op::Cas { key: b"k", expected: Some(&long_value), new_value: b"", ttl_ms: 0 };
        assert_eq!(status(cas), Status::VALUE_TOO_LARGE);
        assert_eq!(status(Op::Put { key: b"k", value: b"", ttl_ms: u64::MAX }), Status::BAD_REQUEST);
    }

    #[test]
    fn oversized_and_short_frames() {
        assert_eq!(split_frame(&[1, 0]), Ok(None));
        assert_eq!(split_frame(&[5, 0, 0, 0, 1]), Ok(None));
        assert!(split_frame(&u32::MAX.to_le_bytes()).is_err());
        assert_eq!(parse_request(&[1, 2, 3]).map(|_| ()).unwrap_err().status, Status::BAD_REQUEST);
    }

    #[test]
    fn responses_roundtrip() {
        let hello = HelloInfo {
            protocol_version: 1,
            node_id: "n1".into(),
            shard_count: 2,
            shard_function: ShardFunction::XXH3_64_MULSHIFT,
            shard_hash_seed: 0,
            client_port: 7400,
            shard_ports: vec![(0, 7401), (1, 7402)],
        };
        let siblings = [SiblingOut { value: Some(b"v"), timestamp_us: 3, ttl_left_ms: 4 }];
        let out = ResponseOut {
            id: 9,
            status: Status::OK,
            message: "",
            siblings: &siblings,
            context: b"ctx",
            hello: Some(&hello),
            stats_json: Some("{\"shard\":0}"),
            versions: &[],
            topology: &[],
            merkle: &[],
            ring: None,
            siblings_omitted: 5,
        };
        let mut builder = FlatBufferBuilder::new();
        let mut frame = Vec::new();
        encode_response(&mut builder, &mut frame, &out);
        let view = parse_response(&frame[4..]).expect("valid response");
        assert_eq!(view.id, 9);
        assert_eq!(view.stats_json.as_deref(), Some("{\"shard\":0}"));
        assert_eq!(view.siblings[0].value, b"v");
        assert_eq!(view.siblings[0].ttl_left_ms, 4);
        assert_eq!(view.context, b"ctx");
        assert_eq!(view.siblings_omitted, 5);
        assert_eq!(view.siblings_omitted, 5);
        assert_eq!(view.hello, Some(hello));
    }
}
