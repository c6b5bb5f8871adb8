//! Map keys and values shared by the eBPF programs (`steer-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding, so both sides agree on every byte and the
//! kernel never hashes uninitialised padding.
#![no_std]

/// A TCP endpoint: an IPv6 address (IPv4 stored mapped, `::ffff:a.b.c.d`, so one map serves
/// both families) in network byte order, and a port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

impl SockKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        SockKey {
            addr,
            port,
            _pad: [0; 2],
        }
    }

    /// An IPv4 address (network byte order) as its IPv4-mapped IPv6 form.
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        let [a, b, c, d] = addr;
        SockKey::new([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d], port)
    }

    /// The IPv4 address when this is an IPv4-mapped address.
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let [a, b, c, d] = [self.addr[12], self.addr[13], self.addr[14], self.addr[15]];
        let mapped = self.addr[..10].iter().all(|&x| x == 0)
            && self.addr[10] == 0xff
            && self.addr[11] == 0xff;
        mapped.then_some([a, b, c, d])
    }
}

/// Where the agent's proxy listens, and which network namespace is the host's (never
/// redirected: the proxy and node processes live there). One entry, index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    pub host_netns_cookie: u64,
    pub proxy_v4: [u8; 4],
    pub proxy_v4_port: u16,
    /// 1 when `proxy_v6` is set; real IPv6 services are only redirected then.
    pub has_v6: u8,
    /// 1 when `proxy_v4` is set; IPv4 (and IPv4-mapped) services are only redirected then.
    pub has_v4: u8,
    pub proxy_v6: [u8; 16],
    pub proxy_v6_port: u16,
    pub _pad2: [u8; 6],
}

/// Map names, shared so the agent finds what the programs define.
pub mod maps {
    /// `SockKey` (service address) -> 1: the mesh services whose connections are redirected.
    pub const SERVICES: &str = "SERVICES";
    /// Index 0 -> `ProxyConfig`.
    pub const CONFIG: &str = "CONFIG";
    /// cgroup v2 id -> 1: pods (cgroups, and everything below them) that opted out.
    pub const OPT_OUT: &str = "OPT_OUT";
    /// Socket cookie -> original destination, from connect until the socket closes.
    pub const BY_COOKIE: &str = "BY_COOKIE";
    /// Client (ip, port) -> original destination, until the proxy takes it or the socket closes.
    pub const BY_CLIENT: &str = "BY_CLIENT";
}

/// Capacity of the redirect records (LRU maps: they can never grow past this).
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Capacity of the service and opt-out sets.
pub const MAX_SERVICES: u32 = 16_384;
pub const MAX_OPT_OUT: u32 = 4_096;

#[cfg(feature = "user")]
unsafe impl aya::Pod for SockKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProxyConfig {}
