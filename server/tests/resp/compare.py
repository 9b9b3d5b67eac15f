"""Drives kvd's RESP port and a real redis-server with the same command script through
redis-py (RESP2 and RESP3) and compares the replies. Replies that differ by nature (INFO,
CLIENT ID, COMMAND DOCS, HELLO's version and id) are checked for shape. Redis 8.4 commands
(DIGEST, DELEX, SET IFEQ/IFNE/IFDEQ/IFDNE), absent from Debian's Redis 7.0, are checked
against their documented behaviour on kvd alone.

usage: compare.py KVD_PORT REDIS_PORT
Exit status 0 when everything matches; the mismatches are printed otherwise.
"""

import sys
import time

import redis

KV_PORT, REDIS_PORT = int(sys.argv[1]), int(sys.argv[2])
failures = []


def connect(port, protocol):
    return redis.Redis(port=port, protocol=protocol, decode_responses=False, socket_timeout=10)


def outcome(client, *args):
    try:
        return ("ok", client.execute_command(*args))
    except (redis.ResponseError, redis.AuthenticationError) as error:
        # Compare the error's code and text.
        return ("error", str(error))


def same(name, *args, relax=None):
    for protocol in (2, 3):
        kv, rd = connect(KV_PORT, protocol), connect(REDIS_PORT, protocol)
        ours, theirs = outcome(kv, *args), outcome(rd, *args)
        if relax:
            ours, theirs = relax(ours), relax(theirs)
        if ours != theirs:
            failures.append(f"{name} (RESP{protocol}) {args!r}: kvd {ours!r} != redis {theirs!r}")


def expect(name, args, wanted, port=None):
    client = connect(port or KV_PORT, 2)
    got = outcome(client, *args)
    if got != wanted:
        failures.append(f"{name} {args!r}: kvd {got!r}, documented {wanted!r}")


def both(*args):
    """Runs a setup command on both servers."""
    for port in (KV_PORT, REDIS_PORT):
        connect(port, 2).execute_command(*args)


def ttl_bucket(result):
    # TTLs tick between the two servers' answers: compare them to the second.
    kind, value = result
    if kind == "ok" and isinstance(value, int) and value > 1000:
        return (kind, round(value / 1000))
    return result


def error_code(result):
    kind, value = result
    return (kind, value.split(" ")[0] if kind == "error" else value)


# Clean slate on both: the script's keys.
keys = [b"k", b"n", b"t", b"m1", b"m2", b"m3", b"nx", b"xx", b"gd", b"big", b"e", b"f", b"g", b"h"]
for port in (KV_PORT, REDIS_PORT):
    connect(port, 2).delete(*keys)

same("ping", "PING")
same("ping message", "PING", "hello")
same("echo", "ECHO", "echo me")
same("set", "SET", "k", "v1")
same("get", "GET", "k")
same("get absent", "GET", "absent-key")
same("set get", "SET", "k", "v2", "GET")
same("set nx on existing", "SET", "k", "v3", "NX")
same("set xx on existing", "SET", "k", "v4", "XX")
same("set xx on absent", "SET", "xx", "v", "XX")
same("set nx on absent", "SET", "nx", "v", "NX")
same("get after set", "GET", "k")
same("set ex", "SET", "t", "v", "EX", "100")
same("ttl", "TTL", "t")
same("pttl", "PTTL", "t", relax=ttl_bucket)
same("set keepttl", "SET", "t", "w", "KEEPTTL")
same("ttl kept", "TTL", "t")
same("set px", "SET", "t", "v", "PX", "50000")
same("ttl px", "TTL", "t")
same("set exat", "SET", "t", "v", "EXAT", str(int(time.time()) + 300))
same("ttl exat", "TTL", "t", relax=lambda r: ttl_bucket((r[0], r[1] * 1000)) if r[0] == "ok" else r)
same("persist", "PERSIST", "t")
same("persist again", "PERSIST", "t")
same("ttl none", "TTL", "t")
same("ttl absent", "TTL", "absent-key")
same("expire", "EXPIRE", "t", "100")
same("expire nx", "EXPIRE", "t", "200", "NX")
same("expire xx", "EXPIRE", "t", "200", "XX")
same("expire gt", "EXPIRE", "t", "50", "GT")
same("expire lt", "EXPIRE", "t", "50", "LT")
same("ttl after", "TTL", "t")
same("pexpire", "PEXPIRE", "t", "90000")
same("ttl pexpire", "TTL", "t")
same("expireat", "EXPIREAT", "t", str(int(time.time()) + 500))
same("pexpireat", "PEXPIREAT", "t", str(int(time.time() * 1000) + 600000))
same("expire absent", "EXPIRE", "absent-key", "10")
same("expire past deletes", "EXPIRE", "t", "-1")
same("gone", "EXISTS", "t")
same("mset", "MSET", "m1", "a", "m2", "b", "m3", "c")
same("mget", "MGET", "m1", "m2", "absent-key", "m3")
same("exists several", "EXISTS", "m1", "m2", "absent-key", "m1")
same("del several", "DEL", "m1", "m2", "absent-key")
same("mset odd", "MSET", "m1", "a", "m2")
same("getdel", "SET", "gd", "x")
same("getdel value", "GETDEL", "gd")
same("getdel absent", "GETDEL", "gd")
same("setnx new", "SETNX", "e", "1")
same("setnx existing", "SETNX", "e", "2")
same("setex", "SETEX", "f", "100", "v")
same("ttl setex", "TTL", "f")
same("psetex", "PSETEX", "g", "100000", "v")
same("ttl psetex", "TTL", "g")
same("setex zero", "SETEX", "f", "0", "v")
same("set ex zero", "SET", "f", "v", "EX", "0")
same("set ex junk", "SET", "f", "v", "EX", "soon")
same("set syntax", "SET", "f", "v", "NX", "XX")
same("incr new", "INCR", "n")
same("incrby", "INCRBY", "n", "41")
same("decr", "DECR", "n")
same("decrby", "DECRBY", "n", "10")
same("incr keeps", "GET", "n")
same("incr not integer", "INCR", "k")
same("incrby junk", "INCRBY", "n", "x")
same("incr overflow", "INCRBY", "n", str(2**63 - 1))
same("select 0", "SELECT", "0")
expect("select 1 (one database only)", ("SELECT", "1"), ("error", "DB index is out of range"))
same("wrong arity", "GET")
same("wrong arity set", "SET", "k")
same("unknown", "NOSUCHCOMMAND", "a", "b")
same("client setname", "CLIENT", "SETNAME", "tester")
same("client getname fresh", "CLIENT", "GETNAME")
expect("client setinfo (Redis 7.2)", ("CLIENT", "SETINFO", "LIB-NAME", "x"), ("ok", b"OK"))
same("auth without password", "AUTH", "secret")
same("config get save", "CONFIG", "GET", "save", relax=lambda r: (r[0], type(r[1]).__name__))
same("hello bad", "HELLO", "4", relax=error_code)

# Shapes only.
kv = connect(KV_PORT, 2)
info = kv.info()
for field in ("redis_version", "connected_clients", "uptime_in_seconds"):
    if field not in info:
        failures.append(f"INFO lacks {field}: {sorted(info)}")
if not isinstance(kv.client_id(), int):
    failures.append("CLIENT ID is not an integer")
if not isinstance(kv.dbsize(), int):
    failures.append("DBSIZE is not an integer")
hello = connect(KV_PORT, 3).execute_command("HELLO", "3")
if hello.get(b"proto") != 3 or b"server" not in hello:
    failures.append(f"HELLO 3: {hello!r}")
if not isinstance(kv.command_count(), int):
    failures.append("COMMAND COUNT is not an integer")

# Redis 8.4 commands, against their documentation.
kv.set("h", "hello")
digest = kv.execute_command("DIGEST", "h")
if not (isinstance(digest, bytes) and len(digest) == 16 and int(digest, 16) >= 0):
    failures.append(f"DIGEST: {digest!r}")
expect("digest absent", ("DIGEST", "absent-key"), ("ok", None))
expect("set ifeq match", ("SET", "h", "world", "IFEQ", "hello"), ("ok", True))
expect("set ifeq mismatch", ("SET", "h", "x", "IFEQ", "hello"), ("ok", None))
expect("set ifne mismatch", ("SET", "h", "x", "IFNE", "world"), ("ok", None))
expect("set ifne match", ("SET", "h", "again", "IFNE", "other"), ("ok", True))
digest = kv.execute_command("DIGEST", "h").decode()
expect("set ifdeq", ("SET", "h", "d", "IFDEQ", digest), ("ok", True))
expect("set ifdne same", ("SET", "h", "e", "IFDNE", kv.execute_command("DIGEST", "h").decode()), ("ok", None))
# With GET the reply is the old value, which redis-py's SET callback turns into False.
expect("set ifeq get", ("SET", "h", "z", "IFEQ", "d", "GET"), ("ok", False))
expect("set ifeq get wrote", ("GET", "h"), ("ok", b"z"))
expect("delex ifeq mismatch", ("DELEX", "h", "IFEQ", "nope"), ("ok", 0))
expect("delex ifeq match", ("DELEX", "h", "IFEQ", "z"), ("ok", 1))
expect("delex absent", ("DELEX", "h"), ("ok", 0))
kv.set("h", "v")
expect("delex ifdne", ("DELEX", "h", "IFDNE", "0000000000000000"), ("ok", 1))
# AUTH and requirepass are checked by the Rust test with a password set.
for failure in failures:
    print("MISMATCH", failure)
print(f"compare.py: {len(failures)} mismatches")
sys.exit(1 if failures else 0)
