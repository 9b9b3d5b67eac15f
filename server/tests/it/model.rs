//! The storage engine against a model: seeded random sequences of put, delete, get, TTL,
//! CAS, flush, compaction, restart and power loss, through the storage interface with
//! injected write and sync failures, checked after every step against a `BTreeMap`. A tiny
//! memory budget makes flushes and compactions frequent. A failing sequence replays from
//! its seed: `MODEL_SEED=n cargo test -p server --test it model`.

use std::collections::BTreeMap;
use std::path::Path;

use glommio::{LocalExecutorBuilder, Placement};
use server::clock::now_ms;
use server::command::Reply;
use server::engine::EngineOptions;
use server::rng::Rng;
use server::storage::sim::{Faults, SimStorage};
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

const KEY_COUNT: u64 = 24;

/// What a key may read as.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Absent,
    Value(Vec<u8>),
    /// Written with a short TTL: present until `present_until_ms` at least, absent from
    /// `absent_from_ms` on, either in between.
    Expiring {
        value: Vec<u8>,
        present_until_ms: u64,
        absent_from_ms: u64,
    },
}

impl Expect {
    /// Values shown by size and first byte (the step that wrote them), not in full.
    fn describe(&self) -> String {
        match self {
            Expect::Absent => "absent".into(),
            Expect::Value(value) => format!("{} bytes from step {:?}", value.len(), value.first()),
            Expect::Expiring { value, present_until_ms, absent_from_ms } => format!(
                "{} bytes from step {:?} expiring between {present_until_ms} and {absent_from_ms}",
                value.len(),
                value.first()
            ),
        }
    }

    fn allows(&self, found: Option<&[u8]>, now_ms: u64) -> bool {
        match self {
            Expect::Absent => found.is_none(),
            Expect::Value(value) => found == Some(value),
            Expect::Expiring { value, present_until_ms, absent_from_ms } => match found {
                None => now_ms >= *present_until_ms,
                Some(found) => found == value && now_ms < *absent_from_ms,
            },
        }
    }
}

/// A key's acknowledged state, and the state of a write that failed (it may have landed).
#[derive(Debug, Clone)]
struct KeyModel {
    acked: Expect,
    uncertain: Option<Expect>,
}

struct Sequence {
    seed: u64,
    rng: Rng,
    storage: SimStorage,
    model: BTreeMap<Vec<u8>, KeyModel>,
    /// A write failed: the store refuses writes until restarted.
    broken: bool,
    step: usize,
}

const DIR: &str = "/data/shard-0";

fn options() -> EngineOptions {
    // 64 KiB memtables; tombstones dropped by the first compaction that may.
    EngineOptions { memory_bytes: 512 << 10, tombstone_grace_ms: 0 }
}

async fn open(storage: &SimStorage, seed: u64, step: usize) -> Store<SimStorage> {
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    let (store, _) = Store::open(storage.clone(), Path::new(DIR), identity, SyncPolicy::Always, options())
        .await
        .unwrap_or_else(|error| panic!("seed {seed} step {step}: recovery failed: {error}"));
    store
}

fn found_value(reply: &Reply<std::rc::Rc<[u8]>>) -> Option<Option<Vec<u8>>> {
    match reply {
        Reply::Found(version) => Some(Some(version.value.as_deref().map(<[u8]>::to_vec).unwrap_or_default())),
        Reply::NotFound => Some(None),
        _ => None,
    }
}

impl Sequence {
    fn key(&mut self) -> Vec<u8> {
        format!("key-{}", self.rng.below(KEY_COUNT)).into_bytes()
    }

    fn value(&mut self) -> Vec<u8> {
        let size = match self.rng.below(100) {
            0..=89 => self.rng.below(2_000),
            90..=97 => self.rng.below(20_000),
            _ => 100_000 + self.rng.below(200_000),
        } as usize;
        let byte = self.rng.below(256) as u8;
        let mut value = vec![byte; size];
        if let Some(first) = value.first_mut() {
            *first = self.step as u8;
        }
        value
    }

    fn model(&mut self, key: &[u8]) -> &mut KeyModel {
        self.model.entry(key.to_vec()).or_insert(KeyModel { acked: Expect::Absent, uncertain: None })
    }

    /// Checks a read against the model and, when the read settles an uncertain write,
    /// takes what it saw as the truth.
    fn check(&mut self, key: &[u8], found: Option<Vec<u8>>, now_ms: u64) {
        let (seed, step) = (self.seed, self.step);
        let model = self.model(key);
        let by_acked = model.acked.allows(found.as_deref(), now_ms);
        let by_uncertain = model.uncertain.as_ref().is_some_and(|u| u.allows(found.as_deref(), now_ms));
        assert!(
            by_acked || by_uncertain,
            "seed {seed} step {step}: {} reads {:?} at {now_ms}, acknowledged {}, uncertain {:?}",
            String::from_utf8_lossy(key),
            found.as_ref().map(|v| (v.len(), v.first())),
            model.acked.describe(),
            model.uncertain.as_ref().map(Expect::describe)
        );
        if let Some(uncertain) = model.uncertain.take() {
            model.acked = if by_acked { model.acked.clone() } else { uncertain };
        }
    }

    fn settle_write(&mut self, key: &[u8], reply: &Reply<std::rc::Rc<[u8]>>, new: Expect) {
        match reply {
            Reply::Done => self.model(key).acked = new,
            Reply::Error { .. } => {
                self.model(key).uncertain = Some(new);
                self.broken = true;
            }
            other => panic!("seed {} step {}: write answered {other:?}", self.seed, self.step),
        }
    }

    async fn verify_all(&mut self, store: &Store<SimStorage>) {
        let keys: Vec<Vec<u8>> = self.model.keys().cloned().collect();
        for key in keys {
            let reply = store.get(&key, false).await;
            let now = now_ms();
            let found = found_value(&reply)
                .unwrap_or_else(|| panic!("seed {} step {}: read failed: {reply:?}", self.seed, self.step));
            self.check(&key, found, now);
        }
    }

    async fn run(mut self, step_count: usize) -> u64 {
        let mut store = open(&self.storage, self.seed, 0).await;
        let mut checks = 0;
        while self.step < step_count {
            self.step += 1;
            let roll = self.rng.below(100);
            if std::env::var_os("MODEL_TRACE").is_some() {
                eprintln!("seed {} step {} roll {roll} broken {}", self.seed, self.step, self.broken);
            }
            if self.broken || roll >= 97 {
                // Power loss: whatever was not synced may vanish, a write in flight tears.
                self.storage.crash();
                drop(store);
                store = open(&self.storage, self.seed, self.step).await;
                self.broken = false;
                self.verify_all(&store).await;
                checks += self.model.len() as u64;
                continue;
            }
            if roll == 96 {
                let _ = store.close().await;
                // A clean restart, on a disk that works again.
                self.storage.set_faults(Faults::default());
                drop(store);
                store = open(&self.storage, self.seed, self.step).await;
                self.verify_all(&store).await;
                checks += self.model.len() as u64;
                continue;
            }
            if roll == 95 {
                let faults = if self.rng.below(2) == 0 {
                    Faults::default()
                } else {
                    Faults { write_error_per_million: 20_000, sync_error_per_million: 20_000 }
                };
                self.storage.set_faults(faults);
                continue;
            }
            let key = self.key();
            match roll {
                0..=34 => {
                    let value = self.value();
                    let ttl_ms = match self.rng.below(10) {
                        0 => 3_600_000,
                        1 => 1 + self.rng.below(3),
                        _ => 0,
                    };
                    let before = now_ms();
                    let reply = store.put(&key, &value, ttl_ms).await;
                    let after = now_ms();
                    let new = match ttl_ms {
                        0 | 3_600_000 => Expect::Value(value),
                        ttl => Expect::Expiring {
                            value,
                            present_until_ms: before + ttl - 1,
                            absent_from_ms: after + ttl + 1,
                        },
                    };
                    self.settle_write(&key, &reply, new);
                }
                35..=49 => {
                    let reply = store.delete(&key).await;
                    let reply = if reply == Reply::NotFound { Reply::Done } else { reply };
                    self.settle_write(&key, &reply, Expect::Absent);
                }
                50..=54 => {
                    // CAS expecting what the model holds: must succeed when the model is sure.
                    let model = self.model(&key).clone();
                    let expected = match (&model.acked, &model.uncertain) {
                        (Expect::Value(value), None) => Some(value.clone()),
                        (Expect::Absent, None) => None,
                        _ => continue,
                    };
                    let value = self.value();
                    let reply = store.cas(&key, expected.as_deref(), &value, 0).await;
                    self.settle_write(&key, &reply, Expect::Value(value));
                }
                55..=84 => {
                    let metadata_only = self.rng.below(4) == 0;
                    let reply = store.get(&key, metadata_only).await;
                    let now = now_ms();
                    match found_value(&reply) {
                        Some(found) if metadata_only => {
                            // Presence only: the model's value decides whether it may be there.
                            let model = self.model(&key).clone();
                            let present = found.is_some();
                            let ok = |e: &Expect| match e {
                                Expect::Absent => !present,
                                Expect::Value(_) => present,
                                Expect::Expiring { present_until_ms, absent_from_ms, .. } => {
                                    (present && now < *absent_from_ms)
                                        || (!present && now >= *present_until_ms)
                                }
                            };
                            assert!(
                                ok(&model.acked) || model.uncertain.as_ref().is_some_and(ok),
                                "seed {} step {}: metadata read {present}, model {model:?}",
                                self.seed,
                                self.step
                            );
                        }
                        Some(found) => self.check(&key, found, now),
                        None => self.broken = true,
                    }
                    checks += 1;
                }
                85..=89 => {
                    if store.engine().flush().await.is_err() {
                        self.broken = true;
                    }
                }
                _ => {
                    if store.engine().compact_all().await.is_err() {
                        self.broken = true;
                    }
                }
            }
        }
        self.storage.set_faults(Faults::default());
        if !self.broken {
            self.verify_all(&store).await;
        }
        let _ = store.close().await;
        checks
    }
}

fn seeds() -> std::ops::Range<u64> {
    match std::env::var("MODEL_SEED").ok().and_then(|seed| seed.parse().ok()) {
        Some(seed) => seed..seed + 1,
        None => 0..std::env::var("MODEL_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000),
    }
}

/// 1,000 seeded sequences of 150 steps (`MODEL_SEEDS` changes the count).
#[test]
fn engine_matches_a_model_through_faults_flushes_compactions_and_crashes() {
    let (sequences, checks) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let mut checks = 0;
            let mut sequences = 0;
            for seed in seeds() {
                let sequence = Sequence {
                    seed,
                    rng: Rng::new(seed),
                    storage: SimStorage::new(seed),
                    model: BTreeMap::new(),
                    broken: false,
                    step: 0,
                };
                checks += sequence.run(150).await;
                sequences += 1;
            }
            (sequences, checks)
        })
        .expect("executor")
        .join()
        .expect("join");
    println!("model: {sequences} sequences, {checks} reads checked against the model");
    assert!(checks > sequences * 20);
}
