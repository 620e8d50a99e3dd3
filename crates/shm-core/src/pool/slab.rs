//! Slabs: small blocks share 1 MiB segments, cut into power-of-two slots.

use std::sync::Arc;

use super::{BLOCK_ALIGN, PoolShared, SLAB_LEN, Slot, State};
use crate::block::ShmBlockMut;
use crate::error::{Result, ShmError};
use crate::name::SegmentHolds;
use crate::segment::Segment;

pub(super) struct SlabClass {
    pub(super) slabs: Vec<Option<Slab>>,
}

pub(super) struct Slab {
    pub(super) segment: Arc<Segment>,
    pub(super) free: Vec<u32>,
    pub(super) live: u32,
}

impl PoolShared {
    pub(super) fn alloc_slot(self: &Arc<Self>, size: usize) -> Result<ShmBlockMut> {
        let slot_len = size.max(BLOCK_ALIGN).next_power_of_two();
        let class = slot_len.trailing_zeros() as usize - BLOCK_ALIGN.trailing_zeros() as usize;
        loop {
            let evicted;
            {
                let mut state = self.lock();
                if state.closed {
                    return Err(ShmError::PoolClosed);
                }
                let slabs = &mut state.slabs[class].slabs;
                let found = slabs.iter_mut().enumerate().find_map(|(i, slab)| {
                    let slab = slab.as_mut()?;
                    let index = slab.free.pop()?;
                    slab.live += 1;
                    Some((i, index, Arc::clone(&slab.segment)))
                });
                if let Some((slab, index, segment)) = found {
                    state.live_blocks += 1;
                    drop(state);
                    return Ok(ShmBlockMut::new(
                        segment,
                        index as usize * slot_len,
                        slot_len,
                        size,
                        self.lease(Slot::Slab { class, slab, index }),
                    ));
                }
                evicted = self.reserve_bytes(&mut state, SLAB_LEN as u64)?;
            }
            drop(evicted);
            let (segment, mut state) = self.create_reserved(SLAB_LEN, SegmentHolds::Slab, false)?;
            let slots = (SLAB_LEN / slot_len) as u32;
            let slab = Slab {
                segment,
                free: (0..slots).rev().collect(),
                live: 0,
            };
            let slabs = &mut state.slabs[class].slabs;
            match slabs.iter().position(Option::is_none) {
                Some(i) => slabs[i] = Some(slab),
                None => slabs.push(Some(slab)),
            }
            // The next turn of the loop takes a slot from the new slab (or from one a
            // concurrent release freed).
        }
    }
}

impl State {
    /// Returns a slot to its slab. A slab left empty is kept while it is its class's only slab
    /// with free slots, and released otherwise.
    pub(super) fn release_slot(
        &mut self,
        class: usize,
        slab: usize,
        index: u32,
    ) -> Option<Arc<Segment>> {
        let slabs = &mut self.slabs.get_mut(class)?.slabs;
        let entry = slabs.get_mut(slab)?.as_mut()?;
        entry.free.push(index);
        entry.live -= 1;
        if entry.live > 0 {
            return None;
        }
        let others_have_room = slabs
            .iter()
            .enumerate()
            .any(|(i, s)| i != slab && s.as_ref().is_some_and(|s| !s.free.is_empty()));
        if !others_have_room {
            return None;
        }
        let empty = slabs[slab].take()?;
        self.owned_bytes -= SLAB_LEN as u64;
        empty.segment.retire();
        Some(empty.segment)
    }

    /// Removes every slab with no live slot.
    pub(super) fn take_empty_slabs(&mut self) -> Vec<Arc<Segment>> {
        let mut taken = Vec::new();
        for class in &mut self.slabs {
            for entry in &mut class.slabs {
                if entry.as_ref().is_some_and(|slab| slab.live == 0)
                    && let Some(slab) = entry.take()
                {
                    slab.segment.retire();
                    taken.push(slab.segment);
                }
            }
        }
        self.owned_bytes -= (taken.len() * SLAB_LEN) as u64;
        taken
    }
}
