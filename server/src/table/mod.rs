//! Sorted tables, the on-disk runs of the storage engine (issue 4): format, bloom filter and
//! reader. Not yet wired to the store: the memtable flush, manifest and compaction that
//! produce and retire tables come with the engine.

pub mod bloom;
pub mod format;
pub mod reader;
pub mod sketch;
