//! RESP commands with Redis's semantics and reply types. Session commands (HELLO, AUTH,
//! CLIENT, SELECT, ...) run at once, in order; data commands become futures that the
//! connection runs concurrently and answers in order.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use super::reply::Value;
use super::store_ops::{self, Access};
use crate::clock::now_ms;
use crate::shard::Shard;
use crate::storage::Storage;
use crate::update::{Answer, Condition, ExpireWhen, Update};

/// Per-listener settings, from flags.
#[derive(Debug)]
pub struct RespSettings {
    /// `--requirepass`: clients must AUTH first.
    pub password: Option<String>,
    pub access: Access,
    pub started: Instant,
    pub port: u16,
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub protocol: u8,
    pub authenticated: bool,
    pub name: Option<Vec<u8>>,
    pub lib_name: Option<Vec<u8>>,
    pub lib_version: Option<Vec<u8>>,
    /// How this connection's commands reach a cluster's replicas (`CLIENT CONSISTENCY`).
    pub access: Access,
}

impl Session {
    pub fn new(id: u64, settings: &RespSettings) -> Session {
        Session {
            id,
            protocol: 2,
            authenticated: settings.password.is_none(),
            name: None,
            lib_name: None,
            lib_version: None,
            access: settings.access,
        }
    }
}

pub type Pending = Pin<Box<dyn Future<Output = Value>>>;

/// What to do with one command.
pub enum Step {
    Reply(Value),
    Later(Pending),
    /// Reply, then close the connection (QUIT).
    Close(Value),
}

fn upper(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_ascii_uppercase()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn arity_error(name: &str) -> Value {
    Value::error(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

const SYNTAX: &str = "ERR syntax error";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";

fn integer(bytes: &[u8]) -> Result<i64, Value> {
    std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok()).ok_or_else(|| Value::error(NOT_INTEGER))
}

/// Redis's arity: positive is exact, negative is a minimum.
const COMMANDS: &[(&str, i32)] = &[
    ("PING", -1),
    ("ECHO", 2),
    ("HELLO", -1),
    ("AUTH", -2),
    ("GET", 2),
    ("SET", -3),
    ("DIGEST", 2),
    ("DELEX", -2),
    ("DEL", -2),
    ("EXISTS", -2),
    ("EXPIRE", -3),
    ("PEXPIRE", -3),
    ("EXPIREAT", -3),
    ("PEXPIREAT", -3),
    ("TTL", 2),
    ("PTTL", 2),
    ("PERSIST", 2),
    ("MGET", -2),
    ("MSET", -3),
    ("GETDEL", 2),
    ("SETNX", 3),
    ("SETEX", 4),
    ("PSETEX", 4),
    ("INCR", 2),
    ("DECR", 2),
    ("INCRBY", 3),
    ("DECRBY", 3),
    ("DBSIZE", 1),
    ("INFO", -1),
    ("CLIENT", -2),
    ("COMMAND", -1),
    ("CONFIG", -2),
    ("SELECT", 2),
    ("QUIT", -1),
    ("RESET", 1),
];

/// The positions of the keys among a command's arguments (`args[0]` is its name), as Redis's
/// key specifications give them. A command not listed counts every argument as a key, which
/// orders too much but never too little.
pub fn key_positions(args: &[Vec<u8>]) -> impl Iterator<Item = usize> {
    let name = args.first().map(|name| upper(name)).unwrap_or_default();
    let (first, step) = match name.as_str() {
        "GET" | "SET" | "DIGEST" | "DELEX" | "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" | "TTL"
        | "PTTL" | "PERSIST" | "GETDEL" | "SETNX" | "SETEX" | "PSETEX" | "INCR" | "DECR" | "INCRBY"
        | "DECRBY" => (1, usize::MAX),
        "MSET" => (1, 2),
        _ => (1, 1),
    };
    (first..args.len()).step_by(step)
}

/// Runs or schedules one command.
pub fn dispatch<S: Storage>(
    shard: &Rc<Shard<S>>,
    settings: &Rc<RespSettings>,
    session: &mut Session,
    args: Vec<Vec<u8>>,
) -> Step {
    let Some(first) = args.first() else { return Step::Reply(Value::Null) };
    let name = upper(first);
    let Some(&(_, arity)) = COMMANDS.iter().find(|(known, _)| *known == name) else {
        let preview: String = args[1..].iter().take(20).map(|a| format!("'{}' ", text(a))).collect();
        return Step::Reply(Value::error(format!(
            "ERR unknown command '{}', with args beginning with: {preview}",
            text(first)
        )));
    };
    let count = args.len() as i32;
    if (arity > 0 && count != arity) || (arity < 0 && count < -arity) {
        return Step::Reply(arity_error(&name));
    }
    if !session.authenticated && !matches!(name.as_str(), "AUTH" | "HELLO" | "QUIT" | "RESET") {
        return Step::Reply(Value::error("NOAUTH Authentication required."));
    }
    match name.as_str() {
        "PING" => Step::Reply(match args.len() {
            1 => Value::Simple("PONG".into()),
            2 => Value::Bulk(args[1].clone()),
            _ => arity_error("ping"),
        }),
        "ECHO" => Step::Reply(Value::Bulk(args[1].clone())),
        "HELLO" => Step::Reply(hello(settings, session, &args)),
        "AUTH" => Step::Reply(auth(settings, session, &args)),
        "SELECT" => Step::Reply(match integer(&args[1]) {
            Ok(0) => Value::ok(),
            Ok(_) => Value::error("ERR DB index is out of range"),
            Err(error) => error,
        }),
        "QUIT" => Step::Close(Value::ok()),
        "RESET" => {
            *session = Session::new(session.id, settings);
            Step::Reply(Value::Simple("RESET".into()))
        }
        "CLIENT" => Step::Reply(client(session, &args)),
        "COMMAND" => Step::Reply(command(&args)),
        "CONFIG" => Step::Reply(config(&args)),
        "INFO" => Step::Reply(info(shard, settings, session, &args)),
        "DBSIZE" => {
            let shard = shard.clone();
            Step::Later(Box::pin(async move { Value::Integer(shard.entry_count_total().await as i64) }))
        }
        _ => Step::Later(data(shard.clone(), session.access, name, args)),
    }
}

fn hello(settings: &RespSettings, session: &mut Session, args: &[Vec<u8>]) -> Value {
    let mut protocol = session.protocol;
    let mut at = 1;
    if let Some(version) = args.get(1) {
        match integer(version) {
            Ok(version @ 2..=3) => protocol = version as u8,
            Ok(_) => return Value::error("NOPROTO unsupported protocol version"),
            Err(_) => return Value::error("ERR Protocol version is not an integer or out of range"),
        }
        at = 2;
    }
    while at < args.len() {
        match upper(&args[at]).as_str() {
            "AUTH" if at + 2 < args.len() => {
                let reply =
                    auth(settings, session, &[b"AUTH".to_vec(), args[at + 1].clone(), args[at + 2].clone()]);
                if matches!(reply, Value::Error(_)) {
                    return reply;
                }
                at += 3;
            }
            "SETNAME" if at + 1 < args.len() => {
                session.name = Some(args[at + 1].clone());
                at += 2;
            }
            _ => return Value::error(format!("ERR Syntax error in HELLO option '{}'", text(&args[at]))),
        }
    }
    if !session.authenticated {
        return Value::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    session.protocol = protocol;
    Value::Map(vec![
        (Value::text("server"), Value::text("redis")),
        (Value::text("version"), Value::text(REDIS_VERSION)),
        (Value::text("proto"), Value::Integer(i64::from(protocol))),
        (Value::text("id"), Value::Integer(session.id as i64)),
        (Value::text("mode"), Value::text("standalone")),
        (Value::text("role"), Value::text("master")),
        (Value::text("modules"), Value::Array(Vec::new())),
    ])
}

/// The Redis version this front door answers as (its commands' semantics).
pub const REDIS_VERSION: &str = "7.0.0";

fn auth(settings: &RespSettings, session: &mut Session, args: &[Vec<u8>]) -> Value {
    let (user, password) = match args.len() {
        2 => (b"default".as_slice(), &args[1]),
        3 => (args[1].as_slice(), &args[2]),
        _ => return Value::error(SYNTAX),
    };
    let Some(expected) = &settings.password else {
        return Value::error(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        );
    };
    if user == b"default" && password.as_slice() == expected.as_bytes() {
        session.authenticated = true;
        Value::ok()
    } else {
        Value::error("WRONGPASS invalid username-password pair or user is disabled.")
    }
}

fn client(session: &mut Session, args: &[Vec<u8>]) -> Value {
    match (upper(&args[1]).as_str(), args.len()) {
        ("ID", 2) => Value::Integer(session.id as i64),
        ("GETNAME", 2) => session.name.clone().map_or(Value::Null, Value::Bulk),
        ("SETNAME", 3) => {
            if args[2].iter().any(|&b| b <= b' ' || b > b'~') {
                return Value::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            session.name = (!args[2].is_empty()).then(|| args[2].clone());
            Value::ok()
        }
        ("SETINFO", 4) => match upper(&args[2]).as_str() {
            "LIB-NAME" => {
                session.lib_name = Some(args[3].clone());
                Value::ok()
            }
            "LIB-VER" => {
                session.lib_version = Some(args[3].clone());
                Value::ok()
            }
            other => Value::error(format!("ERR Unrecognized option '{other}'")),
        },
        // kv's own: this connection's consistency in a cluster (`--resp-consistency` sets the
        // default); with no argument, the current one.
        ("CONSISTENCY", 2) => Value::text(session.access.consistency.name()),
        ("CONSISTENCY", 3) => match store_ops::RespConsistency::parse(&text(&args[2])) {
            Some(consistency) => {
                session.access.consistency = consistency;
                Value::ok()
            }
            None => Value::error("ERR CLIENT CONSISTENCY takes one, quorum, all or serial"),
        },
        ("ID" | "GETNAME" | "SETNAME" | "SETINFO" | "CONSISTENCY", _) => {
            arity_error(&format!("client|{}", text(&args[1]).to_lowercase()))
        }
        (other, _) => {
            Value::error(format!("ERR unknown subcommand '{}'. Try CLIENT HELP.", other.to_lowercase()))
        }
    }
}

fn command(args: &[Vec<u8>]) -> Value {
    let describe = |name: &str, arity: i32| {
        Value::Array(vec![
            Value::text(&name.to_lowercase()),
            Value::Integer(i64::from(arity)),
            Value::Array(Vec::new()),
            Value::Integer(if arity.abs() > 1 { 1 } else { 0 }),
            Value::Integer(if arity.abs() > 1 { 1 } else { 0 }),
            Value::Integer(if arity.abs() > 1 { 1 } else { 0 }),
        ])
    };
    match args.get(1).map(|a| upper(a)).as_deref() {
        None => Value::Array(COMMANDS.iter().map(|&(name, arity)| describe(name, arity)).collect()),
        Some("COUNT") => Value::Integer(COMMANDS.len() as i64),
        // redis-cli asks for the docs to offer hints; an empty map means "none".
        Some("DOCS") => Value::Map(Vec::new()),
        Some("INFO") => Value::Array(
            args[2..]
                .iter()
                .map(|name| {
                    let name = upper(name);
                    COMMANDS
                        .iter()
                        .find(|(known, _)| *known == name)
                        .map_or(Value::Null, |&(n, a)| describe(n, a))
                })
                .collect(),
        ),
        Some(other) => {
            Value::error(format!("ERR unknown subcommand '{}'. Try COMMAND HELP.", other.to_lowercase()))
        }
    }
}

fn config(args: &[Vec<u8>]) -> Value {
    if upper(&args[1]) != "GET" {
        return Value::error(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            text(&args[1]).to_lowercase()
        ));
    }
    if args.len() < 3 {
        return arity_error("config|get");
    }
    // What redis-benchmark and common clients ask for; the store has no such settings.
    let known = [("save", ""), ("appendonly", "no"), ("databases", "1"), ("maxmemory", "0")];
    let mut pairs = Vec::new();
    for pattern in &args[2..] {
        let pattern = text(pattern).to_lowercase();
        for (name, value) in known {
            if (pattern == name || pattern == "*")
                && !pairs.iter().any(|(n, _): &(Value, Value)| *n == Value::text(name))
            {
                pairs.push((Value::text(name), Value::text(value)));
            }
        }
    }
    Value::Map(pairs)
}

fn info<S: Storage>(
    shard: &Shard<S>,
    settings: &RespSettings,
    _session: &Session,
    args: &[Vec<u8>],
) -> Value {
    let sections: Vec<String> = args[1..].iter().map(|a| text(a).to_lowercase()).collect();
    let wanted = |section: &str| {
        sections.is_empty()
            || sections.iter().any(|s| s == section || s == "all" || s == "everything" || s == "default")
    };
    let mut out = String::new();
    if wanted("server") {
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nkv_version:{}\r\nos:{}\r\n\
             arch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            settings.port,
            settings.started.elapsed().as_secs()
        ));
    }
    if wanted("clients") {
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\n\r\n",
            shard.stats().connection_count.get()
        ));
    }
    if wanted("stats") {
        out.push_str(&format!(
            "# Stats\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\n\r\n",
            shard.stats().request_count.get(),
            shard.stats().refused_connection_count.get()
        ));
    }
    if wanted("keyspace") {
        let keys = shard.store().engine().entry_count_estimate();
        out.push_str("# Keyspace\r\n");
        if keys > 0 {
            out.push_str(&format!("db0:keys={keys},expires=0,avg_ttl=0\r\n"));
        }
        out.push_str("\r\n");
    }
    Value::Verbatim(out)
}

/// Milliseconds of a TTL given as EX/PX/EXAT/PXAT; `Err` for a non-positive relative one.
fn ttl_ms(unit: &str, amount: i64, command: &str) -> Result<Option<u64>, Value> {
    let invalid = || Value::error(format!("ERR invalid expire time in '{command}' command"));
    let now = now_ms() as i64;
    let deadline_ms = match unit {
        "EX" if amount > 0 => amount.checked_mul(1000).ok_or_else(invalid)? + now,
        "PX" if amount > 0 => amount.checked_add(now).ok_or_else(invalid)?,
        "EXAT" if amount > 0 => amount.checked_mul(1000).ok_or_else(invalid)?,
        "PXAT" if amount > 0 => amount,
        _ => return Err(invalid()),
    };
    if deadline_ms - now > schema::TTL_MS_MAX as i64 {
        return Err(invalid());
    }
    // A deadline already past: the key is gone at once.
    Ok((deadline_ms > now).then(|| (deadline_ms - now) as u64))
}

fn answer(answer: Answer<Rc<[u8]>>) -> Value {
    match answer {
        Answer::Ok => Value::ok(),
        Answer::Null => Value::Null,
        Answer::Integer(n) => Value::Integer(n),
        Answer::Bulk(bytes) => Value::Bulk(bytes.to_vec()),
        Answer::Error(text) => Value::error(text),
    }
}

async fn apply<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    key: &[u8],
    update: Update,
) -> Result<Value, Value> {
    store_ops::update(shard, access, key, update).await.map(answer)
}

/// IFEQ/IFNE/IFDEQ/IFDNE and their argument; `None` if `word` is none of them.
fn condition(word: &str, argument: Option<&Vec<u8>>) -> Option<Result<Condition, Value>> {
    let argument = || argument.cloned().ok_or_else(|| Value::error(SYNTAX));
    Some(match word {
        "IFEQ" => argument().map(Condition::Equals),
        "IFNE" => argument().map(Condition::Differs),
        "IFDEQ" => argument().map(|d| Condition::DigestEquals(text(&d))),
        "IFDNE" => argument().map(|d| Condition::DigestDiffers(text(&d))),
        _ => return None,
    })
}

struct SetOptions {
    /// `Some(None)`: a deadline already past.
    ttl_ms: Option<Option<u64>>,
    keep_ttl: bool,
    condition: Option<Condition>,
    get: bool,
}

fn set_options(args: &[Vec<u8>]) -> Result<SetOptions, Value> {
    let mut options = SetOptions { ttl_ms: None, keep_ttl: false, condition: None, get: false };
    let mut at = 3;
    while at < args.len() {
        let word = upper(&args[at]);
        match word.as_str() {
            "EX" | "PX" | "EXAT" | "PXAT" if options.ttl_ms.is_none() && !options.keep_ttl => {
                let amount = integer(args.get(at + 1).ok_or_else(|| Value::error(SYNTAX))?)?;
                options.ttl_ms = Some(ttl_ms(&word, amount, "set")?);
                at += 2;
            }
            "KEEPTTL" if options.ttl_ms.is_none() => {
                options.keep_ttl = true;
                at += 1;
            }
            "NX" | "XX" if options.condition.is_none() => {
                options.condition = Some(if word == "NX" { Condition::Absent } else { Condition::Present });
                at += 1;
            }
            "GET" => {
                options.get = true;
                at += 1;
            }
            _ => match condition(&word, args.get(at + 1)) {
                Some(parsed) if options.condition.is_none() => {
                    options.condition = Some(parsed?);
                    at += 2;
                }
                _ => return Err(Value::error(SYNTAX)),
            },
        }
    }
    Ok(options)
}

async fn set<S: Storage>(shard: &Rc<Shard<S>>, access: Access, args: &[Vec<u8>]) -> Result<Value, Value> {
    let options = set_options(args)?;
    let (key, value) = (&args[1], &args[2]);
    let simple = options.condition.is_none() && !options.get && !options.keep_ttl;
    if simple {
        match options.ttl_ms {
            Some(None) => {
                store_ops::delete(shard, access, key).await?; // a deadline already past
            }
            ttl => store_ops::put(shard, access, key, value, ttl.flatten().unwrap_or(0)).await?,
        }
        return Ok(Value::ok());
    }
    if options.ttl_ms == Some(None) {
        // Conditional with a deadline already past: decide, then the key is gone.
        let update = Update::Set {
            value: value.clone(),
            ttl_ms: 1,
            keep_ttl: false,
            condition: options.condition,
            answer_previous: options.get,
        };
        return apply(shard, access, key, update).await;
    }
    let update = Update::Set {
        value: value.clone(),
        ttl_ms: options.ttl_ms.flatten().unwrap_or(0),
        keep_ttl: options.keep_ttl,
        condition: options.condition,
        answer_previous: options.get,
    };
    apply(shard, access, key, update).await
}

/// EXPIRE and friends: `unit` is EX, PX, EXAT or PXAT.
async fn expire<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    args: &[Vec<u8>],
    unit: &str,
    command: &str,
) -> Result<Value, Value> {
    let amount = integer(&args[2])?;
    let when = match args.get(3).map(|a| upper(a)).as_deref() {
        None => ExpireWhen::Always,
        Some("NX") if args.len() == 4 => ExpireWhen::NoTtl,
        Some("XX") if args.len() == 4 => ExpireWhen::HasTtl,
        Some("GT") if args.len() == 4 => ExpireWhen::Greater,
        Some("LT") if args.len() == 4 => ExpireWhen::Less,
        Some(flag) => return Err(Value::error(format!("ERR Unsupported option {flag}"))),
    };
    // A time at or before now deletes the key (as Redis does).
    let ttl_ms = match ttl_ms(unit, amount, command) {
        Ok(ttl) => ttl,
        Err(_) if amount <= 0 || unit.ends_with("AT") => None,
        Err(error) => return Err(error),
    };
    apply(shard, access, &args[1], Update::Expire { ttl_ms, when }).await
}

fn bulk_or_null(current: Option<&store_ops::Current>) -> Value {
    current.map_or(Value::Null, |c| Value::Bulk(c.value.to_vec()))
}

fn data<S: Storage>(shard: Rc<Shard<S>>, access: Access, name: String, args: Vec<Vec<u8>>) -> Pending {
    Box::pin(async move { run(&shard, access, &name, &args).await.unwrap_or_else(|error| error) })
}

async fn run<S: Storage>(
    shard: &Rc<Shard<S>>,
    access: Access,
    name: &str,
    args: &[Vec<u8>],
) -> Result<Value, Value> {
    match name {
        "GET" => Ok(bulk_or_null(store_ops::get(shard, access, &args[1]).await?.as_ref())),
        "SET" => set(shard, access, args).await,
        "SETNX" => {
            let update = Update::Set {
                value: args[2].clone(),
                ttl_ms: 0,
                keep_ttl: false,
                condition: Some(Condition::Absent),
                answer_previous: false,
            };
            Ok(match apply(shard, access, &args[1], update).await? {
                Value::Null => Value::Integer(0),
                _ => Value::Integer(1),
            })
        }
        "SETEX" | "PSETEX" => {
            let unit = if name == "SETEX" { "EX" } else { "PX" };
            let ttl = ttl_ms(unit, integer(&args[2])?, &name.to_lowercase())?.unwrap_or(1);
            store_ops::put(shard, access, &args[1], &args[3], ttl).await?;
            Ok(Value::ok())
        }
        "GETDEL" => apply(shard, access, &args[1], Update::GetDelete).await,
        "DIGEST" => Ok(store_ops::get(shard, access, &args[1])
            .await?
            .map_or(Value::Null, |c| Value::text(&crate::update::digest(&c.value)))),
        "DELEX" => match args.len() {
            2 => Ok(Value::Integer(i64::from(store_ops::delete(shard, access, &args[1]).await?))),
            4 => match condition(&upper(&args[2]), args.get(3)) {
                Some(parsed) => apply(shard, access, &args[1], Update::DeleteIf(parsed?)).await,
                None => Err(Value::error(SYNTAX)),
            },
            _ => Err(Value::error(SYNTAX)),
        },
        "DEL" => {
            let mut deleted = 0;
            for key in &args[1..] {
                deleted += i64::from(store_ops::delete(shard, access, key).await?);
            }
            Ok(Value::Integer(deleted))
        }
        "EXISTS" => {
            let found =
                futures::future::join_all(args[1..].iter().map(|key| store_ops::get(shard, access, key)))
                    .await;
            let mut count = 0;
            for one in found {
                count += i64::from(one?.is_some());
            }
            Ok(Value::Integer(count))
        }
        "MGET" => {
            let found =
                futures::future::join_all(args[1..].iter().map(|key| store_ops::get(shard, access, key)))
                    .await;
            // A key that cannot be read answers nil, as Redis does for a key of another type.
            Ok(Value::Array(found.into_iter().map(|one| bulk_or_null(one.ok().flatten().as_ref())).collect()))
        }
        "MSET" => {
            if args.len().is_multiple_of(2) {
                return Err(arity_error("mset"));
            }
            // Fanned out to the keys' shards at once: not atomic across keys (documented).
            let written = futures::future::join_all(
                args[1..].chunks(2).map(|pair| store_ops::put(shard, access, &pair[0], &pair[1], 0)),
            )
            .await;
            for one in written {
                one?;
            }
            Ok(Value::ok())
        }
        "TTL" | "PTTL" => Ok(Value::Integer(match store_ops::get(shard, access, &args[1]).await? {
            None => -2,
            Some(current) if current.ttl_left_ms == 0 => -1,
            // Redis rounds to the nearest second.
            Some(current) if name == "TTL" => current.ttl_left_ms.saturating_add(500) as i64 / 1000,
            Some(current) => current.ttl_left_ms as i64,
        })),
        "PERSIST" => apply(shard, access, &args[1], Update::Persist).await,
        "EXPIRE" => expire(shard, access, args, "EX", "expire").await,
        "PEXPIRE" => expire(shard, access, args, "PX", "pexpire").await,
        "EXPIREAT" => expire(shard, access, args, "EXAT", "expireat").await,
        "PEXPIREAT" => expire(shard, access, args, "PXAT", "pexpireat").await,
        "INCR" => apply(shard, access, &args[1], Update::IncrementBy(1)).await,
        "DECR" => apply(shard, access, &args[1], Update::IncrementBy(-1)).await,
        "INCRBY" => apply(shard, access, &args[1], Update::IncrementBy(integer(&args[2])?)).await,
        "DECRBY" => {
            let delta = integer(&args[2])?
                .checked_neg()
                .ok_or_else(|| Value::error("ERR decrement would overflow"))?;
            apply(shard, access, &args[1], Update::IncrementBy(delta)).await
        }
        other => Err(Value::error(format!("ERR unknown command '{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_order_a_pipeline_not_values() {
        let keys = |words: &[&str]| {
            let args: Vec<Vec<u8>> = words.iter().map(|word| word.as_bytes().to_vec()).collect();
            key_positions(&args).collect::<Vec<_>>()
        };
        assert_eq!(keys(&["SET", "k", "v", "NX"]), vec![1]);
        assert_eq!(keys(&["set", "k", "v"]), vec![1], "names in any case");
        assert_eq!(keys(&["INCRBY", "k", "5"]), vec![1]);
        assert_eq!(keys(&["MSET", "a", "1", "b", "2"]), vec![1, 3]);
        assert_eq!(keys(&["DEL", "a", "b"]), vec![1, 2]);
        assert_eq!(keys(&["MGET", "a", "b", "c"]), vec![1, 2, 3]);
        assert_eq!(keys(&["NEWCMD", "a", "b"]), vec![1, 2], "unknown: every argument");
        assert_eq!(keys(&[]), Vec::<usize>::new());
    }
}
