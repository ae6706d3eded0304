//! Watch caches laid out for their lookups (the pod and EndpointSlice caches),
//! where a reflector store would only hand out every object.
//!
//! [`reflect_indexed`] feeds an [`Index`] from a watch as a reflector feeds a
//! store: a relist is built aside and swapped in when complete, so lookups
//! never see half a list; the cache says when its first list is in.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use futures::{Stream, StreamExt};
use kube::runtime::{watcher, WatchStreamExt};

use crate::metrics::{KindLabels, Metrics};

/// A cache's layout: how watched objects are filed and found.
pub trait Index: Default + Send + Sync + 'static {
    /// The watched object.
    type Object: Clone + Send + 'static;
    /// Its kind, for logs and metrics.
    const KIND: &'static str;

    /// Drop from a watched object what neither the cache nor the changes'
    /// consumers read.
    fn prepare(object: &mut Self::Object);
    /// File `object`, replacing the version before. False when nothing the
    /// cache keeps of it changed: the watch event is then not passed on.
    fn insert(&mut self, object: Self::Object) -> bool;
    /// Forget `object`.
    fn remove(&mut self, object: &Self::Object);
    /// How many objects are filed.
    fn len(&self) -> usize;
    /// After every watch event (housekeeping that can wait).
    fn changed(&mut self) {}
    /// After a full list was swapped in.
    fn relisted(&mut self) {}
}

/// Read access to a cache of layout `I`. Cheap to clone.
pub struct Indexed<I> {
    index: Arc<RwLock<I>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<I> Clone for Indexed<I> {
    fn clone(&self) -> Self {
        Indexed { index: self.index.clone(), ready: self.ready.clone() }
    }
}

/// A cache's writer went away before its first full list.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} watch stopped before its first full list")]
pub struct WatchStopped {
    /// The kind watched.
    pub kind: &'static str,
}

impl<I: Index> Indexed<I> {
    /// The cache, read-locked (watch updates wait meanwhile). A lock poisoned
    /// by a panic elsewhere is used as is: every update leaves it consistent.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, I> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no object is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first full list is in.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Wait for the first full list.
    pub async fn wait_until_ready(&self) -> Result<(), WatchStopped> {
        let mut ready = self.ready.clone();
        ready.wait_for(|r| *r).await.map(|_| ()).map_err(|_| WatchStopped { kind: I::KIND })
    }
}

/// The cache fed by `stream`, and the objects that changed (applied or deleted
/// as `Some`, a completed relist as `None`), as [`super::reflect`] gives them
/// for kinds cached in a reflector store; an update that changes nothing the
/// cache keeps (a pod's status, but not its readiness) is not passed on.
pub fn reflect_indexed<I: Index>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<I::Object>>> + Send + 'static,
    metrics: Arc<Metrics>,
) -> (Indexed<I>, impl Stream<Item = Option<I::Object>> + Send) {
    let index = Arc::new(RwLock::new(I::default()));
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let cache = Indexed { index: index.clone(), ready };
    let gauge = metrics.watched_objects.get_or_create(&KindLabels { kind: I::KIND.into() }).clone();
    let mut relist: Option<I> = None;
    let stream = stream.default_backoff().filter_map(move |event| {
        let change = match event {
            Ok(event) => {
                let mut index = index.write().unwrap_or_else(|p| p.into_inner());
                let change = match event {
                    watcher::Event::Init => {
                        relist = Some(I::default());
                        None
                    }
                    watcher::Event::InitApply(mut object) => {
                        I::prepare(&mut object);
                        let _ = relist.get_or_insert_with(I::default).insert(object);
                        None
                    }
                    watcher::Event::InitDone => {
                        if let Some(fresh) = relist.take() {
                            *index = fresh;
                        }
                        index.relisted();
                        Metrics::count(&metrics.watch_lists, I::KIND, 1);
                        ready_tx.send_replace(true);
                        Some(None)
                    }
                    watcher::Event::Apply(mut object) => {
                        I::prepare(&mut object);
                        index.insert(object.clone()).then_some(Some(object))
                    }
                    watcher::Event::Delete(mut object) => {
                        I::prepare(&mut object);
                        index.remove(&object);
                        Some(Some(object))
                    }
                };
                index.changed();
                gauge.set(index.len() as i64);
                change
            }
            Err(error) => {
                tracing::warn!(kind = I::KIND, %error, "watch failed; retrying with backoff");
                Metrics::count(&metrics.watch_errors, I::KIND, 1);
                None
            }
        };
        async move { change }
    });
    (cache, stream)
}
