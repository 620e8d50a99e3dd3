//! The pool's unit tests: recycling, slabs, the mapping cache, bad references, limits.

use std::collections::BTreeSet;
use std::sync::MutexGuard;

use super::*;

/// Tests that compare `/dev/shm` before and after run one at a time: every pool of this
/// process shares one session, so a concurrent test's segments would look like a leak.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn listing() -> BTreeSet<String> {
    crate::list_files().unwrap()
}

/// Runs `test` and asserts that `/dev/shm` holds the same files of ours afterwards.
fn leaves_shm_clean(test: impl FnOnce()) {
    let _serial = serial();
    let before = listing();
    test();
    assert_eq!(listing(), before, "segments left behind in /dev/shm");
}

fn quiet_pool(config: PoolConfig) -> ShmPool {
    ShmPool::with_config(PoolConfig {
        sweep_orphans: false,
        ..config
    })
    .unwrap()
}

#[test]
fn recycled_blocks_create_no_new_segment() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let size = 8 << 20;
        drop(pool.alloc(size).unwrap());
        let warm = pool.stats().segments_created;
        for i in 0..1000 {
            let mut block = pool.alloc(size - (i % 7) * 4096).unwrap();
            block.as_mut_slice().unwrap()[0] = i as u8;
        }
        let stats = pool.stats();
        assert_eq!(stats.segments_created, warm, "recycling created segments");
        assert_eq!(stats.live_blocks, 0);
        assert_eq!(stats.bytes_cached, size as u64);
    });
}

#[test]
fn small_allocations_share_slab_segments() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let blocks: Vec<ShmBlock> = (0..10_000)
            .map(|i| {
                let mut block = pool.alloc(1 + i % 200).unwrap();
                block.as_mut_slice().unwrap().fill((i % 251) as u8);
                block
            })
            .collect();
        for (i, block) in blocks.iter().enumerate() {
            assert_eq!(block.offset() % BLOCK_ALIGN, 0, "slot {i} misaligned");
            assert!(block.capacity() >= block.len() && block.capacity() >= BLOCK_ALIGN);
            assert!(
                block.as_slice().iter().all(|&b| b == (i % 251) as u8),
                "slot {i} was overwritten by another slot"
            );
        }
        let stats = pool.stats();
        assert!(
            stats.segments_created <= 8,
            "{} segments for 10,000 small blocks",
            stats.segments_created
        );
        assert_eq!(stats.live_blocks, 10_000);
        drop(blocks);
        assert_eq!(pool.stats().live_blocks, 0);
    });
}

#[test]
fn segments_are_private_to_their_user_and_named_for_macos() {
    use std::os::unix::fs::PermissionsExt;
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        for size in [10, 1 << 20] {
            let block = pool.alloc(size).unwrap();
            assert!(
                block.name().len() <= 30,
                "{} is too long for macOS",
                block.name()
            );
            let mode = std::fs::metadata(sys::segment_path(block.name()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", block.name());
        }
    });
}

#[test]
fn zero_size_blocks_are_valid() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let block = pool.alloc(0).unwrap();
        assert!(block.is_empty());
        let r = block.to_ref();
        assert_eq!(r.content_size, 0);
        let view = pool.attach(&r).unwrap();
        assert_eq!(view.as_slice(), &[] as &[u8]);
    });
}

#[test]
fn attaching_twice_reuses_one_mapping() {
    leaves_shm_clean(|| {
        let owner = quiet_pool(PoolConfig::default());
        let reader = quiet_pool(PoolConfig::default());
        let mut block = owner.alloc(3 << 20).unwrap();
        block.as_mut_slice().unwrap().fill(0xab);
        let a = reader.attach(&block.to_ref()).unwrap();
        let b = reader.attach(&block.to_ref()).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(reader.stats().segments_attached, 1);
        assert!(b.as_slice().iter().all(|&x| x == 0xab));
    });
}

#[test]
fn mappings_of_segments_their_owner_unlinked_are_released() {
    leaves_shm_clean(|| {
        let owner = quiet_pool(PoolConfig::default());
        let reader = quiet_pool(PoolConfig::default());
        let first = owner.alloc(2 << 20).unwrap();
        drop(reader.attach(&first.to_ref()).unwrap());
        assert_eq!(
            reader.stats().segments_attached,
            1,
            "idle mapping is cached"
        );
        drop(first);
        owner.trim();
        let second = owner.alloc(5 << 20).unwrap();
        let _view = reader.attach(&second.to_ref()).unwrap();
        let stats = reader.stats();
        assert_eq!(
            stats.segments_attached, 1,
            "the unlinked segment is still mapped"
        );
        assert_eq!(stats.bytes_mapped, 5 << 20);
    });
}

#[test]
fn attached_blocks_are_read_only() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let block = pool.alloc(100_000).unwrap();
        let mut view = pool.attach(&block.to_ref()).unwrap();
        match view.as_mut_slice() {
            Err(ShmError::ReadOnly { name }) => assert_eq!(name, block.name()),
            other => panic!("expected ReadOnly, got {other:?}"),
        }
        // Not only by convention: the mapping itself is read-only.
        let address = view.as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapping = maps
            .lines()
            .find(|line| {
                let (range, _) = line.split_once(' ').unwrap();
                let (start, end) = range.split_once('-').unwrap();
                let start = usize::from_str_radix(start, 16).unwrap();
                let end = usize::from_str_radix(end, 16).unwrap();
                (start..end).contains(&address)
            })
            .unwrap();
        assert!(mapping.contains(" r--s "), "attached mapping: {mapping}");
    });
}

#[test]
fn a_segment_truncated_under_its_readers_reads_as_zeros_instead_of_killing_them() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let mut block = pool.alloc(1 << 20).unwrap();
        block.as_mut_slice().unwrap().fill(7);
        let view = pool.attach(&block.to_ref()).unwrap();
        assert!(!view.is_truncated());
        // What a hostile peer of the same user can do to any segment it can name.
        std::fs::OpenOptions::new()
            .write(true)
            .open(sys::segment_path(block.name()))
            .unwrap()
            .set_len(PAGE as u64)
            .unwrap();
        let bytes = view.as_slice();
        assert_eq!(bytes[PAGE - 1], 7, "the bytes before the cut are intact");
        assert_eq!(bytes[PAGE], 0, "past the cut: zeros, not SIGBUS");
        assert!(bytes[PAGE..].iter().all(|&b| b == 0));
        assert!(view.is_truncated());
        match view.check_intact() {
            Err(ShmError::Truncated { name, mapped }) => {
                assert_eq!(name, block.name());
                assert_eq!(mapped, 1 << 20);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        assert!(matches!(
            pool.private_copy(&view),
            Err(ShmError::Truncated { .. })
        ));
        // The owner's own mapping survives a write past the cut just the same.
        assert!(!block.is_truncated());
        block.as_mut_slice().unwrap()[PAGE * 2] = 1;
        assert!(block.is_truncated());
        let name = block.name().to_owned();
        drop(view);
        let cached = pool.stats().bytes_cached;
        drop(block);
        assert_eq!(
            pool.stats().bytes_cached,
            cached,
            "a truncated segment is not reused"
        );
        assert!(!sys::segment_path(&name).exists());
    });
}

#[test]
fn private_copies_hold_the_content_and_cannot_be_named() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        for size in [0, 100, 3 << 20] {
            let mut block = pool.alloc(size).unwrap();
            block
                .as_mut_slice()
                .unwrap()
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = i as u8);
            let view = pool.attach(&block.to_ref()).unwrap();
            let copy = pool.private_copy(&view).unwrap();
            assert_eq!(copy.as_slice(), view.as_slice());
            assert!(copy.is_private() && !view.is_private());
            assert!(copy.as_ptr().cast::<u64>().is_aligned() || size == 0);
            assert!(matches!(
                pool.attach(&copy.to_ref()),
                Err(ShmError::InvalidName { .. })
            ));
            // The copy outlives the block and its segment.
            drop(view);
            drop(block);
            pool.trim();
            assert!(
                copy.as_slice()
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == i as u8)
            );
            // Its memory serves the next copy of that size.
            drop(copy);
            let again = pool.alloc(size).unwrap();
            let copy = pool.private_copy(&again).unwrap();
            assert_eq!(
                pool.stats().bytes_cached,
                0,
                "the cached private memory was reused"
            );
            drop((copy, again));
        }
    });
}

#[test]
fn whole_segments_attach_by_name_with_or_without_the_slash() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let mut block = pool.alloc(100_000).unwrap();
        block.as_mut_slice().unwrap().fill(3);
        let name = block.name().to_owned();
        for given in [name.as_str(), &name[1..]] {
            let whole = pool.attach_segment(given).unwrap();
            assert_eq!(whole.name(), name);
            assert_eq!(whole.len(), 102_400, "the segment's length, page-rounded");
            assert!(whole.as_slice()[..100_000].iter().all(|&b| b == 3));
        }
        assert!(matches!(
            pool.attach_segment("no-such-segment"),
            Err(ShmError::SegmentNotFound { .. })
        ));
        assert!(matches!(
            pool.attach_segment("a/b"),
            Err(ShmError::InvalidName { .. })
        ));
    });
}

#[test]
fn bad_refs_are_typed_errors() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let block = pool.alloc(1 << 20).unwrap();
        let good = block.to_ref();
        let segment_len = (1u64 << 20).next_multiple_of(PAGE as u64);

        let missing = ShmRef {
            name: "/shm-00000000-0000000000000000".into(),
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&missing),
            Err(ShmError::SegmentNotFound { name }) if name == missing.name
        ));

        let malformed = ShmRef {
            name: "shm-no-slash".into(),
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&malformed),
            Err(ShmError::InvalidName { .. })
        ));

        let too_big = ShmRef {
            size: segment_len + 1,
            content_size: segment_len + 1,
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&too_big),
            Err(ShmError::RefOutOfBounds { size, segment_len: len, .. })
                if size == segment_len + 1 && len == segment_len
        ));

        let past_end = ShmRef {
            offset: segment_len,
            size: 64,
            content_size: 64,
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&past_end),
            Err(ShmError::RefOutOfBounds { offset, .. }) if offset == segment_len
        ));

        let overflowing = ShmRef {
            offset: u64::MAX - 63,
            size: 64,
            content_size: 0,
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&overflowing),
            Err(ShmError::RefOverflow { offset, size: 64, .. }) if offset == u64::MAX - 63
        ));

        let misaligned = ShmRef {
            offset: 8,
            size: 64,
            content_size: 64,
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&misaligned),
            Err(ShmError::MisalignedRef {
                offset: 8,
                align: 64,
                ..
            })
        ));

        let content_too_long = ShmRef {
            content_size: good.size + 1,
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&content_too_long),
            Err(ShmError::ContentExceedsSize { .. })
        ));

        assert_eq!(pool.attach(&good).unwrap().len(), 1 << 20);
    });
}

#[test]
fn capacity_is_enforced_with_the_numbers() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig {
            capacity: Some(10 << 20),
            ..PoolConfig::default()
        });
        let held = pool.alloc(6 << 20).unwrap();
        match pool.alloc(6 << 20) {
            Err(ShmError::CapacityExceeded {
                requested,
                in_use,
                capacity,
            }) => {
                assert_eq!((requested, in_use, capacity), (6 << 20, 6 << 20, 10 << 20));
            }
            other => panic!("expected CapacityExceeded, got {other:?}"),
        }
        drop(held);
        // The cached segment is evicted to make room for a different size.
        let _ = pool.alloc(9 << 20).unwrap();
        assert!(pool.stats().bytes_mapped <= 10 << 20);
    });
}

#[test]
fn exhausting_dev_shm_is_an_error_not_a_crash() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let available = crate::shm_available().unwrap();
        let request = available + (1 << 30);
        match pool.alloc(request as usize) {
            Err(ShmError::OutOfSharedMemory {
                requested,
                available: reported,
            }) => {
                assert!(requested >= request);
                assert!(reported < requested);
            }
            other => panic!("expected OutOfSharedMemory, got {other:?}"),
        }
        let mut block = pool.alloc(1 << 20).unwrap();
        block.as_mut_slice().unwrap().fill(1);
        assert_eq!(pool.stats().live_blocks, 1);
    });
}

#[test]
fn close_all_unlinks_live_blocks_which_stay_readable() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let mut big = pool.alloc(1 << 20).unwrap();
        big.as_mut_slice().unwrap().fill(9);
        let mut small = pool.alloc(10).unwrap();
        small.as_mut_slice().unwrap().fill(3);
        drop(pool.alloc(2 << 20).unwrap());
        let names = [big.name().to_owned(), small.name().to_owned()];
        pool.close_all();
        for name in &names {
            assert!(!sys::segment_path(name).exists(), "{name} still linked");
        }
        assert!(big.as_slice().iter().all(|&b| b == 9));
        assert!(small.as_slice().iter().all(|&b| b == 3));
        assert!(matches!(pool.alloc(1), Err(ShmError::PoolClosed)));
        assert!(matches!(
            pool.attach(&big.to_ref()),
            Err(ShmError::PoolClosed)
        ));
    });
}

#[test]
fn a_session_cannot_be_ended_while_a_pool_of_it_is_open() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let lock = sys::segment_path(&pool.session().lock_name());
        match crate::end_session() {
            Err(ShmError::SessionInUse { open_pools, .. }) => assert_eq!(open_pools, 1),
            other => panic!("expected SessionInUse, got {other:?}"),
        }
        assert!(lock.exists(), "the live pool's lock was removed");
        pool.close_all();
        crate::end_session().unwrap();
        assert!(!lock.exists());
    });
}

#[test]
fn reclaimers_are_asked_before_every_allocation() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Counting(AtomicUsize);
    impl Reclaim for Counting {
        fn reclaim(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let weak: Weak<dyn Reclaim> = Arc::downgrade(&counting) as Weak<dyn Reclaim>;
        pool.add_reclaimer(weak);
        drop(pool.alloc(10).unwrap());
        drop(pool.alloc(1 << 20).unwrap());
        assert_eq!(counting.0.load(Ordering::Relaxed), 2);
        drop(counting);
        drop(pool.alloc(10).unwrap());
    });
}

#[test]
fn many_threads_share_one_pool() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        std::thread::scope(|scope| {
            for thread in 0..8u8 {
                let pool = pool.clone();
                scope.spawn(move || {
                    for i in 0..300usize {
                        let size = [17, 4000, 70_000, 300_000, 2 << 20][i % 5];
                        let mut block = pool.alloc(size).unwrap();
                        block.as_mut_slice().unwrap().fill(thread);
                        std::thread::yield_now();
                        assert!(
                            block.as_slice().iter().all(|&b| b == thread),
                            "a block was handed to two threads at once"
                        );
                    }
                });
            }
        });
        assert_eq!(pool.stats().live_blocks, 0);
    });
}
