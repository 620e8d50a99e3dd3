//! shm-core across real processes: round trips both ways over a segment link, a killed peer
//! leaving nothing behind, and a peer that cannot change what it was sent.

use shm_core::{ShmPool, ShmRef};
use shm_tests::{ChildProcess, CleanShm, fill_pattern, pattern_mismatch, shm_listing};

const CHILD: &str = env!("CARGO_BIN_EXE_shm-test-child");

#[test]
fn a_child_reads_what_the_parent_wrote() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    for size in [0, 1, 1000, 64 << 10, (64 << 10) + 1, 32 << 20] {
        let mut block = pool.alloc(size).unwrap();
        fill_pattern(block.as_mut_slice(), 7);
        let block = block.freeze();
        let hex = block.to_ref().to_hex();
        let (mut child, _link) = ChildProcess::spawn_linked(CHILD, &["read", &hex, "7"], &[&block]);
        assert_eq!(child.read_line(), format!("ok {size}"), "size {size}");
        child.finish();
    }
    drop(pool);
    clean.end();
}

#[test]
fn the_parent_reads_what_a_child_wrote_even_after_the_child_is_gone() {
    let clean = CleanShm::begin();
    for size in [0, 100, 5 << 20] {
        let (mut child, link) =
            ChildProcess::spawn_linked(CHILD, &["write", &size.to_string(), "3"], &[]);
        let r = ShmRef::from_hex(&child.read_line()).unwrap();
        let block = link.attach(&r).unwrap();
        assert_eq!(block.len(), size);
        assert_eq!(
            shm_listing(),
            clean.before(),
            "a segment appeared in /dev/shm"
        );
        child.finish();
        // The memory lives for as long as anyone maps it, its creator gone or not.
        assert_eq!(pattern_mismatch(block.as_slice(), 3), None);
        assert_eq!(link.received_count(), 1);
    }
    clean.end();
}

#[test]
fn a_killed_child_leaves_nothing_behind_and_its_memory_stays_readable_while_mapped() {
    let clean = CleanShm::begin();
    let (mut victim, link) = ChildProcess::spawn_linked(CHILD, &["hold", "3000000"], &[]);
    let r = ShmRef::from_hex(&victim.read_line()).unwrap();
    let view = link.attach(&r).unwrap();
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    assert_eq!(pattern_mismatch(view.as_slice(), 1), None);
    // Nothing to sweep: the child's segment is gone from everywhere once this mapping is.
    drop(view);
    link.forget_received();
    assert_eq!(link.received_count(), 0);
    clean.end();
}

#[test]
fn a_peer_that_opens_our_segments_through_proc_can_change_none_of_them() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let mut blocks = Vec::new();
    for size in [100, 1 << 20] {
        let mut block = pool.alloc(size).unwrap();
        fill_pattern(block.as_mut_slice(), 9);
        blocks.push(block);
    }
    let pid = std::process::id().to_string();
    let mut child = ChildProcess::spawn(CHILD, &["attack", &pid]);
    let line = child.read_line();
    child.finish();
    let (refused, tried) = line
        .strip_prefix("refused ")
        .and_then(|rest| rest.split_once(" of "))
        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("unexpected answer {line:?}"));
    assert!(
        tried >= 10,
        "the child found {tried} attempts to make: {line}"
    );
    assert_eq!(refused, tried, "{line}");
    for block in &blocks {
        assert_eq!(pattern_mismatch(block.as_slice(), 9), None);
    }
    drop((blocks, pool));
    clean.end();
}
