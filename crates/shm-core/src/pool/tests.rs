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
    ShmPool::with_config(config).unwrap()
}

/// Attaches a named object of the tests: nothing writes or truncates one while it is mapped.
fn attach_named(pool: &ShmPool, name: &str) -> Result<ShmBlock> {
    // SAFETY: the tests' named objects are written once, before they are attached, and never
    // shrunk while mapped; names that are refused map nothing.
    unsafe { pool.attach_segment(name) }
}

/// A named object in `/dev/shm` such as another program (Python's `SharedMemory`) makes,
/// removed when dropped.
struct Named {
    name: String,
}

impl Named {
    fn new(content: &[u8]) -> Named {
        let name = format!("/psm_test_{:016x}", sys::random_u64().unwrap());
        std::fs::write(sys::segment_path(&name), content).unwrap();
        Named { name }
    }

    fn path(&self) -> std::path::PathBuf {
        sys::segment_path(&self.name)
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
    }
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
            block.as_mut_slice()[0] = i as u8;
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
        let blocks: Vec<ShmBlockMut> = (0..10_000)
            .map(|i| {
                let mut block = pool.alloc(1 + i % 200).unwrap();
                block.as_mut_slice().fill((i % 251) as u8);
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
fn segments_are_sealed_memfds_that_no_name_reaches() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        for size in [10, 1 << 20] {
            let mut block = pool.alloc(size).unwrap();
            block.as_mut_slice().fill(5);
            assert!(block.name().len() <= 30, "{}", block.name());
            assert!(!sys::segment_path(block.name()).exists());
            let fd = block.segment().descriptor().unwrap();
            let seals = rustix::fs::fcntl_get_seals(fd).unwrap();
            use rustix::fs::SealFlags;
            assert!(seals.contains(
                SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE | SealFlags::SEAL
            ));
            // What a peer holding the descriptor could try: every one is refused by the kernel.
            let len = block.segment().len() as u64;
            assert_eq!(
                rustix::fs::ftruncate(fd, len / 2),
                Err(rustix::io::Errno::PERM)
            );
            assert_eq!(
                rustix::fs::ftruncate(fd, len * 2),
                Err(rustix::io::Errno::PERM)
            );
            assert_eq!(
                rustix::io::pwrite(fd, b"x", 0),
                Err(rustix::io::Errno::PERM)
            );
            assert!(sys::map(&fd.try_clone_to_owned().unwrap(), 4096, true).is_err());
            // Reopening through /proc gives no way around the seals either.
            let reopened = rustix::fs::open(
                format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)),
                rustix::fs::OFlags::RDWR,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            assert!(sys::map(&reopened, 4096, true).is_err());
            assert_eq!(
                rustix::fs::fcntl_add_seals(&reopened, SealFlags::WRITE),
                Err(rustix::io::Errno::PERM)
            );
            // The owner writes on through the mapping it made before sealing.
            block.as_mut_slice().fill(6);
            assert!(block.as_slice().iter().all(|&b| b == 6));
        }
    });
}

#[test]
fn zero_size_blocks_are_valid() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let block = pool.alloc(0).unwrap().freeze();
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
        block.as_mut_slice().fill(0xab);
        let block = block.freeze();
        let a = reader.attach(&block.to_ref()).unwrap();
        let b = reader.attach(&block.to_ref()).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(
            a.as_ptr(),
            block.as_ptr(),
            "a segment of this process is not mapped again"
        );
        assert_eq!(reader.stats().segments_attached, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0xab));
        let named = Named::new(&[1; 8192]);
        let c = attach_named(&reader, &named.name).unwrap();
        let d = attach_named(&reader, &named.name).unwrap();
        assert_eq!(c.as_ptr(), d.as_ptr());
        assert_eq!(reader.stats().segments_attached, 1);
    });
}

#[test]
fn mappings_of_named_segments_their_owner_removed_are_released() {
    leaves_shm_clean(|| {
        let reader = quiet_pool(PoolConfig::default());
        let first = Named::new(&[1; 2 << 20]);
        drop(attach_named(&reader, &first.name).unwrap());
        assert_eq!(
            reader.stats().segments_attached,
            1,
            "idle mapping is cached"
        );
        drop(first);
        let second = Named::new(&[2; 5 << 20]);
        let _view = attach_named(&reader, &second.name).unwrap();
        let stats = reader.stats();
        assert_eq!(
            stats.segments_attached, 1,
            "the removed segment is still mapped"
        );
        assert_eq!(stats.bytes_mapped, 5 << 20);
    });
}

#[test]
fn names_that_lead_elsewhere_are_refused_before_anything_is_mapped() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let target = Named::new(b"SECRET-of-another-program");
        let planted = |suffix: &str| format!("/psm_test_{}_{suffix}", std::process::id());
        let path = |name: &str| sys::segment_path(name);
        // Removed when the test ends, failed or not.
        struct Planted(Vec<std::path::PathBuf>);
        impl Drop for Planted {
            fn drop(&mut self) {
                for path in &self.0 {
                    let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
                }
            }
        }
        let _planted = Planted(
            ["symlink", "hardlink", "fifo", "dir", "device"]
                .iter()
                .map(|suffix| path(&planted(suffix)))
                .collect(),
        );
        let mut cases: Vec<(String, &str)> = Vec::new();
        let symlink = planted("symlink");
        std::os::unix::fs::symlink("/etc/passwd", path(&symlink)).unwrap();
        cases.push((symlink, "symbolic link"));
        let hardlink = planted("hardlink");
        std::fs::hard_link(target.path(), path(&hardlink)).unwrap();
        cases.push((hardlink, "hard link"));
        let fifo = planted("fifo");
        let c_path = std::ffi::CString::new(path(&fifo).to_str().unwrap()).unwrap();
        // SAFETY: a valid C string and a plain mode.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        cases.push((fifo, "FIFO"));
        let dir = planted("dir");
        std::fs::create_dir(path(&dir)).unwrap();
        cases.push((dir, "directory"));
        let device = planted("device");
        let c_path = std::ffi::CString::new(path(&device).to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; the device is /dev/null's (1, 3). Only root may make it.
        if unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) } == 0
        {
            cases.push((device, "device"));
        }
        for (name, what) in &cases {
            let started = std::time::Instant::now();
            match attach_named(&pool, name) {
                Err(ShmError::NotASegment { name: n, .. }) => assert_eq!(&n, name),
                Err(ShmError::Os { .. }) if *what == "device" => {}
                other => panic!("{what}: expected NotASegment, got {other:?}"),
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "{what}"
            );
        }
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            !maps.contains(&planted("")) && !maps.contains("/etc/passwd"),
            "a refused name left a mapping:\n{maps}"
        );
        assert_eq!(pool.stats().segments_attached, 0);
    });
}

#[test]
fn memory_is_attached_only_once_frozen() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let reader = quiet_pool(PoolConfig::default());
        // Writable blocks give out no reference; one made up from their numbers is refused, in
        // a whole segment and in a slab, so no view can race their writer.
        for size in [100, 100_000] {
            let mut block = pool.alloc(size).unwrap();
            block.as_mut_slice().fill(1);
            let forged = ShmRef {
                name: block.name().to_owned(),
                offset: block.offset() as u64,
                size: block.capacity() as u64,
                content_size: block.len() as u64,
            };
            match reader.attach(&forged) {
                Err(ShmError::NotFrozen { name, offset, size }) => {
                    assert_eq!(
                        (name.as_str(), offset, size),
                        (block.name(), forged.offset, forged.size)
                    );
                }
                other => panic!("expected NotFrozen, got {other:?}"),
            }
            let frozen = block.freeze();
            // A range inside the frozen block is a view of it; one past its end is not.
            let inner = ShmRef {
                size: 64,
                content_size: 64,
                ..forged.clone()
            };
            assert_eq!(reader.attach(&inner).unwrap().as_slice(), &[1; 64]);
            let beyond = ShmRef {
                size: forged.size + 64,
                content_size: 0,
                ..forged.clone()
            };
            assert!(matches!(
                reader.attach(&beyond),
                Err(ShmError::NotFrozen { .. } | ShmError::RefOutOfBounds { .. })
            ));
            // A view keeps the frozen block, so its memory is not handed out again.
            let view = reader.attach(&frozen.to_ref()).unwrap();
            drop(frozen);
            assert_eq!(pool.stats().live_blocks, 1);
            let reuse = pool.alloc(size).unwrap();
            assert_ne!(
                (reuse.name(), reuse.offset()),
                (view.name(), view.offset()),
                "memory a view shows was handed out for writing"
            );
            assert!(view.as_slice().iter().all(|&b| b == 1));
            drop(reuse);
            drop(view);
            assert_eq!(pool.stats().live_blocks, 0);
            // Free memory is not attachable either.
            assert!(matches!(
                reader.attach(&forged),
                Err(ShmError::NotFrozen { .. })
            ));
        }
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
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = i as u8);
            let block = block.freeze();
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
            let again = pool.alloc(size).unwrap().freeze();
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
        let own = pool.alloc(100_000).unwrap();
        let named = Named::new(&[3; 100_000]);
        let name = named.name.clone();
        for given in [name.as_str(), &name[1..]] {
            let whole = attach_named(&pool, given).unwrap();
            assert_eq!(whole.name(), name);
            assert_eq!(whole.len(), 100_000);
            assert!(whole.as_slice().iter().all(|&b| b == 3));
        }
        assert!(matches!(
            attach_named(&pool, "no-such-segment"),
            Err(ShmError::SegmentNotFound { .. })
        ));
        assert!(matches!(
            attach_named(&pool, "a/b"),
            Err(ShmError::InvalidName { .. })
        ));
        assert!(matches!(
            attach_named(&pool, own.name()),
            Err(ShmError::NotASegment { .. })
        ));
    });
}

#[test]
fn bad_refs_are_typed_errors() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let block = pool.alloc(1 << 20).unwrap().freeze();
        let good = block.to_ref();
        let segment_len = (1u64 << 20).next_multiple_of(PAGE as u64);

        let missing = ShmRef {
            name: "/shm-00000000-0000000000000000".into(),
            ..good.clone()
        };
        assert!(matches!(
            pool.attach(&missing),
            Err(ShmError::NoDescriptor { name }) if name == missing.name
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
        let pool = quiet_pool(PoolConfig::default().with_capacity(Some(10 << 20)));
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
fn asking_for_more_memory_than_there_is_is_an_error_not_a_crash() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let available = sys::memory_available();
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
        block.as_mut_slice().fill(1);
        assert_eq!(pool.stats().live_blocks, 1);
    });
}

#[test]
fn close_all_releases_live_blocks_which_stay_readable() {
    leaves_shm_clean(|| {
        let pool = quiet_pool(PoolConfig::default());
        let mut big = pool.alloc(1 << 20).unwrap();
        big.as_mut_slice().fill(9);
        let mut small = pool.alloc(10).unwrap();
        small.as_mut_slice().fill(3);
        let (big, small) = (big.freeze(), small.freeze());
        drop(pool.alloc(2 << 20).unwrap());
        let other = quiet_pool(PoolConfig::default());
        assert!(other.attach(&big.to_ref()).is_ok());
        pool.close_all();
        for r in [big.to_ref(), small.to_ref()] {
            assert!(
                matches!(other.attach(&r), Err(ShmError::SegmentNotFound { .. })),
                "{} can still be attached",
                r.name
            );
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
                        block.as_mut_slice().fill(thread);
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

#[test]
fn an_idle_pool_gives_back_what_it_caches_beyond_what_it_keeps() {
    leaves_shm_clean(|| {
        let after = Duration::from_millis(300);
        let pool = quiet_pool(PoolConfig::default().with_idle_release(4 << 20, Some(after)));
        // A burst: blocks of 8 MiB, 5 MiB and 3 MiB, and a small one (a slab), are dropped.
        for size in [8 << 20, 5 << 20, 3 << 20, 1000] {
            drop(pool.alloc(size).unwrap());
        }
        let cached = pool.stats().bytes_cached;
        assert!(cached >= 16 << 20, "{cached} bytes cached after the burst");
        // While it is used, the pool keeps its cache.
        let busy_until = Instant::now() + 3 * after;
        while Instant::now() < busy_until {
            drop(pool.alloc(3 << 20).unwrap());
            std::thread::sleep(after / 10);
        }
        assert!(
            pool.stats().bytes_cached >= 16 << 20,
            "released while in use"
        );
        // Idle, it gives back all but the 3 MiB segment (the newest that fits in 4 MiB).
        let deadline = Instant::now() + 20 * after;
        while pool.stats().bytes_cached > 4 << 20 && Instant::now() < deadline {
            std::thread::sleep(after / 10);
        }
        let stats = pool.stats();
        assert!(
            stats.bytes_cached <= 4 << 20 && stats.bytes_cached >= 3 << 20,
            "{} bytes cached after idling",
            stats.bytes_cached
        );
        assert_eq!(stats.segments_owned, 1, "one segment kept");
        // A pool that keeps nothing gives everything back.
        let pool = quiet_pool(PoolConfig::default().with_idle_release(0, Some(after)));
        drop(pool.alloc(2 << 20).unwrap());
        let deadline = Instant::now() + 20 * after;
        while pool.stats().segments_owned > 0 && Instant::now() < deadline {
            std::thread::sleep(after / 10);
        }
        assert_eq!(pool.stats().segments_owned, 0);
        assert_eq!(pool.stats().bytes_cached, 0);
    });
}
