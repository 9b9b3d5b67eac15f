//! The data directory's identity: the `NODE` file (node id, shard count, shard function)
//! and the exclusive lock that keeps a second `kvd` out.
//!
//! These run on the main thread before any shard starts, so plain `std::fs` is right here.
#![deny(clippy::indexing_slicing)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context};
use schema::{ShardFunction, SHARD_HASH_SEED};

use crate::le;
use crate::storage::BLOCK_SIZE;

pub const NODE_FILE: &str = "NODE";
pub const LOCK_FILE: &str = "LOCK";
const NODE_MAGIC: [u8; 8] = *b"KVDNODE\n";
const NODE_FORMAT_VERSION: u32 = 1;
pub const NODE_ID_SIZE_MAX: usize = 64;

/// What a data directory says about the node that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeta {
    pub node_id: String,
    pub shard_count: usize,
}

/// Takes an exclusive `flock` on the data directory; the returned file holds it until the
/// process exits.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result != 0 {
        bail!("data directory {} is in use by another kvd (flock on {LOCK_FILE} failed)", dir.display());
    }
    Ok(file)
}

/// The NODE file's block for `meta` (public for the fuzz corpus).
pub fn encode(meta: &NodeMeta) -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK_SIZE);
    block.extend_from_slice(&NODE_MAGIC);
    block.extend_from_slice(&NODE_FORMAT_VERSION.to_le_bytes());
    block.extend_from_slice(&(meta.shard_count as u32).to_le_bytes());
    block.push(ShardFunction::XXH3_64_MULSHIFT.0);
    block.extend_from_slice(&[0; 3]);
    block.extend_from_slice(&SHARD_HASH_SEED.to_le_bytes());
    block.extend_from_slice(&(meta.node_id.len() as u16).to_le_bytes());
    block.extend_from_slice(meta.node_id.as_bytes());
    let crc = crc32c::crc32c(&block);
    block.extend_from_slice(&crc.to_le_bytes());
    block.resize(BLOCK_SIZE, 0);
    block
}

/// What a NODE file's block says (public for the fuzz target).
pub fn decode(block: &[u8]) -> Result<NodeMeta, String> {
    let field = |range: std::ops::Range<usize>| block.get(range).ok_or("file too short".to_string());
    if field(0..8)? != NODE_MAGIC {
        return Err("not a kvd NODE file (bad magic)".into());
    }
    let short = || "file too short".to_string();
    let u32_at = |offset: usize| le::u32_at(block, offset).ok_or_else(short);
    let version = u32_at(8)?;
    if version != NODE_FORMAT_VERSION {
        return Err(format!("NODE format version {version}, this kvd reads {NODE_FORMAT_VERSION}"));
    }
    let shard_count = u32_at(12)? as usize;
    let shard_function = *field(16..17)?.first().ok_or("short field")?;
    let seed = le::u64_at(block, 20).ok_or_else(short)?;
    let id_size = usize::from(le::u16_at(block, 28).ok_or_else(short)?);
    if id_size > NODE_ID_SIZE_MAX {
        return Err(format!("node id of {id_size} bytes"));
    }
    let id_end = 30 + id_size;
    let crc = u32_at(id_end)?;
    if crc != crc32c::crc32c(field(0..id_end)?) {
        return Err("checksum mismatch".into());
    }
    if shard_function != ShardFunction::XXH3_64_MULSHIFT.0 || seed != SHARD_HASH_SEED {
        return Err(format!("shard function {shard_function} with seed {seed} is not supported"));
    }
    let node_id = String::from_utf8(field(30..id_end)?.to_vec()).map_err(|_| "node id is not UTF-8")?;
    if shard_count == 0 {
        return Err("shard count 0".into());
    }
    Ok(NodeMeta { node_id, shard_count })
}

fn random_node_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("n{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// Reads the directory's NODE file, or creates it for a new node. A shard count that
/// differs from the recorded one is refused: every key's shard would change.
pub fn load_or_create(
    dir: &Path,
    shards_requested: Option<usize>,
    shards_default: usize,
) -> anyhow::Result<NodeMeta> {
    let path = dir.join(NODE_FILE);
    if path.exists() {
        let block = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let meta = decode(&block).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
        if let Some(requested) = shards_requested {
            if requested != meta.shard_count {
                bail!(
                    "{} was written by a node with {} shards; refusing to start with --shards {requested} \
                     (resharding is not supported: start with --shards {} or use a new data directory)",
                    dir.display(),
                    meta.shard_count,
                    meta.shard_count
                );
            }
        }
        return Ok(meta);
    }
    let meta =
        NodeMeta { node_id: random_node_id()?, shard_count: shards_requested.unwrap_or(shards_default) };
    let temporary = dir.join("NODE.tmp");
    let mut file = File::create(&temporary).with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(&encode(&meta))?;
    file.sync_all()?;
    fs::rename(&temporary, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_roundtrip_and_damage() {
        let meta = NodeMeta { node_id: "n0123".into(), shard_count: 3 };
        let block = encode(&meta);
        assert_eq!(block.len(), BLOCK_SIZE);
        assert_eq!(decode(&block), Ok(meta));
        let mut damaged = block.clone();
        damaged[13] ^= 1;
        assert!(decode(&damaged).is_err());
        assert!(decode(&[0; 10]).is_err());
    }
}
