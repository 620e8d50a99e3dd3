//! Whole segments: one block each, recycled through a free list ordered by size.

use std::sync::Arc;

use super::{PAGE, PoolShared, Slot, State};
use crate::block::ShmBlockMut;
use crate::error::{Result, ShmError};
use crate::name::SegmentHolds;
use crate::segment::Segment;
use crate::sys;

impl PoolShared {
    /// A block that is a whole segment of its own: from the free list or new; or, when
    /// `shared`, always new, unsealed against writes for a peer to map writable, and never
    /// recycled.
    pub(super) fn alloc_whole(self: &Arc<Self>, size: usize, shared: bool) -> Result<ShmBlockMut> {
        let len =
            size.checked_next_multiple_of(PAGE)
                .ok_or_else(|| ShmError::OutOfSharedMemory {
                    requested: size as u64,
                    available: sys::memory_available(),
                })?;
        let evicted;
        {
            let mut state = self.lock();
            if state.closed {
                return Err(ShmError::PoolClosed);
            }
            if !shared && let Some(segment) = state.take_free(len) {
                state
                    .live
                    .insert(segment.name().to_owned(), Arc::downgrade(&segment));
                state.live_blocks += 1;
                let capacity = segment.len();
                drop(state);
                return Ok(ShmBlockMut::new(
                    segment,
                    0,
                    capacity,
                    size,
                    self.lease(Slot::Whole),
                ));
            }
            evicted = self.reserve_bytes(&mut state, len as u64)?;
        }
        drop(evicted);
        let (segment, mut state) = self.create_reserved(len, SegmentHolds::Block, shared)?;
        state
            .live
            .insert(segment.name().to_owned(), Arc::downgrade(&segment));
        state.live_blocks += 1;
        drop(state);
        let slot = if shared { Slot::Shared } else { Slot::Whole };
        Ok(ShmBlockMut::new(segment, 0, len, size, self.lease(slot)))
    }
}

impl State {
    /// Takes the most recently freed segment of length `len` to `len * 5/4`, the smallest
    /// that fits.
    pub(super) fn take_free(&mut self, len: usize) -> Option<Arc<Segment>> {
        let upper = len.saturating_add(len / 4);
        let (&key, list) = self.free.range_mut(len..=upper).next()?;
        let (_, segment) = list.pop()?;
        if list.is_empty() {
            self.free.remove(&key);
        }
        self.free_bytes -= segment.len() as u64;
        self.last_use = Some(std::time::Instant::now());
        Some(segment)
    }

    /// Removes the least recently freed segment from the free list.
    pub(super) fn evict_free(&mut self) -> Option<Arc<Segment>> {
        let (&key, _) = self
            .free
            .iter()
            .min_by_key(|(_, list)| list.first().map_or(u64::MAX, |(tick, _)| *tick))?;
        let list = self.free.get_mut(&key)?;
        let (_, segment) = list.remove(0);
        if list.is_empty() {
            self.free.remove(&key);
        }
        self.free_bytes -= segment.len() as u64;
        self.owned_bytes -= segment.len() as u64;
        segment.retire();
        Some(segment)
    }
}
