//! `kvd --config FILE`: one TOML file holding any of the command-line flags, by their long
//! names with `_` or `-` (`memory_per_shard = 512`, `seeds = ["10.0.0.1:7400"]`,
//! `no_pin = true`). Flags given on the command line override the file.
//!
//! The file becomes command-line arguments placed before the real ones, and clap parses the
//! whole (later occurrences win), so a key means exactly what its flag means and is checked by
//! the same parser. Unknown keys, tables and wrong types are errors naming the key.

use std::path::Path;

use anyhow::{bail, Context};
use clap::CommandFactory;

use crate::args::Args;

/// Flags that make no sense in a file.
const NOT_IN_FILE: [&str; 3] = ["config", "help", "version"];

/// The long names of every flag a file may set.
fn flag_names() -> Vec<String> {
    Args::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long().map(str::to_string))
        .filter(|name| !NOT_IN_FILE.contains(&name.as_str()))
        .collect()
}

/// One key's command-line form.
fn to_args(key: &str, value: &toml::Value, file: &Path) -> anyhow::Result<Vec<String>> {
    let flag = format!("--{}", key.replace('_', "-"));
    let scalar = |value: &toml::Value| -> anyhow::Result<String> {
        Ok(match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            other => bail!(
                "{}: key `{key}`: expected a string or a number, got {}",
                file.display(),
                other.type_str()
            ),
        })
    };
    Ok(match value {
        toml::Value::Boolean(true) => vec![flag],
        toml::Value::Boolean(false) => Vec::new(),
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(scalar).collect::<anyhow::Result<_>>()?;
            if items.is_empty() {
                Vec::new()
            } else {
                vec![flag, items.join(",")]
            }
        }
        toml::Value::Table(_) => bail!("{}: key `{key}`: tables are not settings", file.display()),
        other => vec![flag, scalar(other)?],
    })
}

/// Reads `file` into command-line arguments, checking every key on its own so that an error
/// names it.
pub fn file_args(file: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let table: toml::Table = text.parse().map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
    let known = flag_names();
    let mut args = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        if !known.contains(&name) {
            bail!("{}: unknown key `{key}` (keys are the long flags of `kvd --help`)", file.display());
        }
        let one = to_args(key, value, file)?;
        let mut alone = vec!["kvd".to_string()];
        alone.extend(one.iter().cloned());
        if let Err(error) = <Args as clap::Parser>::try_parse_from(&alone) {
            let reason = error.to_string();
            let reason = reason.lines().next().unwrap_or("").trim_start_matches("error: ");
            bail!("{}: key `{key}`: {reason}", file.display());
        }
        args.extend(one);
    }
    Ok(args)
}

/// The process's arguments with `--config FILE`'s settings placed before them.
pub fn command_line(raw: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut config = None;
    let mut rest = Vec::with_capacity(raw.len());
    let mut iter = raw.into_iter();
    if let Some(program) = iter.next() {
        rest.push(program);
    }
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            config = Some(iter.next().context("--config needs a file")?);
        } else if let Some(file) = arg.strip_prefix("--config=") {
            config = Some(file.to_string());
        } else {
            rest.push(arg);
        }
    }
    let Some(config) = config else { return Ok(rest) };
    let mut merged = vec![rest[0].clone()];
    merged.extend(file_args(Path::new(&config))?);
    merged.extend(rest.into_iter().skip(1));
    Ok(merged)
}

/// The effective settings as TOML (`kvd config print`).
pub fn print(args: &Args) -> String {
    let mut table = toml::Table::new();
    let set = |table: &mut toml::Table, key: &str, value: toml::Value| {
        table.insert(key.to_string(), value);
    };
    let text = |value: &dyn std::fmt::Display| toml::Value::String(value.to_string());
    let int = |value: u64| toml::Value::Integer(value.min(i64::MAX as u64) as i64);
    set(&mut table, "listen", text(&args.listen));
    if let Some(base) = args.shard_port_base {
        set(&mut table, "shard_port_base", int(u64::from(base)));
    }
    if let Some(dir) = &args.data_dir {
        set(&mut table, "data_dir", text(&dir.display()));
    }
    if let Some(shards) = args.shards {
        set(&mut table, "shards", int(shards as u64));
    }
    set(&mut table, "no_pin", toml::Value::Boolean(args.no_pin));
    set(&mut table, "spin", toml::Value::Boolean(args.spin));
    set(&mut table, "fsync", text(&args.fsync));
    set(&mut table, "inflight_max", int(args.inflight_max as u64));
    set(&mut table, "connections_max", int(args.connections_max as u64));
    set(&mut table, "idle_timeout_ms", int(args.idle_timeout_ms));
    set(&mut table, "read_buffers_max_mib", int(args.read_buffers_max_mib as u64));
    set(&mut table, "frame_timeout_ms", int(args.frame_timeout_ms));
    set(&mut table, "write_timeout_ms", int(args.write_timeout_ms));
    set(&mut table, "request_timeout_ms", int(args.request_timeout_ms));
    set(&mut table, "memory_per_shard", int(args.memory_per_shard));
    set(&mut table, "tombstone_grace_s", int(args.tombstone_grace_s));
    set(
        &mut table,
        "seeds",
        toml::Value::Array(args.seeds.iter().map(|seed| toml::Value::String(seed.to_string())).collect()),
    );
    if let Some(size) = args.cluster_size {
        set(&mut table, "cluster_size", int(size as u64));
    }
    set(&mut table, "replicas", int(args.replicas as u64));
    set(&mut table, "partition_bits", int(u64::from(args.partition_bits)));
    set(&mut table, "gossip_interval_ms", int(args.gossip_interval_ms));
    set(&mut table, "anti_entropy_interval_ms", int(args.anti_entropy_interval_ms));
    set(&mut table, "join", toml::Value::Boolean(args.join));
    set(&mut table, "stream_kib_per_s", int(args.stream_kib_per_s));
    if let Some(dead) = &args.replace {
        set(&mut table, "replace", text(dead));
    }
    set(&mut table, "phi_threshold", toml::Value::Float(args.phi_threshold));
    if let Some(address) = args.metrics_listen {
        set(&mut table, "metrics_listen", text(&address));
    }
    if let Some(address) = args.resp_listen {
        set(&mut table, "resp_listen", text(&address));
    }
    if args.requirepass.is_some() {
        set(&mut table, "requirepass", toml::Value::String("(set)".into()));
    }
    set(&mut table, "log_format", text(&args.log_format));
    set(&mut table, "log_level", text(&args.log_level));
    set(&mut table, "resp_consistency", text(&args.resp_consistency.name()));
    toml::to_string(&table).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn file(text: &str) -> tempfile_path::Path {
        tempfile_path::write(text)
    }

    /// A file under the target directory, removed on drop.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> Path {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "kvd-config-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).expect("write config");
            Path(path)
        }
    }

    fn parse(file: &tempfile_path::Path, flags: &[&str]) -> anyhow::Result<Args> {
        let mut raw = vec!["kvd".to_string(), "--config".to_string(), file.0.display().to_string()];
        raw.extend(flags.iter().map(|f| f.to_string()));
        Ok(Args::try_parse_from(command_line(raw)?)?)
    }

    #[test]
    fn a_file_sets_flags_and_the_command_line_wins() {
        let config = file(
            "data_dir = \"/var/lib/kv\"\nmemory-per-shard = 512\nno_pin = true\nseeds = [\"10.0.0.1:7400\", \"10.0.0.2:7400\"]\nfsync = \"interval:10\"\n",
        );
        let args = parse(&config, &[]).expect("valid");
        assert_eq!(args.memory_per_shard, 512);
        assert!(args.no_pin);
        assert_eq!(args.seeds.len(), 2);
        assert_eq!(args.fsync.to_string(), "interval:10");
        let args = parse(&config, &["--memory-per-shard", "64"]).expect("valid");
        assert_eq!(args.memory_per_shard, 64, "the command line overrides the file");
        assert!(print(&args).contains("memory_per_shard = 64"));
    }

    #[test]
    fn bad_files_name_the_key_and_why() {
        let error = |text: &str| parse(&file(text), &[]).expect_err("invalid").to_string();
        assert!(
            error("memory_per_shard = \"lots\"\n").contains("key `memory_per_shard`: invalid value 'lots'")
        );
        assert!(error("mmeory_per_shard = 5\n").contains("unknown key `mmeory_per_shard`"));
        assert!(error("memory_per_shard = 2\n").contains("key `memory_per_shard`"), "below the minimum of 4");
        assert!(error("[cluster]\nreplicas = 3\n").contains("unknown key `cluster`"));
        assert!(error("listen = { port = 1 }\n").contains("key `listen`: tables are not settings"));
        assert!(error("listen = \n").contains("expected"), "a TOML syntax error");
        assert!(error("seeds = [{ a = 1 }]\n").contains("key `seeds`"));
    }
}
