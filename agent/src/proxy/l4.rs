//! Connections that do not speak HTTP are relayed at L4 to the primary version of the service
//! the client connected to: the rules need headers, so such traffic cannot enter a canary.

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use super::{balance::pick, pool, worker::Worker};

pub async fn relay(worker: &Worker, mut client: TcpStream, service: &Arc<str>) {
    // Resolved up front: a long relay must not keep an old snapshot alive.
    let (address, in_flight) = {
        let snapshot = worker.snapshot();
        let Some(service) = snapshot.service(service) else {
            return;
        };
        let version = service.version_for(None);
        let Some(endpoint) = pick(&version.endpoints, None) else {
            debug!(
                service = &*service.name,
                version = &*version.name,
                "L4: no ready endpoint; closing"
            );
            return;
        };
        (endpoint.address, endpoint.start())
    };
    let Ok(mut upstream) = pool::connect(address).await else {
        debug!(service = &**service, endpoint = %address, "L4: connect failed");
        return;
    };
    debug!(service = &**service, endpoint = %address, "L4 relay");
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    drop(in_flight);
}
