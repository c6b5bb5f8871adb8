//! Map keys and values shared by the eBPF programs (`steer-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, has no padding holes the kernel could leave uninitialised,
//! and is `Copy`, so both sides agree on the bytes.
#![no_std]

/// A service address as the eBPF programs see it: an IPv6 address (IPv4 is stored mapped,
/// `::ffff:a.b.c.d`) and a port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ServiceKey {}
