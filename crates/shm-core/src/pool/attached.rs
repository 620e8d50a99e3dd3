//! The mapping cache: segments of other processes, mapped once and kept while used.

use std::sync::Arc;

use super::{PoolShared, State};
use crate::error::{Result, ShmError};
use crate::segment::Segment;
use crate::sys;

impl PoolShared {
    /// The mapping of `name`, from the cache or new.
    pub(super) fn mapping(&self, name: &str) -> Result<Arc<Segment>> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(ShmError::PoolClosed);
            }
            state.tick += 1;
            let tick = state.tick;
            if let Some((used, segment)) = state.attached.get_mut(name) {
                *used = tick;
                return Ok(Arc::clone(segment));
            }
        }
        let segment = Arc::new(Segment::open_named(name)?);
        let (segment, evicted) = {
            let mut state = self.lock();
            let tick = state.tick;
            if let Some((_, existing)) = state.attached.get(name) {
                // Another thread mapped it meanwhile: use one mapping.
                (Arc::clone(existing), Vec::new())
            } else {
                state.attached_bytes += segment.len() as u64;
                state
                    .attached
                    .insert(name.to_owned(), (tick, Arc::clone(&segment)));
                // A new mapping is the moment to let go of idle ones whose owner has unlinked
                // them, and of the least recently used beyond the bound.
                let gone = state.evict_attached(
                    |segment| !sys::segment_path(segment.name()).exists(),
                    u64::MAX,
                );
                let mut evicted = gone;
                evicted.extend(state.evict_attached(|_| true, self.config.attach_cache_bytes));
                (segment, evicted)
            }
        };
        drop(evicted);
        Ok(segment)
    }
}

impl State {
    /// Drops idle attached mappings that `doomed` selects, least recently used first, until no
    /// more than `keep_bytes` of mappings remain (`u64::MAX`: drop every selected one).
    pub(super) fn evict_attached(
        &mut self,
        doomed: impl Fn(&Segment) -> bool,
        keep_bytes: u64,
    ) -> Vec<Arc<Segment>> {
        let mut idle: Vec<(u64, String)> = self
            .attached
            .iter()
            .filter(|(_, (_, segment))| Arc::strong_count(segment) == 1)
            .map(|(name, (tick, _))| (*tick, name.clone()))
            .collect();
        idle.sort_unstable();
        let mut evicted = Vec::new();
        for (_, name) in idle {
            if keep_bytes != u64::MAX && self.attached_bytes <= keep_bytes {
                break;
            }
            let selected = self.attached.get(&name).is_some_and(|(_, s)| doomed(s));
            if selected && let Some((_, segment)) = self.attached.remove(&name) {
                self.attached_bytes -= segment.len() as u64;
                evicted.push(segment);
            }
        }
        evicted
    }
}
