//! One async mutex per key, created on demand and dropped when nobody holds or waits for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type Slots<K> = Arc<Mutex<HashMap<K, Arc<AsyncMutex<()>>>>>;

#[derive(Debug)]
pub(crate) struct KeyedLock<K> {
    slots: Slots<K>,
}

impl<K> Default for KeyedLock<K> {
    fn default() -> Self {
        Self {
            slots: Arc::default(),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedLock<K> {
    pub(crate) async fn lock(&self, key: K) -> KeyedGuard<K> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = slot.lock_owned().await;
        KeyedGuard {
            guard: Some(guard),
            key,
            slots: self.slots.clone(),
        }
    }

    /// The lock for `key` if nobody holds it right now.
    pub(crate) fn try_lock(&self, key: K) -> Option<KeyedGuard<K>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.entry(key.clone()).or_default().clone();
        match slot.try_lock_owned() {
            Ok(guard) => Some(KeyedGuard {
                guard: Some(guard),
                key,
                slots: self.slots.clone(),
            }),
            // Someone holds it, so the slot stays; nothing to clean up.
            Err(_) => None,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

pub(crate) struct KeyedGuard<K: Hash + Eq> {
    guard: Option<OwnedMutexGuard<()>>,
    key: K,
    slots: Slots<K>,
}

impl<K: Hash + Eq> Drop for KeyedGuard<K> {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.guard.take());
        // Only the map's own reference left: nobody holds or waits for this key.
        if slots
            .get(&self.key)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn serializes_per_key_and_cleans_up() {
        let locks = Arc::new(KeyedLock::default());
        let counter = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, counter) = (locks.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(1u32).await;
                let before = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                let after = counter.load(std::sync::atomic::Ordering::SeqCst);
                assert_eq!(before + 1, after, "another holder ran concurrently");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(locks.len(), 0);
        let a = locks.lock(1).await;
        let b = locks.lock(2).await;
        assert_eq!(locks.len(), 2);
        assert!(locks.try_lock(1).is_none());
        drop((a, b));
        assert_eq!(locks.len(), 0);
        let c = locks.try_lock(1).unwrap();
        assert!(locks.try_lock(1).is_none());
        drop(c);
        assert_eq!(locks.len(), 0);
    }
}
