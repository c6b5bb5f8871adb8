//! A tiny TCP client and server for the end-to-end tests, run inside pods.
//!
//! `tcp-tool serve ADDR NAME`: answers every connection with `NAME\n` and closes.
//! `tcp-tool connect ADDR [COUNT]`: connects COUNT times (default 1), one after another; for
//! the last connection prints `peer=<getpeername> said=<what the server sent>`.

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
        _ => Err("usage: tcp-tool serve ADDR NAME | tcp-tool connect ADDR [COUNT]".into()),
    }
}
