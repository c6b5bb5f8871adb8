//! Leader election over a `coordination.k8s.io` Lease, so that of all the agents of a cluster
//! one writes the CanaryReleases' status. Every agent routes; only the status has one writer.
//!
//! The holder renews every `RENEW`; a lease not renewed for `LEASE` seconds is free to take.
//! Every write carries the resourceVersion read, so two agents never both win a round.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use tracing::{info, warn};

const LEASE_SECONDS: i32 = 15;
const RENEW: Duration = Duration::from_secs(5);
pub const LEASE_NAME: &str = "steer-status-writer";

pub struct Elector {
    api: Api<Lease>,
    identity: String,
    pub leading: Arc<AtomicBool>,
    /// Woken when this agent becomes the writer, so it writes the statuses at once.
    on_lead: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        identity: String,
        on_lead: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            identity,
            leading: Arc::default(),
            on_lead,
            metrics,
        }
    }

    /// Campaigns and renews until the task is stopped.
    pub async fn run(self: Arc<Self>) {
        loop {
            let leading = match self.round().await {
                Ok(leading) => leading,
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "leader election: cannot reach the lease");
                    false
                }
            };
            if leading != self.leading.swap(leading, Ordering::Relaxed) {
                info!(identity = %self.identity, leading, "status writer changed");
                self.metrics.status_writer(leading);
                if leading {
                    self.on_lead.notify_one();
                }
            }
            tokio::time::sleep(RENEW).await;
        }
    }

    /// One round: take the lease if it is free or ours, report whether we hold it.
    async fn round(&self) -> Result<bool> {
        let now = MicroTime(jiff::Timestamp::now());
        let Some(mut lease) = self
            .api
            .get_opt(LEASE_NAME)
            .await
            .context("reading the lease")?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return won(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|renewed| renewed.0 + jiff::SignedDuration::from_secs(duration) < now.0);
        let released = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !ours && !expired && !released {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(LEASE_SECONDS);
        spec.renew_time = Some(now);
        let name = lease.name_any();
        won(self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await)
    }
}

impl Elector {
    /// Gives the lease up, so that another agent writes status at once rather than after the
    /// lease expires (an agent going away in a rolling update).
    pub async fn release(&self) -> Result<()> {
        if !self.leading.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        self.metrics.status_writer(false);
        let mut lease = self
            .api
            .get(LEASE_NAME)
            .await
            .context("reading the lease")?;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
            .context("releasing the lease")?;
        info!(identity = %self.identity, "status writer lease released");
        Ok(())
    }
}

/// A create or replace that lost a race (409) means another agent holds the lease.
fn won(result: kube::Result<Lease>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err).context("writing the lease"),
    }
}
