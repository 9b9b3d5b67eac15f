//! What a connection answers and how a reply becomes bytes: the `Body` of a response and its
//! FlatBuffers encoding (`encode_reply` is public for the benchmarks).

use std::rc::Rc;

use flatbuffers::FlatBufferBuilder;
use schema::{encode_response, ResponseOut, SiblingOut, Status};

use crate::command::{LocalReply, Reply, Version};

pub(super) enum Body {
    Reply(LocalReply),
    Hello,
    Stats(String),
    Status(Status, String),
    Topology(Vec<u8>),
    Merkle(Vec<u8>),
    Ring(String),
}

/// Encodes the response to request `id` into `out`.
pub(super) fn encode(
    builder: &mut FlatBufferBuilder<'_>,
    out: &mut Vec<u8>,
    id: u64,
    body: &Body,
    hello: &schema::HelloInfo,
) {
    match body {
        Body::Hello => {
            let response = ResponseOut { hello: Some(hello), ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        Body::Stats(json) => {
            let response = ResponseOut { stats_json: Some(json), ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        Body::Status(status, message) => {
            encode_response(builder, out, &ResponseOut::status(id, *status, message))
        }
        Body::Reply(reply) => encode_reply(builder, out, id, reply),
        Body::Topology(bytes) => {
            let response = ResponseOut { topology: bytes, ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        Body::Ring(json) => {
            let response = ResponseOut { ring: Some(json), ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        Body::Merkle(bytes) => {
            let response = ResponseOut { merkle: bytes, ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
    }
}

/// Appends the response frame of `reply` to request `id`.
pub fn encode_reply(builder: &mut FlatBufferBuilder<'_>, out: &mut Vec<u8>, id: u64, reply: &LocalReply) {
    match reply {
        Reply::Done => encode_response(builder, out, &ResponseOut::status(id, Status::OK, "")),
        Reply::Written(context) => {
            let response = ResponseOut { context, ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        Reply::NotFound => encode_response(builder, out, &ResponseOut::status(id, Status::NOT_FOUND, "")),
        Reply::Found(version) => {
            let siblings = [sibling_of(version)];
            let response = ResponseOut { siblings: &siblings, ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        Reply::CasFailed(current) => {
            let siblings: Vec<SiblingOut<'_>> = current.iter().map(sibling_of).collect();
            let response =
                ResponseOut { siblings: &siblings, ..ResponseOut::status(id, Status::CAS_FAILED, "") };
            encode_response(builder, out, &response);
        }
        Reply::Error { status, message } => {
            encode_response(builder, out, &ResponseOut::status(id, *status, message));
        }
        Reply::Siblings { versions, context, omitted } => {
            let siblings: Vec<SiblingOut<'_>> = versions.iter().map(sibling_of).collect();
            let status = if siblings.is_empty() && *omitted == 0 { Status::NOT_FOUND } else { Status::OK };
            let response = ResponseOut {
                siblings: &siblings,
                context,
                siblings_omitted: *omitted,
                ..ResponseOut::status(id, status, "")
            };
            encode_response(builder, out, &response);
        }
        Reply::Versions(bytes) => {
            let response = ResponseOut { versions: bytes, ..ResponseOut::status(id, Status::OK, "") };
            encode_response(builder, out, &response);
        }
        // Updates and shard stats never answer a native request.
        Reply::Updated(_) | Reply::Stats(_) => {
            encode_response(
                builder,
                out,
                &ResponseOut::status(id, Status::INTERNAL, "unexpected update reply"),
            );
        }
    }
}

fn sibling_of(version: &Version<Rc<[u8]>>) -> SiblingOut<'_> {
    SiblingOut {
        value: version.value.as_deref(),
        timestamp_us: version.timestamp_us,
        ttl_left_ms: version.ttl_left_ms,
    }
}
