//! Sorted tables through the storage interface: lookups, and seeded bit flips that must be
//! detected or harmless, never served.

use std::path::Path;

use glommio::{LocalExecutorBuilder, Placement};
use server::rng::Rng;
use server::storage::sim::SimStorage;

/// Sorted tables: every key reads back through the reader, and single-bit flips at 2,000
/// seeded positions are each either harmless (padding) or detected: a flip never makes a
/// lookup return a wrong entry or lose a present one silently.
#[test]
fn table_bit_flips_are_detected_and_never_served() {
    use server::storage::{Storage, StorageFile};
    use server::table::format::{Entry, EntryKind, TableBuilder};
    use server::table::reader::TableReader;

    let (detected, harmless) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let mut entries: Vec<Entry> = (0..300u32)
                .map(|i| {
                    let key = format!("table-key-{i}").into_bytes();
                    Entry {
                        token: schema::key_hash(&key),
                        seq: u64::from(i) + 1,
                        timestamp_us: u64::from(i),
                        expires_at_ms: 0,
                        kind: EntryKind::Put,
                        value: vec![i as u8; 200 + (i as usize % 9) * 300],
                        key,
                    }
                })
                .collect();
            entries.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
            let mut builder = TableBuilder::new();
            for entry in &entries {
                builder.add(entry);
            }
            let bytes = builder.finish();
            let storage = SimStorage::new(21);
            let path = Path::new("/tables/table-1.sst");
            let file = storage.create(path).await.expect("create");
            file.write_at(0, &bytes).await.expect("write");
            let reader = TableReader::open(&file, path).await.expect("open");
            for entry in &entries {
                assert_eq!(reader.get(&file, &entry.key).await.expect("get").as_ref(), Some(entry));
            }
            assert_eq!(reader.get(&file, b"absent").await.expect("get"), None);

            let mut rng = Rng::new(99);
            let (mut detected, mut harmless) = (0, 0);
            for _ in 0..2_000 {
                let position = rng.below(bytes.len() as u64) as usize;
                let bit = 1u8 << rng.below(8);
                let mut damaged = bytes.clone();
                damaged[position] ^= bit;
                storage.corrupt(path, 0, &damaged);
                let outcome = match TableReader::open(&file, path).await {
                    Err(_) => Err(()),
                    Ok(reader) => {
                        let mut result = Ok(());
                        for entry in &entries {
                            match reader.get(&file, &entry.key).await {
                                Ok(found) => assert_eq!(
                                    found.as_ref(),
                                    Some(entry),
                                    "flip of bit {bit:#x} at {position} served a wrong answer"
                                ),
                                Err(_) => result = Err(()),
                            }
                        }
                        result
                    }
                };
                match outcome {
                    Err(()) => detected += 1,
                    Ok(()) => harmless += 1,
                }
            }
            storage.corrupt(path, 0, &bytes);
            (detected, harmless)
        })
        .expect("executor")
        .join()
        .expect("join");
    assert_eq!(detected + harmless, 2_000);
    assert!(detected > 1_000, "only {detected} of 2,000 flips were in checked bytes");
    eprintln!("table bit flips: {detected} detected, {harmless} in padding (harmless), 0 served");
}
