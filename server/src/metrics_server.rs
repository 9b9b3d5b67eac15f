//! `--metrics-listen`: serves `GET /metrics` (Prometheus text format 0.0.4, `metrics::render`)
//! and `GET /health` from shard 0, which gathers every shard's figures over the mesh per
//! scrape.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use serde_json::Value;

use crate::command::{Command, Reply};
use crate::metrics::render;
use crate::shard::Shard;
use crate::storage::Storage;

/// Every shard's stats object: this one's, and the others' over the mesh.
pub async fn gather<S: Storage>(shard: &Rc<Shard<S>>) -> Vec<Value> {
    let mut shards = vec![shard.stats_value()];
    if let Some(mesh) = shard.mesh() {
        for target in (0..shard.count()).filter(|&t| t != shard.index()) {
            if let Reply::Stats(text) = mesh.forward(target, Command::ShardStats).await {
                shards.push(serde_json::from_str(&text).unwrap_or(Value::Null));
            }
        }
    }
    shards
}

/// Whether the node serves, and if not why (for `/health`).
fn health<S: Storage>(shard: &Shard<S>) -> Result<(), String> {
    if let Some(error) = shard.store().wal().failure() {
        return Err(format!("the write path stopped: {error}"));
    }
    if let Some(cluster) = shard.cluster() {
        let view = cluster.view();
        if view.formed.is_none() {
            return Err(view.forming_note.clone());
        }
    }
    Ok(())
}

/// Serves `/metrics` and `/health` on `listener` (shard 0), one request per connection.
pub async fn serve<S: Storage>(listener: glommio::net::TcpListener, shard: Rc<Shard<S>>) {
    loop {
        let Ok(mut stream) = listener.accept().await else {
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            let read = async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return false,
                        Ok(count) => request.extend_from_slice(&buffer[..count]),
                    }
                }
                true
            };
            let deadline = async {
                glommio::timer::sleep(Duration::from_secs(10)).await;
                false
            };
            if !futures_lite::future::or(read, deadline).await {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match (line.starts_with("GET "), target) {
                (true, "/metrics") => ("200 OK", render(&shard.hello().node_id, &gather(&shard).await)),
                (true, "/health") => match health(&shard) {
                    Ok(()) => ("200 OK", "ok\n".to_string()),
                    Err(reason) => ("503 Service Unavailable", format!("{reason}\n")),
                },
                (true, _) => ("404 Not Found", "GET /metrics or /health\n".to_string()),
                (false, _) => ("405 Method Not Allowed", "GET only\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.close().await;
        })
        .detach();
    }
}
