//! Hostile input against a real node: broken frames, absurd sizes, garbage, unknown
//! operations, silent clients, clients that never read, and 10,000 connections. Each gets
//! an error response or a closed connection; a bystander client keeps being served and the
//! server's memory stays bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use flatbuffers::FlatBufferBuilder;
use schema::{encode_request, parse_response, wire, Consistency, Op, RequestView, ResponseView, Status};

use crate::harness::{client, runtime, wait_for, DataDir, Node};

const READ_TIMEOUT: Duration = Duration::from_secs(20);

fn connect(node: &Node) -> TcpStream {
    let stream = TcpStream::connect(node.ports.client).expect("connect");
    stream.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    stream
}

pub(crate) fn frame(id: u64, op: Op<'_>) -> Vec<u8> {
    let request =
        RequestView { id, timeout_ms: 0, consistency: Consistency::ONE, context: &[], write_id: None, op };
    let mut out = Vec::new();
    encode_request(&mut FlatBufferBuilder::new(), &mut out, &request);
    out
}

fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// The next response, or `None` when the server closed the connection.
pub(crate) fn read_response(stream: &mut TcpStream) -> Option<ResponseView> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(error) => panic!("reading a response: {error}"),
    }
    let mut payload = vec![0u8; u32::from_le_bytes(header) as usize];
    stream.read_exact(&mut payload).expect("response payload");
    Some(parse_response(&payload).expect("valid response"))
}

fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected the server to close the connection, got {other:?}"),
    }
}

fn bystander_is_served(node: &Node) {
    runtime().block_on(async {
        let client = client(node).await;
        client.put(b"bystander", b"still here").await.expect("bystander put");
        let value = client.get(b"bystander").await.expect("bystander get").map(|v| v.value);
        assert_eq!(value, Some(b"still here".to_vec()));
    });
}

fn unknown_operation_frame(id: u64) -> Vec<u8> {
    let mut builder = FlatBufferBuilder::new();
    let key = builder.create_vector(b"k");
    let get = wire::Get::create(
        &mut builder,
        &wire::GetArgs { key: Some(key), metadata_only: false, sibling_skip: 0 },
    );
    let args = wire::RequestArgs {
        id,
        op_type: wire::Operation(99),
        op: Some(get.as_union_value()),
        ..wire::RequestArgs::default()
    };
    let request = wire::Request::create(&mut builder, &args);
    builder.finish_minimal(request);
    raw_frame(builder.finished_data())
}

#[test]
fn malformed_frames_get_errors_and_other_clients_are_served() {
    let dir = DataDir::new("hostile-frames");
    let node = Node::start(&dir.0, &["--idle-timeout-ms", "1000"]);

    // A frame cut short, then the client goes away.
    let mut stream = connect(&node);
    stream.write_all(&[100, 0, 0, 0, 1, 2, 3]).expect("write");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_closed(&mut stream, "truncated frame");
    bystander_is_served(&node);

    // A 4 GiB length prefix: one error response, then the connection is closed.
    let mut stream = connect(&node);
    stream.write_all(&u32::MAX.to_le_bytes()).expect("write");
    let response = read_response(&mut stream).expect("an error response");
    assert_eq!((response.id, response.status), (0, Status::FRAME_TOO_LARGE));
    assert_closed(&mut stream, "4 GiB prefix");
    bystander_is_served(&node);

    // Random bytes in a well-delimited frame: an error, and the connection goes on.
    let mut stream = connect(&node);
    let mut rng = server::rng::Rng::new(42);
    for size in [1usize, 7, 64, 1000, 70_000] {
        let garbage: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
        stream.write_all(&raw_frame(&garbage)).expect("write");
        let response = read_response(&mut stream).expect("a response to garbage");
        assert_eq!(response.status, Status::BAD_REQUEST, "{size} bytes of garbage: {response:?}");
    }
    stream
        .write_all(&frame(5, Op::Get { key: b"bystander", metadata_only: false, sibling_skip: 0 }))
        .expect("write");
    assert_eq!(read_response(&mut stream).map(|r| r.id), Some(5), "the connection survives garbage");

    // An operation from the future.
    stream.write_all(&unknown_operation_frame(4242)).expect("write");
    let response = read_response(&mut stream).expect("response");
    assert_eq!((response.id, response.status), (4242, Status::BAD_REQUEST));
    assert!(response.message.contains("unknown operation 99"), "{}", response.message);

    // Limits: a distinct status each, and nothing stored.
    let long_key = vec![b'k'; 257];
    let long_value = vec![0u8; client::VALUE_SIZE_MAX + 1];
    let cases: [(Op<'_>, Status); 4] = [
        (Op::Put { key: &long_key, value: b"v", ttl_ms: 0 }, Status::KEY_TOO_LARGE),
        (Op::Put { key: b"", value: b"v", ttl_ms: 0 }, Status::KEY_EMPTY),
        (Op::Put { key: b"big", value: &long_value, ttl_ms: 0 }, Status::VALUE_TOO_LARGE),
        (Op::Cas { key: b"big", expected: None, new_value: &long_value, ttl_ms: 0 }, Status::VALUE_TOO_LARGE),
    ];
    for (index, (op, status)) in cases.into_iter().enumerate() {
        stream.write_all(&frame(index as u64 + 10, op)).expect("write");
        let response = read_response(&mut stream).expect("response");
        assert_eq!((response.id, response.status), (index as u64 + 10, status));
    }
    stream
        .write_all(&frame(20, Op::Get { key: b"big", metadata_only: false, sibling_skip: 0 }))
        .expect("write");
    assert_eq!(read_response(&mut stream).map(|r| r.status), Some(Status::NOT_FOUND));

    // A client that connects and never sends is closed after the idle timeout.
    let mut silent = connect(&node);
    let start = Instant::now();
    assert_closed(&mut silent, "silent client");
    assert!(start.elapsed() < Duration::from_secs(10));
    bystander_is_served(&node);
}

#[test]
fn a_client_that_never_reads_stalls_only_itself() {
    let dir = DataDir::new("hostile-reader");
    let node = Node::start(&dir.0, &["--inflight-max", "64", "--write-timeout-ms", "2000"]);
    let value = vec![7u8; client::VALUE_SIZE_MAX];
    runtime().block_on(async { client(&node).await.put(b"big", &value).await.expect("put") });
    let rss_before_kib = node.rss_kib();

    // Ask for the 1 MiB value a million times and never read a reply: the server must stop
    // reading long before (the socket buffers fill and our writes block), then close us.
    let stream = connect(&node);
    stream.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let get = frame(1, Op::Get { key: b"big", metadata_only: false, sibling_skip: 0 });
    let burst: Vec<u8> = get.iter().copied().cycle().take(get.len() * 1_000).collect();
    let writer = std::thread::spawn(move || {
        let mut stream = stream;
        for _ in 0..1_000 {
            if stream.write_all(&burst).is_err() {
                return true; // the server stopped reading us, or closed us
            }
        }
        false
    });
    let stalled = writer.join().expect("writer thread");
    assert!(stalled, "the server read a million requests from a client that never reads");
    bystander_is_served(&node);
    let rss_after_kib = node.rss_kib();
    // 64 in-flight replies hold the stored value by reference; encoded output is bounded.
    assert!(
        rss_after_kib < rss_before_kib + 200 * 1024,
        "server memory grew from {rss_before_kib} KiB to {rss_after_kib} KiB"
    );
}

fn raise_open_file_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_max < wanted {
            limit.rlim_max = wanted; // needs root, which CI has
        }
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "cannot raise the open-file limit to {wanted}"
        );
    }
}

#[test]
fn ten_thousand_connections_at_once() {
    const CONNECTION_COUNT: usize = 10_000;
    raise_open_file_limit(CONNECTION_COUNT as u64 + 2_000);
    let dir = DataDir::new("hostile-connections");
    let node = Node::start(&dir.0, &[]);
    let rss_before_kib = node.rss_kib();
    let mut streams = Vec::with_capacity(CONNECTION_COUNT);
    for _ in 0..CONNECTION_COUNT / 500 {
        for _ in 0..500 {
            streams.push(connect(&node));
        }
    }
    // Every connection is served: a Hello on each of a sample, in flight together.
    for stream in streams.iter_mut().step_by(50) {
        stream.write_all(&frame(9, Op::Hello { protocol_version: 1, client_name: "many" })).expect("write");
    }
    for stream in streams.iter_mut().step_by(50) {
        let response = read_response(stream).expect("hello reply");
        assert_eq!((response.id, response.status), (9, Status::OK));
    }
    bystander_is_served(&node);
    let rss_after_kib = node.rss_kib();
    assert!(
        rss_after_kib < rss_before_kib + 512 * 1024,
        "{CONNECTION_COUNT} connections took the server from {rss_before_kib} KiB to {rss_after_kib} KiB"
    );
    drop(streams);
    wait_for("the server to close 10,000 connections", Duration::from_secs(30), || {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", node.child.id())).ok()?.count();
        (fds < 200).then_some(())
    });
    bystander_is_served(&node);
    eprintln!("10,000 connections: server RSS {rss_before_kib} KiB -> {rss_after_kib} KiB");
}

#[test]
fn frames_started_and_never_finished_hold_bounded_memory_and_time_out() {
    const CONNECTION_COUNT: usize = 40;
    let dir = DataDir::new("hostile-partial-frames");
    let node = Node::start(&dir.0, &["--frame-timeout-ms", "3000", "--read-buffers-max-mib", "16"]);
    let rss_before_kib = node.rss_kib();
    // Each connection sends 1.9 MB of a 2,000,000-byte frame and stops: 76 MB of buffers in all
    // without a budget; with it the server holds at most 16 MiB and the rest wait unread.
    let mut start_of_frame = 2_000_000u32.to_le_bytes().to_vec();
    start_of_frame.extend(std::iter::repeat_n(7u8, 1_900_000));
    let mut streams: Vec<TcpStream> = (0..CONNECTION_COUNT)
        .map(|_| {
            let mut stream = connect(&node);
            stream.set_write_timeout(Some(Duration::from_millis(100))).expect("timeout");
            let _ = stream.write_all(&start_of_frame); // blocks once the server stops reading
            stream
        })
        .collect();
    // The server drains the sockets it may read over the next moments: watch its peak for
    // 2 s (without the budget it reaches about 96 MB here within 1 s).
    let mut rss_during_kib = 0;
    for _ in 0..20 {
        rss_during_kib = rss_during_kib.max(node.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    bystander_is_served(&node);
    assert!(
        rss_during_kib < rss_before_kib + 40 * 1024,
        "{CONNECTION_COUNT} partial 2 MB frames took the server from {rss_before_kib} KiB to {rss_during_kib} KiB"
    );
    // Every one of them is closed once its frame is overdue (waiting ones right after).
    for stream in &mut streams {
        assert_closed(stream, "a frame that never finishes");
    }
    bystander_is_served(&node);
    eprintln!("partial frames: server RSS {rss_before_kib} KiB -> {rss_during_kib} KiB, all closed");
}
