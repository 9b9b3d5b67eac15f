//! What to send: keys, values, the operation mix and the key distribution.

use std::time::Duration;

use anyhow::{bail, Context};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::args::Args;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Get,
    Put,
    Cas,
}

pub const OP_KINDS: [OpKind; 3] = [OpKind::Get, OpKind::Put, OpKind::Cas];

impl OpKind {
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Put => "put",
            OpKind::Cas => "cas",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    pub key: Vec<u8>,
    pub value_size: usize,
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
enum KeyChooser {
    Uniform,
    Zipf(Zipf<f64>),
}

/// The workload of a run. Every value is a prefix of one random buffer, so a CAS can name
/// the value it expects without tracking what was written.
#[derive(Debug, Clone)]
pub struct Workload {
    key_size: usize,
    pub key_count: u64,
    chooser: KeyChooser,
    value_size_min: usize,
    value_size_max: usize,
    read_ratio: f64,
    cas_ratio: f64,
    ttl_ratio: f64,
    ttl: Duration,
    values: Vec<u8>,
}

impl Workload {
    pub fn from_args(args: &Args) -> anyhow::Result<Workload> {
        let (value_size_min, value_size_max) = match args.value_size.split_once('-') {
            Some((min, max)) => {
                (min.parse().context("--value-size MIN")?, max.parse().context("--value-size MAX")?)
            }
            None => {
                let size = args.value_size.parse().context("--value-size")?;
                (size, size)
            }
        };
        if value_size_min > value_size_max || value_size_max > client::VALUE_SIZE_MAX {
            bail!("--value-size must be N or MIN-MAX within 0..={}", client::VALUE_SIZE_MAX);
        }
        if args.keys == 0 {
            bail!("--keys must be at least 1");
        }
        let digits = args.keys.to_string().len();
        if args.key_size < digits || args.key_size > client::KEY_SIZE_MAX {
            bail!("--key-size must be {digits}..={} for {} keys", client::KEY_SIZE_MAX, args.keys);
        }
        let chooser = match args.distribution.as_str() {
            "uniform" => KeyChooser::Uniform,
            other => {
                let theta: f64 =
                    other.strip_prefix("zipf:").and_then(|theta| theta.parse().ok()).with_context(|| {
                        format!("--distribution: expected uniform or zipf:THETA, got {other}")
                    })?;
                KeyChooser::Zipf(Zipf::new(args.keys, theta).map_err(|e| anyhow::anyhow!("zipf: {e:?}"))?)
            }
        };
        for (name, ratio) in [("read", args.read_ratio), ("cas", args.cas_ratio), ("ttl", args.ttl_ratio)] {
            if !(0.0..=1.0).contains(&ratio) {
                bail!("--{name}-ratio must be within 0..=1");
            }
        }
        let mut values = vec![0u8; value_size_max];
        SmallRng::seed_from_u64(args.seed).fill_bytes(&mut values);
        Ok(Workload {
            key_size: args.key_size,
            key_count: args.keys,
            chooser,
            value_size_min,
            value_size_max,
            read_ratio: args.read_ratio,
            cas_ratio: args.cas_ratio,
            ttl_ratio: args.ttl_ratio,
            ttl: args.ttl,
            values,
        })
    }

    /// Key number `index`, zero-padded to the key size.
    pub fn key(&self, index: u64) -> Vec<u8> {
        format!("{index:0width$}", width = self.key_size).into_bytes()
    }

    pub fn value(&self, size: usize) -> &[u8] {
        &self.values[..size]
    }

    /// The value every preloaded key holds, and what a CAS expects and writes back.
    pub fn standard_value(&self) -> &[u8] {
        &self.values[..self.value_size_max]
    }

    fn key_index(&self, rng: &mut SmallRng) -> u64 {
        match &self.chooser {
            KeyChooser::Uniform => rng.gen_range(0..self.key_count),
            KeyChooser::Zipf(zipf) => {
                // Rank 1 is the hottest key; scatter ranks over the key space so that hot keys
                // do not all land on one shard.
                let rank = zipf.sample(rng) as u64 - 1;
                rank.wrapping_mul(0x9e37_79b9_7f4a_7c15) % self.key_count
            }
        }
    }

    pub fn next_op(&self, rng: &mut SmallRng) -> Op {
        let key = self.key(self.key_index(rng));
        let kind = if rng.gen_bool(self.read_ratio) {
            OpKind::Get
        } else if rng.gen_bool(self.cas_ratio) {
            OpKind::Cas
        } else {
            OpKind::Put
        };
        let value_size = match kind {
            OpKind::Cas => self.value_size_max,
            _ => rng.gen_range(self.value_size_min..=self.value_size_max),
        };
        let ttl = (kind == OpKind::Put && rng.gen_bool(self.ttl_ratio)).then_some(self.ttl);
        Op { kind, key, value_size, ttl }
    }
}
