//! Descriptors under a low limit: a segment costs its creator one descriptor (kept to send it
//! to peers) and its receivers none (each maps it and closes what it received). With the
//! common limit of 1,024, a pool holds 900 live segments of its own and a link end maps all of
//! them; past the limit, creating one more is `TooManyDescriptors`, never a crash, and the pool
//! works again once it lets go of some. The test re-runs itself with the limit lowered, so
//! that the other tests keep theirs.

use std::process::Command;

use shm_core::{PoolConfig, SegmentLink, ShmError, ShmPool};
use shm_tests::CleanShm;

/// Set in the re-run with the lowered limit.
const INSIDE: &str = "SHM_TEST_FEW_DESCRIPTORS";
const TEST: &str = "segments_cost_their_creator_a_descriptor_and_their_receivers_none";
const LIMIT: u64 = 1024;
const BLOCKS: usize = 900;

#[test]
fn segments_cost_their_creator_a_descriptor_and_their_receivers_none() {
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
    let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let at_start = open();
    // The smallest slab threshold: each 4 KiB block is a segment of its own.
    let owner = ShmPool::with_config(PoolConfig::default().with_slab_threshold(64)).unwrap();
    let (sender, receiver) = SegmentLink::pair().unwrap();
    let receiver = SegmentLink::from_fd(receiver).unwrap();
    // Each descriptor is taken as soon as it is sent, as a peer resolving references does.
    let (blocks, views): (Vec<_>, Vec<_>) = (0..BLOCKS)
        .map(|i| {
            let mut block = owner.alloc(4096).unwrap();
            block.as_mut_slice().fill(i as u8);
            let block = block.freeze();
            sender.offer(&block, None).unwrap();
            let view = receiver.attach(&block.to_ref()).unwrap();
            (block, view)
        })
        .unzip();
    assert!(owner.stats().segments_owned >= BLOCKS);
    assert_eq!(receiver.received_count(), BLOCKS);
    for (i, view) in views.iter().enumerate() {
        assert!(view.as_slice().iter().all(|&b| b == i as u8), "block {i}");
    }
    let held = open() - at_start;
    assert!(
        (BLOCKS..BLOCKS + 16).contains(&held),
        "{held} descriptors for {BLOCKS} segments and as many mappings of them"
    );
    // Past the limit: a typed error.
    let mut more = Vec::new();
    let refused = loop {
        match owner.alloc(4096) {
            Ok(block) => more.push(block),
            Err(err) => break err,
        }
        assert!(more.len() < LIMIT as usize, "the limit was never met");
    };
    assert!(
        matches!(refused, ShmError::TooManyDescriptors { .. }),
        "{refused:?}"
    );
    // Letting go gives the descriptors back.
    drop((views, blocks, more));
    owner.trim();
    receiver.forget_received();
    assert!(
        open() < at_start + 16,
        "{} descriptors left",
        open() - at_start
    );
    owner.alloc(4096).unwrap();
    drop((sender, receiver, owner));
    clean.end();
}
