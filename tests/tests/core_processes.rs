//! shm-core across real processes: round trips both ways, and the orphan sweep after SIGKILL.

use shm_core::{ShmPool, ShmRef, list_segments, sweep_orphans};
use shm_tests::{ChildProcess, CleanShm, fill_pattern, pattern_mismatch};

const CHILD: &str = env!("CARGO_BIN_EXE_shm-test-child");

#[test]
fn a_child_reads_what_the_parent_wrote() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    for size in [0, 1, 1000, 64 << 10, (64 << 10) + 1, 32 << 20] {
        let mut block = pool.alloc(size).unwrap();
        fill_pattern(block.as_mut_slice().unwrap(), 7);
        let mut child = ChildProcess::spawn(CHILD, &["read", &block.to_ref().to_hex(), "7"]);
        assert_eq!(child.read_line(), format!("ok {size}"), "size {size}");
        child.finish();
    }
    drop(pool);
    clean.end();
}

#[test]
fn the_parent_reads_what_a_child_wrote() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    for size in [0, 100, 5 << 20] {
        let mut child = ChildProcess::spawn(CHILD, &["write", &size.to_string(), "3"]);
        let r = ShmRef::from_hex(&child.read_line()).unwrap();
        let block = pool.attach(&r).unwrap();
        assert_eq!(block.len(), size);
        assert_eq!(pattern_mismatch(block.as_slice(), 3), None);
        drop(block);
        child.finish();
        // The child's pool unlinked its segment when it exited.
        assert!(
            list_segments().unwrap().iter().all(|s| s.name != r.name),
            "{} outlived its owner",
            r.name
        );
    }
    drop(pool);
    clean.end();
}

#[test]
fn the_segments_of_a_killed_child_are_swept_and_live_ones_are_not() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let mine = pool.alloc(2 << 20).unwrap();

    let mut victim = ChildProcess::spawn(CHILD, &["hold", "3000000"]);
    let victim_session = victim.read_line();
    let victim_ref = ShmRef::from_hex(&victim.read_line()).unwrap();
    let mut survivor = ChildProcess::spawn(CHILD, &["hold", "100"]);
    let survivor_session = survivor.read_line();
    let survivor_ref = ShmRef::from_hex(&survivor.read_line()).unwrap();

    let sessions_of = |session: &str| {
        list_segments()
            .unwrap()
            .into_iter()
            .filter(|s| s.session.to_string() == session)
            .count()
    };
    assert_eq!(sessions_of(&victim_session), 1);

    // While everyone is alive, the sweep touches nothing.
    let report = sweep_orphans().unwrap();
    assert!(
        report
            .sessions
            .iter()
            .all(|s| s.to_string() != victim_session
                && s.to_string() != survivor_session
                && *s != pool.session()),
        "a live session was swept: {report:?}"
    );
    assert_eq!(sessions_of(&victim_session), 1);

    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    assert_eq!(
        sessions_of(&victim_session),
        1,
        "a killed process cannot clean up"
    );

    let report = sweep_orphans().unwrap();
    assert!(
        report
            .sessions
            .iter()
            .any(|s| s.to_string() == victim_session),
        "{report:?}"
    );
    assert_eq!(sessions_of(&victim_session), 0);
    assert!(report.bytes >= victim_ref.size);
    assert!(matches!(
        pool.attach(&victim_ref),
        Err(shm_core::ShmError::SegmentNotFound { .. })
    ));

    // The live sessions kept everything.
    assert_eq!(sessions_of(&survivor_session), 1);
    assert_eq!(pool.attach(&survivor_ref).unwrap().len(), 100);
    assert_eq!(pool.attach(&mine.to_ref()).unwrap().len(), 2 << 20);

    survivor.child.kill().unwrap();
    survivor.child.wait().unwrap();
    drop(mine);
    drop(pool);
    sweep_orphans().unwrap();
    clean.end();
}

#[test]
fn the_truncation_guard_leaves_other_sigbus_faults_fatal() {
    use std::os::unix::process::ExitStatusExt;
    let clean = CleanShm::begin();
    let output = std::process::Command::new(CHILD)
        .arg("sigbus-elsewhere")
        .output()
        .unwrap();
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGBUS),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    clean.end();
}
