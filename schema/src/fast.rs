//! Hand-written reading and writing of the frames on the hot path: requests whose operation
//! is Get, Put, Delete, or a replica's Replicate or ReadReplica, and responses made of an id, a status, a message, siblings, a
//! context and a count of omitted siblings. Through the FlatBuffers builder and verifier a
//! native GET cost the server about 1,800 instructions to verify the request and 1,700 to
//! build the reply (callgrind, `bench/regress --callgrind`); these do it in about a tenth.
//!
//! The bytes stay plain FlatBuffers, and the general path stays the definition:
//! - a writer produces a buffer that the generated verifier accepts and that the general
//!   reader turns into the same view as the builder's buffer for the same input;
//! - a reader accepts a buffer only if every check the generated verifier makes on the
//!   fields it visits passes (the same alignment, relative to the buffer's start, the same
//!   bounds, the same apparent-size limit) and every limit `parse_*` applies holds, and then
//!   returns what the general reader returns. Anything else (another operation, a field
//!   these shapes do not carry, any error) it declines with `None`, and the general path
//!   decides, with its error messages.
//!
//! The tests below and the `frame_decode` fuzz target hold both sides to that.

use std::cell::Cell;

use crate::decode::{verifier_options, RequestView, ResponseView, SiblingView};
use crate::encode::ResponseOut;
use crate::wire::{self, Consistency, Operation, Status};
use crate::{
    Op, KEY_SIZE_MAX, PEER_FRAME_SIZE_MAX, SIBLING_COUNT_MAX, TTL_MS_MAX, VALUE_SIZE_MAX, WRITE_ID_SIZE,
};

/// A table found in a buffer: its position and its vtable (checked to lie in the buffer).
struct Table<'a> {
    pos: usize,
    vtable: &'a [u8],
}

/// Bounds- and alignment-checked reads of an untrusted buffer, counting the bytes every
/// check covers as the verifier does (its `max_apparent_size` limit).
struct Reader<'a> {
    buf: &'a [u8],
    apparent: Cell<usize>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, apparent: Cell::new(0) }
    }

    /// `size` bytes at `pos`, inside the buffer.
    fn range(&self, pos: usize, size: usize) -> Option<&'a [u8]> {
        let bytes = self.buf.get(pos..pos.checked_add(size)?)?;
        self.apparent.set(self.apparent.get().saturating_add(size));
        Some(bytes)
    }

    /// A scalar of `N` bytes at `pos`, aligned to its size (the verifier's rule for every
    /// scalar the schema uses).
    fn scalar<const N: usize>(&self, pos: usize) -> Option<[u8; N]> {
        if !pos.is_multiple_of(N) {
            return None;
        }
        self.range(pos, N)?.try_into().ok()
    }

    fn u16_at(&self, pos: usize) -> Option<u16> {
        self.scalar::<2>(pos).map(u16::from_le_bytes)
    }

    fn u32_at(&self, pos: usize) -> Option<u32> {
        self.scalar::<4>(pos).map(u32::from_le_bytes)
    }

    /// Follows the unsigned offset at `pos`.
    fn follow(&self, pos: usize) -> Option<usize> {
        Some(pos.saturating_add(self.u32_at(pos)? as usize))
    }

    fn table(&self, pos: usize) -> Option<Table<'a>> {
        let soffset = i32::from_le_bytes(self.scalar::<4>(pos)?);
        let vtable = if soffset > 0 {
            pos.checked_sub(soffset.unsigned_abs() as usize)?
        } else {
            pos.checked_add(soffset.unsigned_abs() as usize)?
        };
        if vtable >= self.buf.len() {
            return None;
        }
        let vtable_len = self.u16_at(vtable)? as usize;
        if !vtable.saturating_add(vtable_len).is_multiple_of(2) {
            return None;
        }
        Some(Table { pos, vtable: self.range(vtable, vtable_len)? })
    }

    /// Where field `voffset` of `table` is, if present. (The vtable is 2-aligned and of even
    /// length, so an entry inside it passes the verifier's checks.)
    fn field(&self, table: &Table<'_>, voffset: u16) -> Option<Option<usize>> {
        let voffset = voffset as usize;
        let Some(&[low, high]) = table.vtable.get(voffset..voffset + 2) else { return Some(None) };
        self.apparent.set(self.apparent.get().saturating_add(2));
        let offset = u16::from_le_bytes([low, high]);
        Some((offset > 0).then(|| table.pos.saturating_add(offset as usize)))
    }

    /// A scalar field: its bytes, or `None` inside when absent.
    fn scalar_field<const N: usize>(&self, table: &Table<'_>, voffset: u16) -> Option<Option<[u8; N]>> {
        match self.field(table, voffset)? {
            Some(pos) => self.scalar::<N>(pos).map(Some),
            None => Some(None),
        }
    }

    /// The vector of bytes at `pos` (its length, then the bytes).
    fn vector_at(&self, pos: usize) -> Option<&'a [u8]> {
        let len = self.u32_at(pos)? as usize;
        self.range(pos.saturating_add(4), len)
    }

    /// A `[ubyte]` field.
    fn bytes_field(&self, table: &Table<'_>, voffset: u16) -> Option<Option<&'a [u8]>> {
        match self.field(table, voffset)? {
            Some(pos) => self.vector_at(self.follow(pos)?).map(Some),
            None => Some(None),
        }
    }

    /// A `string` field: UTF-8 and followed by its NUL, as the verifier requires.
    fn string_field(&self, table: &Table<'_>, voffset: u16) -> Option<Option<&'a str>> {
        let Some(pos) = self.field(table, voffset)? else { return Some(None) };
        let pos = self.follow(pos)?;
        let bytes = self.vector_at(pos)?;
        let end = pos + 4 + bytes.len();
        if self.buf.get(end) != Some(&0) {
            return None;
        }
        std::str::from_utf8(bytes).ok().map(Some)
    }

    /// Whether the bytes checked stay within the verifier's limit.
    fn within_limits(&self) -> bool {
        self.apparent.get() <= verifier_options().max_apparent_size
    }
}

fn key_ok(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= KEY_SIZE_MAX
}

/// Reads a Get, Put, Delete, Replicate or ReadReplica request whose every limit holds;
/// `None` for anything else.
pub(crate) fn parse_request(payload: &[u8]) -> Option<RequestView<'_>> {
    let r = Reader::new(payload);
    let request = r.table(r.follow(0)?)?;
    let id = r.scalar_field::<8>(&request, wire::Request::VT_ID)?.map_or(0, u64::from_le_bytes);
    let timeout_ms =
        r.scalar_field::<4>(&request, wire::Request::VT_TIMEOUT_MS)?.map_or(0, u32::from_le_bytes);
    let consistency = r
        .scalar_field::<1>(&request, wire::Request::VT_CONSISTENCY)?
        .map_or(Consistency::QUORUM, |[byte]| Consistency(byte));
    let context = r.bytes_field(&request, wire::Request::VT_CONTEXT)?;
    let write_id = r.bytes_field(&request, wire::Request::VT_WRITE_ID)?;
    // The verifier looks up the union's value before its type.
    let op_pos = r.field(&request, wire::Request::VT_OP)?;
    let op_type_pos = r.field(&request, wire::Request::VT_OP_TYPE)?;
    let (Some(op_type_pos), Some(op_pos)) = (op_type_pos, op_pos) else { return None };
    let [op_type] = r.scalar::<1>(op_type_pos)?;
    let body = r.table(r.follow(op_pos)?)?;
    let op = match Operation(op_type) {
        Operation::Get => {
            let key = r.bytes_field(&body, wire::Get::VT_KEY)?.unwrap_or(&[]);
            let metadata_only = match r.scalar_field::<1>(&body, wire::Get::VT_METADATA_ONLY)? {
                None | Some([0]) => false,
                Some([1]) => true,
                Some(_) => return None,
            };
            let sibling_skip =
                r.scalar_field::<4>(&body, wire::Get::VT_SIBLING_SKIP)?.map_or(0, u32::from_le_bytes);
            Op::Get { key, metadata_only, sibling_skip }
        }
        Operation::Put => {
            let key = r.bytes_field(&body, wire::Put::VT_KEY)?.unwrap_or(&[]);
            let value = r.bytes_field(&body, wire::Put::VT_VALUE)?.unwrap_or(&[]);
            let ttl_ms = r.scalar_field::<8>(&body, wire::Put::VT_TTL_MS)?.map_or(0, u64::from_le_bytes);
            if value.len() > VALUE_SIZE_MAX || ttl_ms > TTL_MS_MAX {
                return None;
            }
            Op::Put { key, value, ttl_ms }
        }
        Operation::Delete => Op::Delete { key: r.bytes_field(&body, wire::Delete::VT_KEY)?.unwrap_or(&[]) },
        Operation::Replicate => {
            let key = r.bytes_field(&body, wire::Replicate::VT_KEY)?.unwrap_or(&[]);
            let versions = r.bytes_field(&body, wire::Replicate::VT_VERSIONS)?.unwrap_or(&[]);
            crate::peer::decode_key_versions(versions).ok()?;
            Op::Replicate { key, versions }
        }
        Operation::ReadReplica => {
            Op::ReadReplica { key: r.bytes_field(&body, wire::ReadReplica::VT_KEY)?.unwrap_or(&[]) }
        }
        _ => return None,
    };
    let limits_hold = consistency.variant_name().is_some()
        && write_id.is_none_or(|write_id| write_id.len() == WRITE_ID_SIZE)
        && op.key().is_some_and(key_ok)
        && r.within_limits();
    limits_hold.then_some(RequestView {
        id,
        timeout_ms,
        consistency,
        context: context.unwrap_or(&[]),
        write_id,
        op,
    })
}

/// Reads a response made only of id, status, message, siblings, context and omitted count;
/// `None` for anything else.
pub(crate) fn parse_response(payload: &[u8]) -> Option<ResponseView> {
    let r = Reader::new(payload);
    let response = r.table(r.follow(0)?)?;
    let id = r.scalar_field::<8>(&response, wire::Response::VT_ID)?.map_or(0, u64::from_le_bytes);
    let status = r.scalar_field::<2>(&response, wire::Response::VT_STATUS)?.map_or(0, u16::from_le_bytes);
    let message = r.string_field(&response, wire::Response::VT_MESSAGE)?;
    let siblings = match r.field(&response, wire::Response::VT_SIBLINGS)? {
        None => Vec::new(),
        Some(pos) => {
            let vector = r.follow(pos)?;
            let count = r.u32_at(vector)? as usize;
            if count > SIBLING_COUNT_MAX {
                return None;
            }
            r.range(vector + 4, count * 4)?;
            let mut siblings = Vec::with_capacity(count);
            for index in 0..count {
                let sibling = r.table(r.follow(vector + 4 + 4 * index)?)?;
                siblings.push(SiblingView {
                    value: r.bytes_field(&sibling, wire::Sibling::VT_VALUE)?.unwrap_or(&[]).to_vec(),
                    timestamp_us: r
                        .scalar_field::<8>(&sibling, wire::Sibling::VT_TIMESTAMP_US)?
                        .map_or(0, u64::from_le_bytes),
                    ttl_left_ms: r
                        .scalar_field::<8>(&sibling, wire::Sibling::VT_TTL_LEFT_MS)?
                        .map_or(0, u64::from_le_bytes),
                });
            }
            siblings
        }
    };
    let context = r.bytes_field(&response, wire::Response::VT_CONTEXT)?;
    // Fields these shapes never carry: the general path reads them.
    for voffset in [
        wire::Response::VT_HELLO,
        wire::Response::VT_STATS_JSON,
        wire::Response::VT_VERSIONS,
        wire::Response::VT_TOPOLOGY,
        wire::Response::VT_MERKLE,
        wire::Response::VT_RING,
    ] {
        if r.field(&response, voffset)?.is_some() {
            return None;
        }
    }
    let siblings_omitted =
        r.scalar_field::<4>(&response, wire::Response::VT_SIBLINGS_OMITTED)?.map_or(0, u32::from_le_bytes);
    r.within_limits().then(|| ResponseView {
        id,
        status: Status(status),
        message: message.unwrap_or("").to_string(),
        siblings,
        context: context.unwrap_or(&[]).to_vec(),
        hello: None,
        stats_json: None,
        versions: Vec::new(),
        topology: None,
        merkle: None,
        ring: None,
        siblings_omitted,
    })
}

/// Lays out a FlatBuffers buffer front to back, after a frame's length prefix: every table
/// right after its vtable, every child after its parent (unsigned offsets point forward).
/// Positions are relative to the buffer's start, which is what alignment is measured from.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    base: usize,
}

impl<'a> Writer<'a> {
    /// Starts a frame at the end of `out`: a length prefix to patch, then the root offset;
    /// `size_hint` bytes are reserved for it at once.
    fn start(out: &'a mut Vec<u8>, size_hint: usize) -> Writer<'a> {
        out.reserve(size_hint + 8);
        out.extend_from_slice(&[0; 8]);
        let base = out.len() - 4;
        Writer { out, base }
    }

    fn pos(&self) -> usize {
        self.out.len() - self.base
    }

    /// Zero padding until the position is `remainder` modulo `align`.
    fn pad(&mut self, align: usize, remainder: usize) {
        let padding = (align + remainder - self.pos() % align) % align;
        self.out.resize(self.out.len() + padding, 0);
    }

    fn patch(&mut self, pos: usize, bytes: &[u8]) {
        let at = self.base + pos;
        self.out[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Writes a vtable with the table offsets of its fields (0: absent) and a zeroed table
    /// of `table_len` bytes after it, placed so that offset 4 is 8-aligned; returns the
    /// table's position.
    fn table(&mut self, field_offsets: &[u16], table_len: u16) -> usize {
        // Laid out on the stack and appended in one copy: this runs twice per reply.
        let mut head = [0u8; 96];
        let start = self.pos();
        let vtable = start + start % 2;
        let vtable_end = vtable + 4 + 2 * field_offsets.len();
        let table = vtable_end + (12 - vtable_end % 8) % 8;
        let end = table + table_len as usize;
        let at = |pos: usize| pos - start;
        head[at(vtable)..at(vtable) + 2].copy_from_slice(&(4 + 2 * field_offsets.len() as u16).to_le_bytes());
        head[at(vtable) + 2..at(vtable) + 4].copy_from_slice(&table_len.to_le_bytes());
        for (index, offset) in field_offsets.iter().enumerate() {
            let slot = at(vtable) + 4 + 2 * index;
            head[slot..slot + 2].copy_from_slice(&offset.to_le_bytes());
        }
        head[at(table)..at(table) + 4].copy_from_slice(&((table - vtable) as i32).to_le_bytes());
        self.out.extend_from_slice(&head[..at(end)]);
        table
    }

    /// Appends a vector of bytes (a string when `nul`) and points `field` at it.
    fn vector(&mut self, field: usize, bytes: &[u8], nul: bool) {
        self.pad(4, 0);
        let pos = self.pos();
        self.point(field, pos);
        self.out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.out.extend_from_slice(bytes);
        if nul {
            self.out.push(0);
        }
    }

    /// Sets the unsigned offset at `field` to reach `target`.
    fn point(&mut self, field: usize, target: usize) {
        self.patch(field, &((target - field) as u32).to_le_bytes());
    }

    /// Points the root at `table` and fills in the frame's length.
    fn finish(self, root: usize) {
        let size = self.pos();
        assert!(size <= PEER_FRAME_SIZE_MAX, "encoded frame of {size} bytes");
        self.out[self.base - 4..self.base].copy_from_slice(&(size as u32).to_le_bytes());
        self.out[self.base..self.base + 4].copy_from_slice(&(root as u32).to_le_bytes());
    }
}

/// Appends `response` as one frame, if it has only the fields this writer lays out;
/// returns false (and appends nothing) otherwise.
pub(crate) fn encode_response(out: &mut Vec<u8>, response: &ResponseOut<'_>) -> bool {
    let plain = response.hello.is_none()
        && response.stats_json.is_none()
        && response.versions.is_empty()
        && response.topology.is_empty()
        && response.merkle.is_empty()
        && response.ring.is_none();
    if !plain {
        return false;
    }
    // Table offsets: id 4, message 12, siblings 16, context 20, omitted 24, status 28.
    let present = |yes: bool, offset: u16| if yes { offset } else { 0 };
    let has_message = !response.message.is_empty();
    let has_siblings = !response.siblings.is_empty();
    let has_context = !response.context.is_empty();
    let size_hint = 96
        + response.message.len()
        + response.context.len()
        + response.siblings.iter().map(|sibling| 64 + sibling.value.map_or(0, <[u8]>::len)).sum::<usize>();
    let mut w = Writer::start(out, size_hint);
    let table = w.table(
        &[
            4,
            28,
            present(has_message, 12),
            present(has_siblings, 16),
            present(has_context, 20),
            0,
            0,
            0,
            0,
            0,
            0,
            present(response.siblings_omitted != 0, 24),
        ],
        32,
    );
    w.patch(table + 4, &response.id.to_le_bytes());
    w.patch(table + 24, &response.siblings_omitted.to_le_bytes());
    w.patch(table + 28, &response.status.0.to_le_bytes());
    if has_message {
        w.vector(table + 12, response.message.as_bytes(), true);
    }
    if has_siblings {
        w.pad(4, 0);
        let vector = w.pos();
        w.point(table + 16, vector);
        w.out.extend_from_slice(&(response.siblings.len() as u32).to_le_bytes());
        w.out.resize(w.out.len() + 4 * response.siblings.len(), 0);
        for (index, sibling) in response.siblings.iter().enumerate() {
            // Table offsets: timestamp 4, TTL 12, value 20.
            let fields = [present(sibling.value.is_some(), 20), 4, 12];
            let sibling_table = w.table(&fields, 24);
            w.point(vector + 4 + 4 * index, sibling_table);
            w.patch(sibling_table + 4, &sibling.timestamp_us.to_le_bytes());
            w.patch(sibling_table + 12, &sibling.ttl_left_ms.to_le_bytes());
            if let Some(value) = sibling.value {
                w.vector(sibling_table + 20, value, false);
            }
        }
    }
    if has_context {
        w.vector(table + 20, response.context, false);
    }
    w.finish(table);
    true
}

/// Appends `request` as one frame if its operation is Get, Put, Delete, Replicate or
/// ReadReplica; returns false (and appends nothing) otherwise.
pub(crate) fn encode_request(out: &mut Vec<u8>, request: &RequestView<'_>) -> bool {
    let (op_type, key) = match request.op {
        Op::Get { key, .. } => (Operation::Get, key),
        Op::Put { key, .. } => (Operation::Put, key),
        Op::Delete { key } => (Operation::Delete, key),
        Op::Replicate { key, .. } => (Operation::Replicate, key),
        Op::ReadReplica { key } => (Operation::ReadReplica, key),
        _ => return false,
    };
    let present = |yes: bool, offset: u16| if yes { offset } else { 0 };
    let has_context = !request.context.is_empty();
    let value_len = match request.op {
        Op::Put { value, .. } | Op::Replicate { versions: value, .. } => value.len(),
        _ => 0,
    };
    let size_hint =
        128 + key.len() + value_len + request.context.len() + request.write_id.map_or(0, <[u8]>::len);
    let mut w = Writer::start(out, size_hint);
    // Table offsets: id 4, timeout 12, context 16, write id 20, op 24, consistency 28,
    // op type 29.
    let table =
        w.table(&[4, 12, 28, present(has_context, 16), present(request.write_id.is_some(), 20), 29, 24], 32);
    w.patch(table + 4, &request.id.to_le_bytes());
    w.patch(table + 12, &request.timeout_ms.to_le_bytes());
    w.patch(table + 28, &[request.consistency.0, op_type.0]);
    // Table offsets of the operation: a Put's TTL 4, then key and value; a Get's key 4,
    // sibling skip 8, metadata-only 12; a Delete's and a ReadReplica's key 4.
    let (body, key_field) = match request.op {
        Op::Get { metadata_only, sibling_skip, .. } => {
            let body = w.table(&[4, 12, 8], 16);
            w.patch(body + 8, &sibling_skip.to_le_bytes());
            w.patch(body + 12, &[u8::from(metadata_only)]);
            (body, body + 4)
        }
        Op::Put { value, ttl_ms, .. } => {
            let body = w.table(&[12, 16, 4], 20);
            w.patch(body + 4, &ttl_ms.to_le_bytes());
            w.vector(body + 16, value, false);
            (body, body + 12)
        }
        // A Replicate's key 4, versions 8.
        Op::Replicate { versions, .. } => {
            let body = w.table(&[4, 8], 12);
            w.vector(body + 8, versions, false);
            (body, body + 4)
        }
        _ => {
            let body = w.table(&[4], 8);
            (body, body + 4)
        }
    };
    w.point(table + 24, body);
    w.vector(key_field, key, false);
    if has_context {
        w.vector(table + 16, request.context, false);
    }
    if let Some(write_id) = request.write_id {
        w.vector(table + 20, write_id, false);
    }
    w.finish(table);
    true
}

#[cfg(test)]
mod tests {
    use flatbuffers::FlatBufferBuilder;

    use super::*;
    use crate::{
        encode_request_general, encode_response_general, parse_request_general, parse_response_general,
        SiblingOut,
    };

    /// xorshift64*: a fixed seed, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }

        /// A length that is often at or near a limit.
        fn len(&mut self, limit: usize) -> usize {
            match self.below(4) {
                0 => 0,
                1 => limit - 1 + self.below(3),
                _ => self.below(40),
            }
        }
    }

    struct RequestParts {
        key: Vec<u8>,
        value: Vec<u8>,
        context: Vec<u8>,
        write_id: Option<Vec<u8>>,
        kind: usize,
        id: u64,
        timeout_ms: u32,
        consistency: u8,
        ttl_ms: u64,
        metadata_only: bool,
        sibling_skip: u32,
    }

    impl RequestParts {
        fn random(rng: &mut Rng) -> RequestParts {
            let kind = rng.below(6);
            let value = if kind == 3 && rng.below(4) != 0 {
                // A replica's versions: valid, or (below) random bytes the checks refuse.
                let sibling = crate::peer::StoredSibling {
                    actor: rng.below(5) as u32 + 1,
                    counter: rng.below(100) as u64 + 1,
                    value: (rng.below(4) != 0).then(|| {
                        let n = rng.len(1000);
                        rng.bytes(n)
                    }),
                    timestamp_us: rng.next() >> 8,
                    expires_at_ms: 0,
                    blind: rng.below(2) == 0,
                };
                let clock = vec![(sibling.actor, sibling.counter)];
                crate::peer::encode_key_versions(&crate::peer::KeyVersionsData {
                    clock,
                    siblings: vec![sibling],
                    ..Default::default()
                })
            } else {
                let n = if rng.below(50) == 0 { VALUE_SIZE_MAX + rng.below(2) } else { rng.len(2000) };
                rng.bytes(n)
            };
            RequestParts {
                value,
                kind,
                key: {
                    let n = rng.len(KEY_SIZE_MAX);
                    rng.bytes(n)
                },
                context: {
                    let n = rng.below(3) * 12;
                    rng.bytes(n)
                },
                write_id: match rng.below(4) {
                    0 => Some(rng.bytes(WRITE_ID_SIZE)),
                    1 => Some({
                        let n = rng.below(20);
                        rng.bytes(n)
                    }),
                    _ => None,
                },
                id: rng.next() >> rng.below(64),
                timeout_ms: rng.next() as u32 >> rng.below(32),
                consistency: rng.below(4) as u8,
                ttl_ms: if rng.below(4) == 0 {
                    TTL_MS_MAX + rng.below(2) as u64
                } else {
                    rng.below(1000) as u64
                },
                metadata_only: rng.below(2) == 0,
                sibling_skip: rng.below(3) as u32,
            }
        }

        fn view(&self) -> RequestView<'_> {
            let op = match self.kind {
                0 => Op::Get {
                    key: &self.key,
                    metadata_only: self.metadata_only,
                    sibling_skip: self.sibling_skip,
                },
                1 => Op::Put { key: &self.key, value: &self.value, ttl_ms: self.ttl_ms },
                2 => Op::Delete { key: &self.key },
                3 => Op::Replicate { key: &self.key, versions: &self.value },
                4 => Op::ReadReplica { key: &self.key },
                _ => Op::Cas { key: &self.key, expected: None, new_value: &self.value, ttl_ms: 0 },
            };
            RequestView {
                id: self.id,
                timeout_ms: self.timeout_ms,
                consistency: Consistency(self.consistency),
                context: &self.context,
                write_id: self.write_id.as_deref(),
                op,
            }
        }
    }

    fn general_request_frame(request: &RequestView<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request_general(&mut FlatBufferBuilder::new(), &mut out, request);
        out
    }

    /// Every fast read of `payload` is what the verifier-backed read gives.
    fn check_request_reader(payload: &[u8]) -> bool {
        match parse_request(payload) {
            Some(fast) => {
                assert_eq!(parse_request_general(payload), Ok(fast), "payload {payload:?}");
                true
            }
            None => false,
        }
    }

    fn check_response_reader(payload: &[u8]) -> bool {
        match parse_response(payload) {
            Some(fast) => {
                assert_eq!(parse_response_general(payload), Ok(fast), "payload {payload:?}");
                true
            }
            None => false,
        }
    }

    /// Mutants of a valid payload: bytes flipped, cut short, grown.
    fn mutants(rng: &mut Rng, payload: &[u8], count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|_| {
                let mut mutant = payload.to_vec();
                match rng.below(4) {
                    0 => mutant.truncate(rng.below(payload.len() + 1)),
                    1 => mutant.extend({
                        let n = 1 + rng.below(8);
                        rng.bytes(n)
                    }),
                    _ => {
                        for _ in 0..1 + rng.below(3) {
                            let at = rng.below(mutant.len());
                            mutant[at] = if rng.below(2) == 0 {
                                rng.next() as u8
                            } else {
                                mutant[at] ^ 1 << rng.below(8)
                            };
                        }
                    }
                }
                mutant
            })
            .collect()
    }

    #[test]
    fn requests_written_by_hand_read_as_the_builders() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut fast_reads = 0;
        for _ in 0..3000 {
            let parts = RequestParts::random(&mut rng);
            let request = parts.view();
            let general = general_request_frame(&request);
            let mut by_hand = Vec::new();
            let handled = encode_request(&mut by_hand, &request);
            assert_eq!(handled, parts.kind < 5);
            if !handled {
                assert!(by_hand.is_empty());
                continue;
            }
            assert_eq!(
                parse_request_general(&by_hand[4..]),
                parse_request_general(&general[4..]),
                "{request:?}"
            );
            assert_eq!(u32::from_le_bytes(by_hand[..4].try_into().unwrap()) as usize, by_hand.len() - 4);
            for frame in [&general, &by_hand] {
                if check_request_reader(&frame[4..]) {
                    fast_reads += 1;
                }
            }
        }
        // Most random requests keep every limit: the fast reader must take them.
        assert!(fast_reads > 2000, "{fast_reads} fast reads");
    }

    #[test]
    fn responses_written_by_hand_read_as_the_builders() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let messages = ["", "key is empty", "überfüllt: no space", "x"];
        let mut fast_reads = 0;
        for _ in 0..3000 {
            let values: Vec<Vec<u8>> = (0..rng.below(4))
                .map(|_| {
                    let n = rng.len(1500);
                    rng.bytes(n)
                })
                .collect();
            let siblings: Vec<SiblingOut<'_>> = values
                .iter()
                .map(|value| SiblingOut {
                    value: (rng.below(4) != 0).then_some(&value[..]),
                    timestamp_us: rng.next(),
                    ttl_left_ms: rng.next() >> rng.below(64),
                })
                .collect();
            let context = {
                let n = rng.below(2) * 24;
                rng.bytes(n)
            };
            let response = ResponseOut {
                siblings: &siblings,
                context: &context,
                siblings_omitted: rng.below(3) as u32,
                ..ResponseOut::status(rng.next(), Status(rng.below(12) as u16), messages[rng.below(4)])
            };
            let mut general = Vec::new();
            encode_response_general(&mut FlatBufferBuilder::new(), &mut general, &response);
            let mut by_hand = Vec::new();
            assert!(encode_response(&mut by_hand, &response));
            assert_eq!(parse_response_general(&by_hand[4..]), parse_response_general(&general[4..]));
            assert_eq!(u32::from_le_bytes(by_hand[..4].try_into().unwrap()) as usize, by_hand.len() - 4);
            for frame in [&general, &by_hand] {
                assert!(check_response_reader(&frame[4..]), "{response:?}");
                fast_reads += 1;
            }
        }
        assert_eq!(fast_reads, 6000);
        let hello = ResponseOut { stats_json: Some("{}"), ..ResponseOut::status(1, Status::OK, "") };
        assert!(!encode_response(&mut Vec::new(), &hello));
    }

    #[test]
    fn the_readers_accept_nothing_the_verifier_refuses() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let (mut requests_read, mut responses_read) = (0, 0);
        for _ in 0..400 {
            let parts = RequestParts::random(&mut rng);
            let request = parts.view();
            let mut by_hand = Vec::new();
            encode_request(&mut by_hand, &request);
            for frame in [general_request_frame(&request), by_hand].iter().filter(|frame| !frame.is_empty()) {
                for mutant in mutants(&mut rng, &frame[4..], 100) {
                    requests_read += usize::from(check_request_reader(&mutant));
                    responses_read += usize::from(check_response_reader(&mutant));
                }
            }
            let value = {
                let n = rng.len(100);
                rng.bytes(n)
            };
            let siblings = [SiblingOut { value: Some(&value), timestamp_us: rng.next(), ttl_left_ms: 0 }];
            let response =
                ResponseOut { siblings: &siblings, ..ResponseOut::status(rng.next(), Status::OK, "ok") };
            let mut general = Vec::new();
            encode_response_general(&mut FlatBufferBuilder::new(), &mut general, &response);
            let mut by_hand = Vec::new();
            encode_response(&mut by_hand, &response);
            for frame in [general, by_hand] {
                for mutant in mutants(&mut rng, &frame[4..], 100) {
                    requests_read += usize::from(check_request_reader(&mutant));
                    responses_read += usize::from(check_response_reader(&mutant));
                }
            }
        }
        // Many mutants stay valid (a flipped value byte): the comparison has teeth.
        assert!(requests_read > 10_000 && responses_read > 10_000, "{requests_read} {responses_read}");
    }
}
