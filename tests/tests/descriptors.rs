//! A mapping costs no file descriptor: with the common limit of 1,024 descriptors, a process
//! holds 10,000 live blocks of their own segments, and another pool attaches all of them. The
//! test re-runs itself with the limit lowered, so that the other tests keep theirs.

use std::process::Command;

use shm_core::{PoolConfig, ShmPool};
use shm_tests::CleanShm;

/// Set in the re-run with the lowered limit.
const INSIDE: &str = "SHM_TEST_FEW_DESCRIPTORS";
const TEST: &str = "ten_thousand_live_blocks_need_no_descriptor_each";
const LIMIT: u64 = 1024;
const BLOCKS: usize = 10_000;

#[test]
fn ten_thousand_live_blocks_need_no_descriptor_each() {
    if std::env::var_os(INSIDE).is_some() {
        return with_few_descriptors();
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the run with {LIMIT} descriptors failed: {status}"
    );
}

fn with_few_descriptors() {
    let limit = libc::rlimit {
        rlim_cur: LIMIT,
        rlim_max: LIMIT,
    };
    // SAFETY: setrlimit reads the struct we pass, which lives on our stack.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let clean = CleanShm::begin();
    let quiet = |config: PoolConfig| {
        ShmPool::with_config(PoolConfig {
            sweep_orphans: false,
            ..config
        })
        .unwrap()
    };
    // The smallest slab threshold: each 4 KiB block is a segment of its own.
    let owner = quiet(PoolConfig {
        slab_threshold: 64,
        ..PoolConfig::default()
    });
    let reader = quiet(PoolConfig::default());
    let blocks: Vec<_> = (0..BLOCKS)
        .map(|i| {
            let mut block = owner.alloc(4096).unwrap();
            block.as_mut_slice().unwrap().fill(i as u8);
            block
        })
        .collect();
    assert!(owner.stats().segments_owned >= BLOCKS);
    let views: Vec<_> = blocks
        .iter()
        .map(|b| reader.attach(&b.to_ref()).unwrap())
        .collect();
    assert_eq!(reader.stats().segments_attached, BLOCKS);
    for (i, view) in views.iter().enumerate() {
        assert!(view.as_slice().iter().all(|&b| b == i as u8), "block {i}");
    }
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        open < 64,
        "{open} descriptors open for {BLOCKS} blocks and as many mappings"
    );
    drop((views, blocks, reader, owner));
    clean.end();
}
