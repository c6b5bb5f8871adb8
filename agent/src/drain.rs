//! Graceful shutdown: on SIGTERM the listeners stop accepting, open connections are asked to
//! finish (HTTP/1 after the current response, HTTP/2 with GOAWAY), and the process waits for
//! them up to a grace period.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

/// Held by every listener and connection; `signaled` resolves when draining starts.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    /// Never read: its clones are counted. One per listener and live connection; the trigger
    /// waits for the count to fall back.
    _active: Arc<()>,
}

/// Starts the drain and waits for the connections.
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    active: Arc<()>,
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (signal, receiver) = watch::channel(false);
    let active = Arc::new(());
    (
        DrainTrigger {
            signal,
            active: active.clone(),
        },
        Drain {
            signal: receiver,
            _active: active,
        },
    )
}

impl Drain {
    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&mut self) {
        // An error means the trigger is gone: treat that as a drain too.
        let _ = self.signal.wait_for(|draining| *draining).await;
    }
}

impl DrainTrigger {
    /// Signals every holder and waits until all have let go (listeners stop at once,
    /// connections when done) or the grace period ends. Returns whether all finished in time.
    pub async fn drain(self, grace: Duration) -> bool {
        let _ = self.signal.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while Arc::strong_count(&self.active) > 1 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}
