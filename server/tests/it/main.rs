//! The server's one integration-test binary: simulated power loss through the storage
//! interface, and real `kvd` processes (kill -9, hostile input, shutdown).

mod anti_entropy;
mod bitflip;
mod cluster;
mod config;
mod disk_bound;
mod disk_full;
mod elasticity;
mod harness;
mod hostile;
mod kill9;
mod kill9_engine;
mod lost_writes;
mod metrics;
mod model;
mod no_space;
mod node;
mod orphans;
mod power_loss;
mod resp;
mod resp_linearizable;
mod resp_pipeline;
mod row_cache;
mod serial;
mod snapshot;
mod table;
mod tuning;
