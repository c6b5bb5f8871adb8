//! The parts played inside the pods: the upstream service and the load generators.
//!
//! Every load generator prints one JSON answer on stdout; latencies are in nanoseconds.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the client sends: a tagged request, so steer evaluates its rules as for real traffic.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: bench\r\nuser-agent: proxy-bench\r\n\
x-device: ios\r\nx-user-id: 42\r\n\r\n";
const BODY: &str = "hello from the bench upstream\n";
/// Sent but not measured at the start of every run: connections and pools warm up.
pub const WARM_UP: Duration = Duration::from_secs(1);
/// A request not answered by then failed (a proxy at its connection limit leaves new
/// connections unanswered in its listen backlog).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections being opened at once: a thousand SYNs at a time would overflow the proxies'
/// listen backlogs and time the kernel's SYN retries instead of the proxies.
const OPENING_AT_ONCE: usize = 64;

/// A runtime with one worker per CPU this process may run on (taskset decides).
fn runtime() -> Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

/// This process's file descriptor limits.
fn fd_limit() -> Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    Ok(limit)
}

/// Lets this process open `fds` file descriptors: raises the soft limit, up to the hard one
/// (raising that needs CAP_SYS_RESOURCE, which containers often lack).
fn raise_fd_limit(fds: u64) -> Result<()> {
    let mut limit = fd_limit()?;
    if limit.rlim_cur >= fds {
        return Ok(());
    }
    ensure!(
        limit.rlim_max >= fds,
        "{fds} file descriptors needed, the hard limit (ulimit -Hn) is {}",
        limit.rlim_max
    );
    limit.rlim_cur = fds;
    ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0,
        "raise RLIMIT_NOFILE to {fds}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// File descriptors of a client: its connections and some.
fn client_fds(connections: usize) -> u64 {
    connections as u64 + 256
}

pub fn upstream(listen: SocketAddr) -> Result<()> {
    use http_body_util::Full;
    use hyper::{Response, service::service_fn};
    use hyper_util::rt::TokioIo;
    // Every proxy may open an upstream connection per client connection.
    raise_fd_limit(fd_limit()?.rlim_max)?;
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen}"))?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "text/plain")
                            .body(Full::new(bytes::Bytes::from_static(BODY.as_bytes())))
                            .expect("valid response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status and length of the complete response at the start of `buf`; `None` while more
/// bytes are needed. Content-Length and chunked bodies.
fn response_len(buf: &[u8]) -> Result<Option<(u16, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let (mut length, mut chunked) = (None, false);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>()?);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let mut at = head_end + 4;
    if chunked {
        loop {
            let Some(end) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            let size = std::str::from_utf8(&buf[at..at + end])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
            at += end + 2;
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    let Some(end) = find(&buf[at..], b"\r\n") else {
                        return Ok(None);
                    };
                    at += end + 2;
                    if end == 0 {
                        return Ok(Some((status, at)));
                    }
                }
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            at += size + 2;
        }
    }
    let length = match length {
        Some(length) => length,
        None if matches!(status, 204 | 304) => 0,
        None => bail!("a response without a length cannot be kept alive: {head:?}"),
    };
    Ok((buf.len() >= at + length).then_some((status, at + length)))
}

/// Takes the complete response off the front of `buf`, if there is one; it must be a 200.
fn take_response(buf: &mut Vec<u8>) -> Result<bool> {
    match response_len(buf)? {
        None => Ok(false),
        Some((status, len)) => {
            buf.drain(..len);
            ensure!(status == 200, "answered {status}");
            Ok(true)
        }
    }
}

/// A blocking keep-alive HTTP/1.1 connection.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    fn open(target: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .with_context(|| format!("connect to {target}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn request(&mut self) -> Result<()> {
        self.stream.write_all(REQUEST)?;
        let mut chunk = [0u8; 8192];
        while !take_response(&mut self.buf)? {
            let n = self.stream.read(&mut chunk)?;
            ensure!(n > 0, "the connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}

/// Sends `total` requests over `connections` keep-alive connections, one at a time each, in
/// turn: a fixed load, for counting what it costs.
pub fn requests(target: SocketAddr, total: usize, connections: usize) -> Result<()> {
    let mut open: Vec<Connection> = (0..connections)
        .map(|_| Connection::open(target))
        .collect::<Result<_>>()?;
    for i in 0..total {
        open[i % connections].request()?;
    }
    Ok(())
}

/// Retries one request to `target` until it answers 200 (at most 10 s).
pub fn check(target: SocketAddr) -> Result<()> {
    let started = Instant::now();
    loop {
        match Connection::open(target).and_then(|mut c| c.request()) {
            Ok(()) => return Ok(()),
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(err.context(format!("{target} does not answer"))),
        }
    }
}

/// Sleeps until `deadline` and spins its last few microseconds: a thread's sleep alone ends
/// tens of microseconds late, which would add to every latency.
fn wait_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(60);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Open loop. Connection `c` of `k` sends requests c, c+k, c+2k, ... each at its scheduled
/// time, or at once when the previous answer came after it: then the wait counts in that
/// request's latency, as it would for a caller who cannot wait for the proxy to catch up.
/// Answers the latencies of the measured seconds (from each request's scheduled send time),
/// and every answered request, warm-up included.
pub fn open_loop(target: SocketAddr, rate: u64, seconds: u64, connections: usize) -> Result<()> {
    ensure!(
        rate > 0 && connections > 0,
        "rate and connections must be > 0"
    );
    // Sleeps end when asked, not up to 50 µs later (the default timer slack).
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let opened: Vec<Connection> = (0..connections)
        .map(|_| Connection::open(target))
        .collect::<Result<_>>()?;
    let start = Instant::now() + Duration::from_millis(50);
    let measured_from = start + WARM_UP;
    let end = measured_from + Duration::from_secs(seconds);
    let (answered, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = opened
        .into_iter()
        .enumerate()
        .map(|(c, connection)| {
            let (answered, errors) = (answered.clone(), errors.clone());
            std::thread::spawn(move || {
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
                let mut connection = Some(connection);
                let mut latencies = Vec::new();
                for i in (c as u32..).step_by(connections) {
                    let scheduled = start + period * i;
                    if scheduled >= end {
                        break;
                    }
                    wait_until(scheduled);
                    let result = match connection.as_mut() {
                        Some(open) => open.request(),
                        None => Connection::open(target).and_then(|mut open| {
                            let result = open.request();
                            connection = Some(open);
                            result
                        }),
                    };
                    let done = Instant::now();
                    if result.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        connection = None;
                        continue;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                    if scheduled >= measured_from {
                        latencies.push((done - scheduled).as_nanos() as u64);
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().expect("latency thread"));
    }
    println!(
        "{}",
        json!({
            "latencies_ns": latencies,
            "requests": answered.load(Ordering::Relaxed),
            "errors": errors.load(Ordering::Relaxed),
        })
    );
    Ok(())
}

async fn connect(target: SocketAddr) -> Result<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .context("connect timed out")??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request and its complete answer, which must be a 200, within `ANSWER_TIMEOUT`.
async fn exchange(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let exchange = async {
        stream.write_all(REQUEST).await?;
        while !take_response(buf)? {
            ensure!(stream.read_buf(buf).await? > 0, "the connection closed");
        }
        Ok(())
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))?
}

/// Closed loop: every connection sends its next request as soon as the answer is in. All
/// connections are open before the clock starts. Answers the latencies (send to complete
/// answer) of the requests answered in the measured seconds, and every answered request.
pub fn closed_loop(target: SocketAddr, seconds: u64, connections: usize) -> Result<()> {
    raise_fd_limit(client_fds(connections))?;
    runtime()?.block_on(async move {
        let errors = Arc::new(AtomicU64::new(0));
        let opened: Vec<Option<tokio::net::TcpStream>> = futures::stream::iter(0..connections)
            .map(|_| connect(target))
            .buffer_unordered(OPENING_AT_ONCE)
            .map(|opened| {
                opened
                    .inspect_err(|_| {
                        errors.fetch_add(1, Ordering::Relaxed);
                    })
                    .ok()
            })
            .collect()
            .await;
        let start = Instant::now() + Duration::from_millis(100);
        let measured_from = start + WARM_UP / 2;
        let end = measured_from + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for mut stream in opened {
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                let (mut latencies, mut answered) = (Vec::new(), 0u64);
                let mut buf = Vec::with_capacity(4096);
                while Instant::now() < end {
                    let Some(open) = stream.as_mut() else {
                        match connect(target).await {
                            Ok(open) => stream = Some(open),
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        continue;
                    };
                    let sent = Instant::now();
                    if exchange(open, &mut buf).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        (stream, buf) = (None, Vec::with_capacity(4096));
                        continue;
                    }
                    answered += 1;
                    let done = Instant::now();
                    if done >= measured_from && done < end {
                        latencies.push((done - sent).as_nanos() as u64);
                    }
                }
                (latencies, answered)
            }));
        }
        let (mut latencies, mut answered) = (Vec::new(), 0);
        for task in tasks {
            let (some, count) = task.await?;
            latencies.extend(some);
            answered += count;
        }
        println!(
            "{}",
            json!({
                "latencies_ns": latencies,
                "requests": answered,
                "errors": errors.load(Ordering::Relaxed),
            })
        );
        Ok(())
    })
}

/// Opens `connections` keep-alive connections, each sends one request, then they stay open and
/// idle. Prints a line when they are all open (how many, and the first failure) and another,
/// when stdin has closed, with how many of them the proxy had closed meanwhile; then closes them.
pub fn hold(target: SocketAddr, connections: usize) -> Result<()> {
    raise_fd_limit(client_fds(connections))?;
    runtime()?.block_on(async move {
        let opened: Vec<Result<tokio::net::TcpStream>> = futures::stream::iter(0..connections)
            .map(|_| async move {
                let mut stream = connect(target).await?;
                exchange(&mut stream, &mut Vec::with_capacity(512)).await?;
                Ok(stream)
            })
            .buffer_unordered(OPENING_AT_ONCE)
            .collect()
            .await;
        let first_error = opened
            .iter()
            .find_map(|o| o.as_ref().err())
            .map(|e| format!("{e:#}"));
        let held: Vec<_> = opened.into_iter().flatten().collect();
        println!(
            "{}",
            json!({
                "held": held.len(),
                "errors": connections - held.len(),
                "first_error": first_error,
            })
        );
        std::io::stdout().flush()?;
        tokio::io::stdin().read_to_end(&mut Vec::new()).await?;
        // An open idle connection has nothing to read; a closed one reads its end.
        let closed = held
            .iter()
            .filter(|s| {
                !matches!(s.try_read(&mut [0; 1]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        println!("{}", json!({ "closed_by_proxy": closed }));
        Ok(())
    })
}
