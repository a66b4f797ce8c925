//! HTTP/2 limits on the gRPC listener: the advertised stream limit and its enforcement, the
//! rapid-reset guard, and a well-behaved client on another connection served throughout.
//!
//! The `h2` crate reads the broker's SETTINGS as a real client does. It will not misbehave
//! (it queues streams over the peer's limit, and it may coalesce a reset with the stream's
//! HEADERS), so the attacks are written as frames by [`RawH2`]: HEADERS over the limit, and
//! HEADERS with their RST_STREAM in the same write, as the rapid-reset attack sends them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{self, SendRequest};
use tokenbroker_client::Client;
use tokenbroker_tests::TestBroker;

use crate::metrics::Scrape;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, tcp::OwnedWriteHalf},
    sync::mpsc,
    task::JoinHandle,
};

/// Opens an HTTP/2 connection; the returned task drives it and ends with its result.
async fn raw_connection(
    addr: std::net::SocketAddr,
) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(addr).await.expect("broker reachable");
    let (send, connection) = client::handshake(tcp).await.expect("HTTP/2 handshake");
    (send, tokio::spawn(connection))
}

/// Waits, bounded, until the connection has read the broker's SETTINGS (the client's own
/// stream limit drops from "unlimited" to the broker's) and returns the advertised limit.
async fn advertised_stream_limit(send: &SendRequest<Bytes>) -> usize {
    for _ in 0..200 {
        let limit = send.current_max_send_streams();
        if limit != usize::MAX {
            return limit;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the broker's SETTINGS never arrived");
}

/// Calls Introspect on `client` until `stop` is set, returning how many calls succeeded and the
/// slowest one; a failed call fails the test.
fn keep_calling(
    client: Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> JoinHandle<(u32, Duration)> {
    tokio::spawn(async move {
        let (mut calls, mut slowest) = (0, Duration::ZERO);
        // Bounded: the test sets `stop` within seconds; this is the backstop.
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && calls < 10_000 {
            let started = Instant::now();
            let info = client
                .introspect_secret(&secrecy::SecretString::from("not-a-token"))
                .await
                .expect("the well-behaved client is served");
            assert!(!info.active);
            slowest = slowest.max(started.elapsed());
            calls += 1;
        }
        (calls, slowest)
    })
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame the broker sent.
#[derive(Debug)]
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM, or of a GOAWAY (after its last stream id).
    fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().expect("4 bytes"))
    }
}

/// An HTTP/2 client that writes frames by hand.
struct RawH2 {
    write: OwnedWriteHalf,
    frames: mpsc::UnboundedReceiver<Frame>,
    request: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

impl RawH2 {
    /// Connects, exchanges SETTINGS, and returns the client with the broker's
    /// SETTINGS_MAX_CONCURRENT_STREAMS (if it sent one).
    async fn connect(addr: std::net::SocketAddr) -> (Self, Option<u32>) {
        let tcp = TcpStream::connect(addr).await.expect("broker reachable");
        let (mut read, mut write) = tcp.into_split();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        write.write_all(&hello).await.expect("preface written");
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let mut head = [0u8; 9];
                if read.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let stream =
                    u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) & !(1 << 31);
                let mut payload = vec![0; len];
                if read.read_exact(&mut payload).await.is_err() {
                    return;
                }
                if tx
                    .send(Frame {
                        kind: head[3],
                        stream,
                        payload,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        // A header block with no dynamic table entries (every field a literal without
        // indexing), so the same block serves every stream.
        let mut request = vec![0x83, 0x86]; // :method POST, :scheme http
        let mut literal = |name_index: u8, name: &str, value: &str| {
            request.push(name_index);
            if name_index == 0 {
                request.push(u8::try_from(name.len()).expect("short"));
                request.extend_from_slice(name.as_bytes());
            }
            request.push(u8::try_from(value.len()).expect("short"));
            request.extend_from_slice(value.as_bytes());
        };
        literal(4, "", "/tokenbroker.v1.TokenBroker/Introspect"); // :path
        literal(1, "", &addr.to_string()); // :authority
        literal(0, "content-type", "application/grpc");
        literal(0, "te", "trailers");
        let mut client = Self {
            write,
            frames,
            request,
        };
        let settings = client
            .next_frame(|f| f.kind == SETTINGS && f.stream == 0)
            .await
            .expect("the broker's SETTINGS");
        let limit = settings.payload.chunks_exact(6).find_map(|param| {
            (u16::from_be_bytes([param[0], param[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
                .then(|| u32::from_be_bytes(param[2..6].try_into().expect("4 bytes")))
        });
        client
            .send(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("ack written");
        (client, limit)
    }

    /// The next frame that `wanted` picks, skipping others; `None` after 5 s or at the end
    /// of the connection.
    async fn next_frame(&mut self, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Ok(Some(f)) if wanted(&f) => return Some(f),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// A HEADERS frame opening client stream `stream` with the gRPC request head, its end of
    /// stream not sent.
    fn open(&self, stream: u32) -> Vec<u8> {
        frame(HEADERS, END_HEADERS, stream, &self.request)
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await
    }
}

/// The `i`th client stream id (1, 3, 5, ...).
fn stream_id(i: usize) -> u32 {
    u32::try_from(2 * i + 1).expect("few streams")
}

#[tokio::test]
async fn the_listener_advertises_its_stream_limit_and_refuses_streams_over_it() {
    // The default, as a real client reads it.
    let defaults = TestBroker::spawn().await;
    let (send, _conn) = raw_connection(defaults.addr).await;
    assert_eq!(advertised_stream_limit(&send).await, 128);
    drop(defaults);

    const LIMIT: usize = 4;
    const EXTRA: usize = 6;
    let broker = TestBroker::spawn_with(|s| s.server.max_concurrent_streams = LIMIT as u32).await;
    let (mut raw, advertised) = RawH2::connect(broker.addr).await;
    assert_eq!(advertised, Some(LIMIT as u32));
    // Every stream in one write, without waiting: each call waits for its request message, so
    // the first LIMIT stay open and the rest are over the limit.
    let burst: Vec<u8> = (0..LIMIT + EXTRA)
        .flat_map(|i| raw.open(stream_id(i)))
        .collect();
    raw.send(&burst).await.expect("streams written");
    let mut refused = Vec::new();
    while refused.len() < EXTRA {
        let reset = raw
            .next_frame(|f| f.kind == RST_STREAM || f.kind == GOAWAY)
            .await
            .unwrap_or_else(|| panic!("only {refused:?} refused"));
        assert_eq!(
            reset.kind, RST_STREAM,
            "refusing a stream keeps the connection"
        );
        assert_eq!(
            reset.error_code(),
            REFUSED_STREAM,
            "stream {}",
            reset.stream
        );
        refused.push(reset.stream);
    }
    refused.sort_unstable();
    let over: Vec<u32> = (LIMIT..LIMIT + EXTRA).map(stream_id).collect();
    assert_eq!(
        refused, over,
        "exactly the streams over the limit are refused"
    );

    // The streams under the limit were accepted: ending each gets it an answer from the service
    // (the empty request is no valid message, but an answer all the same) and no reset.
    let ends: Vec<u8> = (0..LIMIT)
        .flat_map(|i| frame(DATA, END_STREAM, stream_id(i), &[]))
        .collect();
    raw.send(&ends).await.expect("ends written");
    let mut answered = Vec::new();
    while answered.len() < LIMIT {
        let answer = raw
            .next_frame(|f| f.kind == HEADERS || f.kind == RST_STREAM || f.kind == GOAWAY)
            .await
            .unwrap_or_else(|| panic!("only {answered:?} answered"));
        assert_eq!(answer.kind, HEADERS, "{answer:?}");
        answered.push(answer.stream);
    }
    answered.sort_unstable();
    assert_eq!(answered, (0..LIMIT).map(stream_id).collect::<Vec<_>>());
    eprintln!(
        "h2_limits: advertised {LIMIT}; of {} streams opened at once, {} refused (REFUSED_STREAM), {} answered",
        LIMIT + EXTRA,
        refused.len(),
        answered.len()
    );
}

#[tokio::test]
async fn a_rapid_reset_burst_gets_goaway_while_another_client_is_served() {
    // Not h2's default of 20, so the GOAWAY's place shows the setting reaches the listener.
    const MAX_PENDING_RESETS: usize = 30;
    let broker =
        TestBroker::spawn_with(|s| s.server.max_pending_reset_streams = MAX_PENDING_RESETS).await;
    // The well-behaved client: its own connection, calling throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = keep_calling(broker.service.clone(), std::sync::Arc::clone(&stop));
    // Let it make its first call, so it is connected before the burst.
    broker
        .service
        .introspect_secret(&secrecy::SecretString::from("not-a-token"))
        .await
        .expect("served before the burst");

    let (mut raw, _) = RawH2::connect(broker.addr).await;
    // Streams opened and reset at once, as the attack sends them: each HEADERS and its
    // RST_STREAM in one write, all of them before the broker hands a stream to a service.
    // Three times the limit, so the guard trips well inside the burst.
    let sent = 3 * MAX_PENDING_RESETS;
    let burst: Vec<u8> = (0..sent)
        .flat_map(|i| {
            let mut pair = raw.open(stream_id(i));
            pair.extend(frame(RST_STREAM, 0, stream_id(i), &CANCEL.to_be_bytes()));
            pair
        })
        .collect();
    raw.send(&burst).await.expect("burst written");
    let goaway = raw
        .next_frame(|f| f.kind == GOAWAY)
        .await
        .unwrap_or_else(|| panic!("{sent} streams opened and reset, and no GOAWAY"));
    assert_eq!(goaway.error_code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    let last_stream =
        u32::from_be_bytes(goaway.payload[0..4].try_into().expect("4 bytes")) & !(1 << 31);
    // The stream whose reset went one over the limit is the last one the broker processed.
    assert_eq!(last_stream, stream_id(MAX_PENDING_RESETS), "{goaway:?}");
    eprintln!(
        "h2_limits: GOAWAY(ENHANCE_YOUR_CALM), last stream id {last_stream}, after {sent} streams opened and reset"
    );

    // The other connection was served during the burst, and still is.
    let after = broker
        .service
        .introspect_secret(&secrecy::SecretString::from("not-a-token"))
        .await
        .expect("served after the burst");
    assert!(!after.active);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (calls, slowest) = caller.await.expect("caller task");
    assert!(calls > 0, "the well-behaved client made no call");
    eprintln!("h2_limits: the other client made {calls} calls, slowest {slowest:?}");
}

/// Connects with HTTP/2 and returns the connection once the broker's SETTINGS arrive, or
/// `None` when the broker closes it first.
async fn try_connect(
    addr: std::net::SocketAddr,
) -> Option<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>)> {
    let tcp = TcpStream::connect(addr).await.expect("the kernel accepts");
    let (send, connection) = client::handshake(tcp).await.ok()?;
    let connection = tokio::spawn(connection);
    for _ in 0..500 {
        if send.current_max_send_streams() != usize::MAX {
            return Some((send, connection));
        }
        if connection.is_finished() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the broker neither served nor closed the connection");
}

#[tokio::test]
async fn a_connection_over_the_cap_is_closed_and_the_others_are_served() {
    const CAP: usize = 3;
    let broker = TestBroker::spawn_with(|s| {
        s.server.max_connections = CAP;
        s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    // The broker's own clients share one connection, which takes the first slot.
    broker
        .service
        .introspect_secret(&secrecy::SecretString::from("not-a-token"))
        .await
        .expect("served");
    let mut open = Vec::new();
    let mut closed = 0;
    for _ in 0..CAP + 2 {
        match try_connect(broker.addr).await {
            Some(connection) => open.push(connection),
            None => closed += 1,
        }
    }
    assert_eq!(
        open.len(),
        CAP - 1,
        "the connections under the cap are served"
    );
    assert_eq!(closed, 3, "every connection over the cap is closed");
    // The connection that holds a slot is still served.
    broker
        .service
        .introspect_secret(&secrecy::SecretString::from("not-a-token"))
        .await
        .expect("served at the cap");

    let served = open.len();
    // Closing one frees its slot for the next.
    let (send, connection) = open.pop().expect("one open");
    drop(send);
    connection.abort();
    let mut replaced = None;
    let mut refused_while_freeing = 0;
    for _ in 0..50 {
        if let Some(connection) = try_connect(broker.addr).await {
            replaced = Some(connection);
            break;
        }
        refused_while_freeing += 1;
    }
    assert!(replaced.is_some(), "a freed slot is taken again");
    // Every connection closed at the cap is counted, and nothing else (the scrape's own
    // connection goes to the metrics listener, which has no cap).
    let scrape = Scrape::parse(broker.scrape().await);
    assert_eq!(
        scrape.value(r#"tokenbroker_connections_refused_total{cap="connections"}"#),
        f64::from(closed + refused_while_freeing)
    );
    assert_eq!(
        scrape.value(r#"tokenbroker_connections_refused_total{cap="handshakes"}"#),
        0.0
    );
    eprintln!("h2_limits: cap {CAP}: {served} served beside the client, {closed} closed");
}
