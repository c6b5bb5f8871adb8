//! steer's eBPF programs, attached at a cgroup v2 directory (the root in production).
//!
//! - `connect4`/`connect6`: a pod's TCP connect to a mesh service address goes to the node
//!   proxy instead; the original destination is recorded by socket cookie.
//! - `sock_ops`: once established, the record is also keyed by the client's (ip, port), which
//!   is what the proxy sees as the peer on accept; records go when the socket closes.
//! - `getpeername4`/`getpeername6`: the application still sees the service address.
//!
//! Sockets in the host's network namespace (the proxy itself, node daemons) and opted-out pods
//! are never redirected. Every program returns 1 (allow): steer never blocks a connection.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_addr},
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use steer_common::{MAX_CONNECTIONS, MAX_OPT_OUT, MAX_SERVICES, ProxyConfig, SockKey};

#[map]
static SERVICES: HashMap<SockKey, u8> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static CONFIG: Array<ProxyConfig> = Array::with_max_entries(1, 0);
#[map]
static OPT_OUT: HashMap<u64, u8> = HashMap::with_max_entries(MAX_OPT_OUT, 0);
#[map]
static BY_COOKIE: LruHashMap<u64, SockKey> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static BY_CLIENT: LruHashMap<SockKey, SockKey> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_TCP_CLOSE: u32 = 7;
/// cgroup levels checked for an opt-out (a pod's cgroup and the containers below it).
const MAX_CGROUP_DEPTH: i32 = 16;

/// The proxy config when the calling socket belongs to a pod that takes part in the mesh.
fn mesh_pod(ctx: &SockAddrContext) -> Option<&'static ProxyConfig> {
    let config = CONFIG.get(0)?;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == config.host_netns_cookie {
        return None;
    }
    for level in 0..MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if unsafe { OPT_OUT.get(&id) }.is_some() {
            return None;
        }
    }
    Some(config)
}

/// Records the original destination; only a recorded connection may be redirected, so a full
/// map means "not redirected" (fail open), never a connection the proxy cannot place.
fn record(ctx: &SockAddrContext, original: &SockKey) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match BY_COOKIE.insert(&cookie, original, 0) {
        Ok(()) => true,
        Err(err) => {
            warn!(ctx, "steer: cannot record a redirect ({}): left alone", err);
            false
        }
    }
}

fn ipv6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    bytes
}

fn ipv6_words(bytes: &[u8; 16]) -> [u32; 4] {
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
    }
    words
}

/// The port of a sock_addr context (network byte order in the low 16 bits) in host order.
fn port_of(addr: &bpf_sock_addr) -> u16 {
    u16::from_be(addr.user_port as u16)
}

fn network_port(port: u16) -> u32 {
    u32::from(port.to_be())
}

#[cgroup_sock_addr(connect4)]
pub fn steer_connect4(ctx: SockAddrContext) -> i32 {
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return 1;
    }
    let original = SockKey::v4(addr.user_ip4.to_ne_bytes(), port_of(addr));
    if unsafe { SERVICES.get(&original) }.is_none() {
        return 1;
    }
    if let Some(config) = mesh_pod(&ctx)
        && config.has_v4 == 1
        && record(&ctx, &original)
    {
        addr.user_ip4 = u32::from_ne_bytes(config.proxy_v4);
        addr.user_port = network_port(config.proxy_v4_port);
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn steer_connect6(ctx: SockAddrContext) -> i32 {
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return 1;
    }
    let original = SockKey::new(ipv6_bytes(addr.user_ip6), port_of(addr));
    if unsafe { SERVICES.get(&original) }.is_none() {
        return 1;
    }
    let Some(config) = mesh_pod(&ctx) else {
        return 1;
    };
    // An IPv4-mapped service goes to the IPv4 listener, mapped; real IPv6 to the IPv6 one.
    let (proxy, port) = if original.as_v4().is_some() {
        if config.has_v4 == 0 {
            return 1;
        }
        (SockKey::v4(config.proxy_v4, 0).addr, config.proxy_v4_port)
    } else if config.has_v6 == 1 {
        (config.proxy_v6, config.proxy_v6_port)
    } else {
        return 1;
    };
    if record(&ctx, &original) {
        addr.user_ip6 = ipv6_words(&proxy);
        addr.user_port = network_port(port);
    }
    1
}

/// The original destination of the calling socket, if it was redirected.
fn original_of(ctx: &SockAddrContext) -> Option<&'static SockKey> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { BY_COOKIE.get(&cookie) }
}

#[cgroup_sock_addr(getpeername4)]
pub fn steer_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_of(&ctx)
        && let Some(ip) = original.as_v4()
    {
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip4 = u32::from_ne_bytes(ip);
        addr.user_port = network_port(original.port);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn steer_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_of(&ctx) {
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip6 = ipv6_words(&original.addr);
        addr.user_port = network_port(original.port);
    }
    1
}

/// The local (client) end of a socket, as the proxy sees its peer.
fn client_of(ctx: &SockOpsContext) -> SockKey {
    // local_port is in host byte order in sock_ops (unlike sock_addr).
    let port = ctx.local_port() as u16;
    if ctx.family() == AF_INET {
        SockKey::v4(ctx.local_ip4().to_ne_bytes(), port)
    } else {
        SockKey::new(ipv6_bytes(ctx.local_ip6()), port)
    }
}

#[sock_ops]
pub fn steer_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(original) = unsafe { BY_COOKIE.get(&cookie) } {
                let original = *original;
                if BY_CLIENT.insert(&client_of(&ctx), &original, 0).is_err() {
                    warn!(&ctx, "steer: cannot record a redirected client");
                }
                // Ask for state changes so the records go when the socket closes.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if unsafe { BY_COOKIE.get(&cookie) }.is_some() {
                let _ = BY_COOKIE.remove(&cookie);
                let _ = BY_CLIENT.remove(&client_of(&ctx));
            }
        }
        _ => {}
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
