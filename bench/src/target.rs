//! The servers under test: kv through the `client` crate, or anything that speaks RESP.

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
                    other => anyhow::bail!("--consistency: expected one, quorum or all, got {other:?}"),
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
                let command = match op.kind {
                    OpKind::Get => resp_command(&[b"GET", &op.key]),
                    OpKind::Put => match op.ttl {
                        Some(ttl) => {
                            let ms = ttl.as_millis().to_string();
                            resp_command(&[b"SET", &op.key, value, b"PX", ms.as_bytes()])
                        }
                        None => resp_command(&[b"SET", &op.key, value]),
                    },
                    OpKind::Cas => {
                        let standard = workload.standard_value();
                        resp_command(&[b"EVAL", CAS_SCRIPT.as_bytes(), b"1", &op.key, standard, standard])
                    }
                };
                match tokio::time::timeout(timeout, connection.call(command)).await {
                    Err(_) => Outcome::Timeout,
                    Ok(Err(_)) | Ok(Ok(RespReply::Error)) => Outcome::Error,
                    Ok(Ok(RespReply::Nil)) => Outcome::Miss,
                    Ok(Ok(RespReply::Integer(0))) => Outcome::CasFailed,
                    Ok(Ok(RespReply::Bulk)) => Outcome::Hit,
                    Ok(Ok(_)) => Outcome::Written,
                }
            }
        }
    }
}

/// Compare-and-swap for Redis, which has none built in.
const CAS_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2]) else return 0 end";

fn resp_command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
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
