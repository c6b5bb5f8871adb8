//! A tiny TCP client and server for the end-to-end tests, run inside pods.
//!
//! `tcp-tool serve ADDR NAME`: answers every connection with `NAME\n` and closes.
//! `tcp-tool connect ADDR [COUNT]`: connects COUNT times (default 1), one after another; for
//! the last connection prints `peer=<getpeername> said=<what the server sent>`.
//! `tcp-tool trickle ADDR PREFIX`: sends PREFIX, then a byte every 200 ms, until the server
//! closes (prints `closed`) or 40 s went by (prints `kept`).
//! `tcp-tool bench ADDR|local COUNT`: connects and closes COUNT times; prints the median ns
//! per connect (`local`: to a listener of its own on loopback).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", addr, name] => {
            let listener = TcpListener::bind(addr.parse::<SocketAddr>()?)?;
            for stream in listener.incoming() {
                let mut stream = stream?;
                let _ = stream.write_all(format!("{name}\n").as_bytes());
            }
            Ok(())
        }
        ["connect", addr, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let count: usize = rest.first().map_or(Ok(1), |c| c.parse())?;
            let mut last = String::new();
            for _ in 0..count {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                let peer = stream.peer_addr()?;
                let mut said = String::new();
                stream.read_to_string(&mut said)?;
                last = format!("peer={peer} said={}", said.trim());
            }
            println!("{last}");
            Ok(())
        }
        ["trickle", addr, prefix] => {
            let mut stream = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(3))?;
            stream.write_all(prefix.as_bytes())?;
            stream.set_read_timeout(Some(Duration::from_millis(200)))?;
            let began = std::time::Instant::now();
            let mut buf = [0u8; 1024];
            let outcome = loop {
                if began.elapsed() > Duration::from_secs(40) {
                    break "kept";
                }
                match stream.read(&mut buf) {
                    Ok(0) => break "closed",
                    Ok(_) => continue,
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break "closed",
                    Err(_) => {}
                }
                if stream.write_all(b"a").is_err() {
                    break "closed";
                }
            };
            println!("{outcome}");
            Ok(())
        }
        ["bench", addr, count] => {
            // `local`: a listener of our own that accepts as fast as we connect, so the figure
            // is the connect path and not a slow server's backlog.
            let addr: SocketAddr = if *addr == "local" {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let addr = listener.local_addr()?;
                std::thread::spawn(move || for _ in listener.incoming() {});
                addr
            } else {
                addr.parse()?
            };
            let count: usize = count.parse()?;
            let mut took = Vec::with_capacity(count);
            for _ in 0..count {
                let started = std::time::Instant::now();
                let stream = TcpStream::connect(addr)?;
                took.push(started.elapsed().as_nanos());
                reset_on_close(&stream);
            }
            // The median: a rare SYN retransmission (a full second) must not swamp the figure.
            took.sort_unstable();
            println!("{}", took[count / 2]);
            Ok(())
        }
        _ => Err("usage: tcp-tool serve ADDR NAME | tcp-tool connect ADDR [COUNT] | tcp-tool trickle ADDR PREFIX | tcp-tool bench ADDR COUNT".into()),
    }
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT socket is left behind, so thousands of
/// connects in a row never run out of ports and measure only the connect path.
fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
