//! Another user on the same host: files planted in `/dev/shm` under our names, and another
//! user's live pool, must never make our pools or workers fail, and the sweep of named
//! leftovers (`shm gc`) must leave what is not its user's alone. As root, the test plants
//! them, then re-runs itself as `nobody` (uid 65534), which must create pools, spawn a worker
//! and call it, with the sweep reporting what it skipped. Elsewhere it says it skipped.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use shm_codec::Serde;
use shm_core::ShmPool;
use shm_transport::{CalleeExt, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");
/// Set in the re-run as the other user.
const INSIDE: &str = "SHM_TEST_AS_OTHER_USER";
const TEST: &str = "planted_files_and_other_users_sessions_never_make_our_pools_fail";
const NOBODY: u32 = 65534;
/// Names of a session that looks dead: a lock nobody holds, and a segment of it.
const PLANTED: [&str; 2] = [
    "/dev/shm/shm-00000000-lock",
    "/dev/shm/shm-00000000-0000000000000000",
];

#[test]
fn planted_files_and_other_users_sessions_never_make_our_pools_fail() {
    if std::env::var_os(INSIDE).is_some() {
        return as_the_other_user();
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: running a second user needs root");
        return;
    }
    for path in PLANTED {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap();
    }
    // A live pool of this user (root), with a block in it: a memfd that no name reaches.
    let pool = ShmPool::new().unwrap();
    let mut mine = pool.alloc(1 << 20).unwrap();
    mine.as_mut_slice().fill(5);
    let outcome = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .uid(NOBODY)
        .gid(NOBODY)
        .status();
    let left_alone =
        PLANTED.iter().all(|p| Path::new(p).exists()) && mine.as_slice().iter().all(|&b| b == 5);
    for path in PLANTED {
        let _ = std::fs::remove_file(path);
    }
    drop((mine, pool));
    match outcome {
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: uid {NOBODY} may not run the test binary ({err})");
        }
        outcome => {
            let status = outcome.unwrap();
            assert!(status.success(), "the run as uid {NOBODY} failed: {status}");
            assert!(
                left_alone,
                "the other user's sweep removed files it does not own"
            );
        }
    }
}

fn as_the_other_user() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, NOBODY);
    let report = shm_core::sweep_orphans().unwrap();
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.contains("shm-00000000-lock")),
        "the planted lock was not reported: {report:?}"
    );
    let pool = ShmPool::new().unwrap();
    let mut block = pool.alloc(100_000).unwrap();
    block.as_mut_slice().fill(3);
    let worker = Worker::spawn(WorkerConfig::new(WORKER)).unwrap();
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(11u64)).unwrap();
    assert_eq!(x, 11);
    worker.shutdown();
    drop((block, pool));
}
