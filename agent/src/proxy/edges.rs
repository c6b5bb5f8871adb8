//! The live page's edges: which version called which, under which release, and with what
//! status. The caller is resolved once per connection (from its pod's address) and counted by
//! number; a route's series are resolved once per worker and caller, so a request builds no
//! label and takes no lock.

use std::{
    cell::RefCell,
    net::IpAddr,
    sync::{Arc, Weak},
};

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;

use super::route::Route;
use crate::{
    metrics::{EdgeSeries, Metrics},
    state::Snapshot,
};

/// Who is at the other end of a client connection.
pub struct Caller {
    /// The pod address of a redirected connection; `None` outside the mesh.
    peer: Option<IpAddr>,
    /// The caller number in the snapshot it was resolved in (`Weak`: a new snapshot can never
    /// be taken for the old one, and the old one is not kept alive).
    resolved: RefCell<(Weak<Snapshot>, u32)>,
}

impl Caller {
    /// A connection from `peer` (`None`: not a pod's redirected call), resolved in `snapshot`.
    pub fn new(peer: Option<IpAddr>, snapshot: &Arc<Snapshot>) -> Caller {
        let id = peer.map_or(0, |ip| snapshot.callers.at(ip));
        Caller {
            peer,
            resolved: RefCell::new((Arc::downgrade(snapshot), id)),
        }
    }

    /// The caller's number in `snapshot` (0: outside the mesh). Resolved again only after the
    /// configuration changed.
    pub fn id(&self, snapshot: &Arc<Snapshot>) -> u32 {
        let Some(peer) = self.peer else {
            return 0;
        };
        let mut resolved = self.resolved.borrow_mut();
        if !std::ptr::eq(resolved.0.as_ptr(), Arc::as_ptr(snapshot)) {
            *resolved = (Arc::downgrade(snapshot), snapshot.callers.at(peer));
        }
        resolved.1
    }
}

/// A route's edges on one worker: one series per caller seen, and the decisions counter of
/// its release.
pub struct Edges {
    by_caller: RefCell<foldhash::HashMap<u32, EdgeSeries>>,
    decisions: Counter,
}

impl Edges {
    pub fn new(metrics: &Metrics, release: Option<&str>) -> Edges {
        Edges {
            by_caller: RefCell::default(),
            decisions: metrics.decisions(release),
        }
    }

    /// Counts a request of `route` (of `snapshot`) from `caller`.
    pub fn observe(
        &self,
        metrics: &Metrics,
        snapshot: &Snapshot,
        route: &Route,
        caller: u32,
        status: StatusCode,
    ) {
        // A request of no release carries no stamp, so every hop decides it again: it is
        // counted where it enters the mesh (from outside) only.
        if route.decided && (route.release.is_some() || caller == 0) {
            self.decisions.inc();
        }
        self.by_caller
            .borrow_mut()
            .entry(caller)
            .or_insert_with(|| {
                let from = snapshot.callers.get(caller).map(|(s, v)| (&**s, &**v));
                metrics.edge_series(
                    from,
                    &route.service.name,
                    &route.version.name,
                    route.release.map(|r| &*r.name),
                )
            })
            .observe(metrics, status);
    }
}
