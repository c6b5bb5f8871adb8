//! The objects of one watched kind, kept in step with the API server and replaced in place when
//! the watch lists them again.
//!
//! kube's reflector store collects a whole re-list (after a `410 Gone`, or a reconnect) into a
//! second map beside the one it replaces, so at 10,000 CanaryReleases every object is held twice
//! until the list ends. Here each listed object replaces its previous version as it arrives
//! (the old one is dropped at once, unless a reader still holds it), and the objects the list
//! did not bring are dropped when it ends: a re-list costs a page of the list beyond the store,
//! not a second store. Readers may see a store half re-listed; every object in it is still some
//! version the API server had, as between two watch events.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use kube::{ResourceExt, runtime::watcher::Event};
use tokio::sync::watch;

/// (namespace, name).
type Key = (Option<String>, String);

struct Inner<K> {
    /// Each object with the number of the list that last brought it (or of the list in
    /// progress when a watch event did).
    objects: HashMap<Key, (Arc<K>, u64)>,
    /// The number of the list in progress or last completed.
    list: u64,
}

/// The read side: cheap to clone.
pub struct Cache<K> {
    inner: Arc<RwLock<Inner<K>>>,
    ready: watch::Receiver<bool>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
            ready: self.ready.clone(),
        }
    }
}

/// The write side, fed with the watcher's events; dropping it ends `wait_until_ready`.
pub struct CacheWriter<K> {
    inner: Arc<RwLock<Inner<K>>>,
    ready: watch::Sender<bool>,
}

pub fn cache<K>() -> (Cache<K>, CacheWriter<K>) {
    let inner = Arc::new(RwLock::new(Inner {
        objects: HashMap::new(),
        list: 0,
    }));
    let (ready_tx, ready_rx) = watch::channel(false);
    (
        Cache {
            inner: inner.clone(),
            ready: ready_rx,
        },
        CacheWriter {
            inner,
            ready: ready_tx,
        },
    )
}

fn key_of<K: ResourceExt>(object: &K) -> Key {
    (object.namespace(), object.name_any())
}

impl<K: ResourceExt> Cache<K> {
    /// Every object, in no particular order.
    pub fn state(&self) -> Vec<Arc<K>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.objects.values().map(|(o, _)| o.clone()).collect()
    }

    pub fn len(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the first complete list; an error when the watch ended before it.
    pub async fn wait_until_ready(&self) -> Result<(), watch::error::RecvError> {
        let mut ready = self.ready.clone();
        ready.wait_for(|ready| *ready).await.map(|_| ())
    }
}

impl<K: ResourceExt> CacheWriter<K> {
    /// Applies one watcher event; true when the store's contents are settled and changed (a
    /// list in progress is told once, when it ends).
    pub fn apply(&self, event: Event<K>) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let list = inner.list;
        match event {
            Event::Apply(object) => {
                inner
                    .objects
                    .insert(key_of(&object), (Arc::new(object), list));
                true
            }
            Event::Delete(object) => {
                inner.objects.remove(&key_of(&object));
                true
            }
            Event::Init => {
                inner.list += 1;
                false
            }
            Event::InitApply(object) => {
                inner
                    .objects
                    .insert(key_of(&object), (Arc::new(object), list));
                false
            }
            Event::InitDone => {
                inner.objects.retain(|_, (_, seen)| *seen == list);
                inner.objects.shrink_to_fit();
                drop(inner);
                self.ready.send_replace(true);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    fn map(name: &str, value: &str) -> ConfigMap {
        let mut map = ConfigMap::default();
        map.metadata.name = Some(name.into());
        map.metadata.namespace = Some("ns".into());
        map.data = Some([("v".to_string(), value.to_string())].into());
        map
    }

    fn contents(cache: &Cache<ConfigMap>) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = cache
            .state()
            .iter()
            .map(|m| (m.name_any(), m.data.as_ref().unwrap()["v"].clone()))
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn a_relist_replaces_in_place_and_drops_what_it_did_not_bring() {
        let (cache, writer) = cache::<ConfigMap>();
        assert!(!writer.apply(Event::Init));
        assert!(!writer.apply(Event::InitApply(map("a", "1"))));
        assert!(!writer.apply(Event::InitApply(map("b", "1"))));
        assert!(writer.apply(Event::InitDone));
        cache.wait_until_ready().await.unwrap();
        assert!(writer.apply(Event::Apply(map("c", "1"))));
        assert_eq!(contents(&cache).len(), 3);

        // Re-listed: `a` changed, `b` is gone, `c` came after the list began and stays.
        let held = cache.state();
        assert!(!writer.apply(Event::Init));
        assert!(!writer.apply(Event::InitApply(map("a", "2"))));
        assert_eq!(cache.len(), 3, "replaced in place, not buffered beside");
        assert!(!writer.apply(Event::InitApply(map("c", "1"))));
        assert!(writer.apply(Event::InitDone));
        assert_eq!(
            contents(&cache),
            vec![("a".into(), "2".into()), ("c".into(), "1".into())]
        );
        drop(held);
        assert!(writer.apply(Event::Delete(map("a", "2"))));
        assert_eq!(contents(&cache), vec![("c".into(), "1".into())]);
    }

    #[tokio::test]
    async fn a_watch_that_ends_before_its_first_list_is_an_error() {
        let (cache, writer) = cache::<ConfigMap>();
        drop(writer);
        assert!(cache.wait_until_ready().await.is_err());
    }
}
