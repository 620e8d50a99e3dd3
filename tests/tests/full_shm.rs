//! A small and full `/dev/shm`, for real: the test re-runs itself in a private mount namespace
//! (`unshare -m`) over a 64 MiB tmpfs of its own — Docker's default — fills it to the last
//! byte, and checks that nothing needs it any more: pools start, a 1 GiB argument reaches the
//! worker, a 1 GiB result and a spilled reply come back, because segments are memfds, which no
//! mount bounds. It needs root (to mount); elsewhere it says it skipped.

use std::io::Write;
use std::process::Command;

use ndarray::Ix1;
use shm_codec::{Serde, ShmArray, ShmArrayMut};
use shm_core::ShmPool;
use shm_tests::CleanShm;
use shm_transport::CalleeExt;
use shm_transport::{Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");
/// Set in the re-run inside the private mount namespace.
const INSIDE: &str = "SHM_TEST_PRIVATE_DEV_SHM";
const TEST: &str = "a_small_full_dev_shm_limits_no_call";

#[test]
fn a_small_full_dev_shm_limits_no_call() {
    if std::env::var_os(INSIDE).is_some() {
        return inside();
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a private /dev/shm needs root");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "mount -t tmpfs -o size=64m shm-test /dev/shm && exec \"$0\" --exact {TEST} \
         --nocapture --test-threads=1"
    );
    let status = match Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .arg(&exe)
        .env(INSIDE, "1")
        .status()
    {
        Ok(status) => status,
        Err(err) => {
            eprintln!("skipped: unshare did not start ({err})");
            return;
        }
    };
    assert!(
        status.success(),
        "the run in a private /dev/shm failed: {status}"
    );
}

/// Fills `/dev/shm` to the last byte; the file goes when the guard is dropped.
struct Filler(std::path::PathBuf);

impl Filler {
    fn fill() -> Self {
        let path = std::path::PathBuf::from("/dev/shm/filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        let mut size = chunk.len();
        while size > 0 {
            match file.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => size /= 2,
                Err(err) => panic!("filling /dev/shm: {err}"),
            }
        }
        assert_eq!(shm_core::shm_available().unwrap(), 0, "/dev/shm is full");
        Filler(path)
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn inside() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("shm-test /dev/shm tmpfs")),
        "not in the private /dev/shm"
    );
    let clean = CleanShm::begin();
    let full = Filler::fill();
    let pool = ShmPool::new().unwrap();
    let worker = Worker::spawn(WorkerConfig::new(WORKER).with_pool(pool.clone())).unwrap();

    // An argument of 1 GiB, sixteen times the mount, written once into a block of the pool.
    let n = 1usize << 27;
    let mut a = ShmArrayMut::<f64, Ix1>::zeros(&pool, n).unwrap();
    a.view_mut().fill(1.0);
    let Serde(sum): Serde<f64> = worker.call("sum", &a.freeze()).unwrap();
    assert_eq!(sum, n as f64);

    // A result of 1 GiB, and a reply too large for a ring slot, which the worker spills.
    let filled: ShmArray<f64, Ix1> = worker.call("fill", &Serde((n, 2.0f64))).unwrap();
    assert_eq!(filled.len(), n);
    assert!(filled.view().iter().step_by(4096).all(|&x| x == 2.0));
    drop(filled);
    let text = ("x".to_owned(), 20_000usize);
    let Serde(long): Serde<String> = worker.call("repeat", &Serde(&text)).unwrap();
    assert_eq!(long.len(), 20_000);

    assert_eq!(
        shm_core::shm_available().unwrap(),
        0,
        "/dev/shm is still full"
    );
    worker.shutdown();
    drop((full, pool));
    clean.end();
}
