//! The servers under test: kv through the `client` crate, anything that speaks RESP, or
//! etcd through its JSON gateway.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use client::{CasOutcome, Client, Options};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::workload::{Op, OpKind, Workload};

/// How an operation ended, as far as the statistics care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Written,
    CasFailed,
    Timeout,
    Error,
}

#[derive(Clone)]
pub enum Target {
    Native(Client),
    Resp(Arc<RespConnection>),
    Etcd(Arc<EtcdConnection>),
}

impl Target {
    pub async fn connect(
        protocol: crate::args::Protocol,
        address: &str,
        args: &crate::args::Args,
    ) -> anyhow::Result<Target> {
        match protocol {
            crate::args::Protocol::Native => {
                let consistency = match args.consistency.to_ascii_lowercase().as_str() {
                    "one" => client::Consistency::ONE,
                    "quorum" => client::Consistency::QUORUM,
                    "all" => client::Consistency::ALL,
                    "serial" => client::Consistency::SERIAL,
                    other => {
                        anyhow::bail!("--consistency: expected one, quorum, all or serial, got {other:?}")
                    }
                };
                let options = Options {
                    timeout: args.timeout,
                    shard_aware: args.shard_aware,
                    consistency,
                    ..Options::default()
                };
                let client = Client::connect(address, options)
                    .await
                    .with_context(|| format!("connecting to {address}"))?;
                Ok(Target::Native(client))
            }
            crate::args::Protocol::Resp => {
                Ok(Target::Resp(Arc::new(RespConnection::connect(address).await?)))
            }
            crate::args::Protocol::Etcd => {
                Ok(Target::Etcd(Arc::new(EtcdConnection::connect(address).await?)))
            }
        }
    }

    pub async fn execute(&self, op: &Op, workload: &Workload, timeout: Duration) -> Outcome {
        let value = workload.value(op.value_size);
        match self {
            Target::Native(client) => {
                let result = match op.kind {
                    OpKind::Get => {
                        client
                            .get(&op.key)
                            .await
                            .map(|v| if v.is_some() { Outcome::Hit } else { Outcome::Miss })
                    }
                    OpKind::Put => {
                        client.put_with_ttl(&op.key, value, op.ttl).await.map(|()| Outcome::Written)
                    }
                    OpKind::Cas => {
                        let standard = workload.standard_value();
                        client.cas(&op.key, Some(standard), standard, None).await.map(|outcome| match outcome
                        {
                            CasOutcome::Swapped => Outcome::Written,
                            CasOutcome::Failed { .. } => Outcome::CasFailed,
                        })
                    }
                };
                match result {
                    Ok(outcome) => outcome,
                    Err(client::Error::Timeout) => Outcome::Timeout,
                    Err(_) => Outcome::Error,
                }
            }
            Target::Resp(connection) => {
                let mut command = Vec::new();
                resp_command_into(op, workload, &mut command);
                match tokio::time::timeout(timeout, connection.call(command)).await {
                    Err(_) => Outcome::Timeout,
                    Ok(Err(_)) | Ok(Ok(RespReply::Error)) => Outcome::Error,
                    Ok(Ok(RespReply::Nil)) => Outcome::Miss,
                    Ok(Ok(RespReply::Integer(0))) => Outcome::CasFailed,
                    Ok(Ok(RespReply::Bulk)) => Outcome::Hit,
                    Ok(Ok(_)) => Outcome::Written,
                }
            }
            Target::Etcd(connection) => {
                let key = base64(&op.key);
                let (path, body) = match op.kind {
                    OpKind::Get => ("/v3/kv/range", format!(r#"{{"key":"{key}"}}"#)),
                    OpKind::Put => {
                        ("/v3/kv/put", format!(r#"{{"key":"{key}","value":"{}"}}"#, base64(value)))
                    }
                    OpKind::Cas => {
                        let standard = base64(workload.standard_value());
                        let body = format!(
                            r#"{{"compare":[{{"key":"{key}","target":"VALUE","result":"EQUAL","value":"{standard}"}}],"success":[{{"request_put":{{"key":"{key}","value":"{standard}"}}}}]}}"#
                        );
                        ("/v3/kv/txn", body)
                    }
                };
                match tokio::time::timeout(timeout, connection.post(path, &body)).await {
                    Err(_) => Outcome::Timeout,
                    Ok(Ok((200, reply))) => match op.kind {
                        OpKind::Get if reply.contains("\"kvs\"") => Outcome::Hit,
                        OpKind::Get => Outcome::Miss,
                        OpKind::Cas if !reply.contains("\"succeeded\":true") => Outcome::CasFailed,
                        _ => Outcome::Written,
                    },
                    Ok(_) => Outcome::Error,
                }
            }
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(word >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One keep-alive HTTP/1.1 connection to etcd's gateway; one request at a time.
pub struct EtcdConnection {
    host: String,
    stream: tokio::sync::Mutex<BufReader<TcpStream>>,
}

impl EtcdConnection {
    pub async fn connect(address: &str) -> anyhow::Result<EtcdConnection> {
        let stream = TcpStream::connect(address).await.with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        Ok(EtcdConnection {
            host: address.to_string(),
            stream: tokio::sync::Mutex::new(BufReader::new(stream)),
        })
    }

    /// POSTs `body` (JSON) to `path`: the status and the body of the answer.
    pub async fn post(&self, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = self.stream.lock().await;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let status: u16 =
            line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("HTTP status line")?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = Some(value.trim().parse::<usize>()?);
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                stream.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim_end(), 16)?;
                let mut chunk = vec![0; size + 2];
                stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length.context("an HTTP answer without a length")?, 0);
            stream.read_exact(&mut body).await?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Compare-and-swap for Redis, which has none built in.
const CAS_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2]) else return 0 end";

/// Appends the RESP command that performs `op`.
pub fn resp_command_into(op: &Op, workload: &Workload, out: &mut Vec<u8>) {
    let value = workload.value(op.value_size);
    match op.kind {
        OpKind::Get => resp_command(&[b"GET", &op.key], out),
        OpKind::Put => match op.ttl {
            Some(ttl) => {
                let ms = ttl.as_millis().to_string();
                resp_command(&[b"SET", &op.key, value, b"PX", ms.as_bytes()], out)
            }
            None => resp_command(&[b"SET", &op.key, value], out),
        },
        OpKind::Cas => {
            let standard = workload.standard_value();
            resp_command(&[b"EVAL", CAS_SCRIPT.as_bytes(), b"1", &op.key, standard, standard], out)
        }
    }
}

fn resp_command(parts: &[&[u8]], out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "*{}\r\n", parts.len());
    for part in parts {
        let _ = write!(out, "${}\r\n", part.len());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespReply {
    Status,
    Error,
    Integer(i64),
    Bulk,
    Nil,
    Array,
}

type RespQueue = (mpsc::UnboundedSender<Vec<u8>>, VecDeque<oneshot::Sender<RespReply>>);

/// One RESP connection with many commands in flight: replies come in order, so a FIFO of
/// waiters matches them. A command and its waiter are queued under one lock, so the FIFO
/// order is the order on the wire.
pub struct RespConnection {
    queue: Arc<Mutex<RespQueue>>,
}

impl RespConnection {
    pub async fn connect(address: &str) -> anyhow::Result<RespConnection> {
        let stream = TcpStream::connect(address).await.with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        let (reader, mut writer) = stream.into_split();
        let (sender, mut frames) = mpsc::unbounded_channel::<Vec<u8>>();
        let queue: Arc<Mutex<RespQueue>> = Arc::new(Mutex::new((sender, VecDeque::new())));
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(frame) = frames.recv().await {
                batch.extend_from_slice(&frame);
                while let Ok(frame) = frames.try_recv() {
                    batch.extend_from_slice(&frame);
                }
                if writer.write_all(&batch).await.is_err() {
                    return;
                }
                batch.clear();
            }
        });
        let waiters = queue.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(256 << 10, reader);
            while let Ok(reply) = read_reply(&mut reader).await {
                let waiter = waiters.lock().map(|mut queue| queue.1.pop_front());
                if let Ok(Some(waiter)) = waiter {
                    let _ = waiter.send(reply);
                }
            }
            // Dropping the waiters fails every call still in flight.
            if let Ok(mut queue) = waiters.lock() {
                queue.1.clear();
            }
        });
        Ok(RespConnection { queue })
    }

    pub async fn call(&self, command: Vec<u8>) -> anyhow::Result<RespReply> {
        let (sender, receiver) = oneshot::channel();
        {
            let mut queue = self.queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            queue.1.push_back(sender);
            queue.0.send(command).map_err(|_| anyhow::anyhow!("connection closed"))?;
        }
        Ok(receiver.await?)
    }
}

async fn read_line<R: AsyncBufReadExt + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> anyhow::Result<()> {
    line.clear();
    reader.read_until(b'\n', line).await?;
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        anyhow::bail!("connection closed or bad RESP line");
    }
    line.truncate(line.len() - 2);
    Ok(())
}

fn read_reply<'a, R: AsyncBufReadExt + AsyncReadExt + Unpin + Send>(
    reader: &'a mut R,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<RespReply>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = Vec::new();
        read_line(reader, &mut line).await?;
        let number = || -> anyhow::Result<i64> { Ok(std::str::from_utf8(&line[1..])?.parse()?) };
        Ok(match line[0] {
            b'+' => RespReply::Status,
            b'-' => RespReply::Error,
            b':' => RespReply::Integer(number()?),
            b'$' => match number()? {
                -1 => RespReply::Nil,
                size => {
                    let mut body = vec![0u8; size as usize + 2];
                    reader.read_exact(&mut body).await?;
                    RespReply::Bulk
                }
            },
            b'*' => {
                let count = number()?;
                for _ in 0..count.max(0) {
                    read_reply(reader).await?;
                }
                if count < 0 {
                    RespReply::Nil
                } else {
                    RespReply::Array
                }
            }
            other => anyhow::bail!("unknown RESP type byte {other}"),
        })
    })
}
