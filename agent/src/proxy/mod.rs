//! The node proxy: where redirected pod connections (and the gateway's north-south traffic)
//! arrive. Each request is scheduled to at most one canary release, decided once and stamped,
//! and sent to the version of the destination service that belongs to that release, or to the
//! primary version; never to another version.
//!
//! Thread per core: each worker is a single-threaded runtime with its own `SO_REUSEPORT`
//! listeners and its own upstream pool, and a client connection lives on one worker from
//! accept to close. A request's whole exchange (client, routing decision, upstream) runs in the
//! task of its client connection: no hand-off between tasks or threads on the request path.
//!
//! - `worker`: threads, listeners, accepting, serving a client connection (HTTP/1, h2c, L4);
//! - `route`: the routing decision, a pure function of the snapshot and the request;
//! - `forward`: the request path around it (stamp, headers, upstream, metrics);
//! - `pool`, `body`: upstream connections and the response bodies that drive them;
//! - `error`: the one error type of the request path and the one place it becomes a response;
//! - `stamp`: the signed decision stamp; `edges`: who called whom, for the live page;
//! - `headers`, `balance`, `l4`: hop-by-hop rules, picking an endpoint, the TCP relay.

mod balance;
mod body;
mod edges;
mod error;
mod forward;
pub mod h1;
mod headers;
mod l4;
mod pool;
mod route;
pub mod stamp;
mod worker;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::{metrics::Metrics, state::Snapshot};

pub use worker::{WorkerListeners, Workers, bind_listener};

/// Recovers the service address a redirected client connected to (the eBPF datapath).
pub trait OriginalDestination: Send + Sync {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr>;
}

impl OriginalDestination for crate::datapath::OriginalDestinations {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        crate::datapath::OriginalDestinations::take(self, client)
    }
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Redirected pod connections: inside the mesh, stamps are honoured.
    Redirect,
    /// North-south entry: stamps are stripped and the rules decide.
    Gateway,
}

/// Request headers larger than this are refused with 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What every worker shares: the snapshot in force, the datapath's original destinations, the
/// metrics and the limits on client connections.
pub struct Shared {
    pub state: Arc<ArcSwap<Snapshot>>,
    pub originals: Option<Arc<dyn OriginalDestination>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Debug response headers for clients outside the mesh too (they name internal services,
    /// versions and releases).
    pub outside_debug_headers: bool,
    /// What stamps are signed and verified with.
    pub stamp_keys: stamp::StampKeys,
    /// Client connections open on all workers.
    pub open_connections: AtomicUsize,
    /// The most open since freed memory was last handed back.
    pub peak_connections: AtomicUsize,
}

/// Bounds on what clients can hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Client connections beyond this are closed at once (and counted) rather than let run the
    /// node out of file descriptors.
    pub max_connections: usize,
    /// An HTTP/1 client connection that has not sent a whole request head this long after
    /// the previous response (or after connecting) is closed: idle keep-alive connections and
    /// slow senders alike. So is an HTTP/2 one without a request this long (after GOAWAY).
    pub idle_timeout: Duration,
    /// The longest silence of an upstream in the middle of an HTTP/1 response body.
    pub upstream_read_timeout: Duration,
}

/// Runs hyper's background futures (HTTP/2 streams and connections) as tasks of the current
/// worker: they stay on its thread and need not be `Send`.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}
