//! A full `/dev/shm`, for real: the test re-runs itself in a private mount namespace
//! (`unshare -m`) over a 16 MiB tmpfs of its own, fills it, and checks that every place that
//! needs shared memory says `OutOfSharedMemory` with the numbers — pool creation, an argument,
//! a reply spilled by the worker — and that both processes live on. It needs root (to mount);
//! elsewhere it says it skipped.

use std::io::Write;
use std::process::Command;

use ndarray::Array1;
use shm_core::{ShmError, ShmPool};
use shm_tests::CleanShm;
use shm_transport::{TransportError, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");
/// Set in the re-run inside the private mount namespace.
const INSIDE: &str = "SHM_TEST_PRIVATE_DEV_SHM";
const TEST: &str = "a_full_dev_shm_is_out_of_shared_memory_everywhere_and_both_processes_live";

#[test]
fn a_full_dev_shm_is_out_of_shared_memory_everywhere_and_both_processes_live() {
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
        "mount -t tmpfs -o size=16m shm-test /dev/shm && exec \"$0\" --exact {TEST} \
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

    // A pool cannot even record its session.
    let full = Filler::fill();
    match ShmPool::new() {
        Err(ShmError::OutOfSharedMemory { available, .. }) => assert_eq!(available, 0),
        other => panic!("expected OutOfSharedMemory from ShmPool::new, got {other:?}"),
    }
    drop(full);

    let worker = Worker::spawn(WorkerConfig::new(WORKER)).unwrap();
    let full = Filler::fill();

    // An argument the parent cannot place.
    let a = Array1::from_elem(1 << 17, 1.0f64);
    match worker.call::<_, shm_codec::Serde<f64>>("sum", &a) {
        Err(TransportError::Codec(shm_codec::CodecError::Shm(ShmError::OutOfSharedMemory {
            requested,
            available,
        }))) => assert!(requested >= 1 << 20 && available < requested),
        other => panic!("expected OutOfSharedMemory for the argument, got {other:?}"),
    }

    // A reply too large for a ring slot, which the worker cannot spill.
    let text = ("x".to_owned(), 20_000usize);
    match worker.call::<_, shm_codec::Serde<String>>("repeat", &shm_codec::Serde(&text)) {
        Err(TransportError::Shm(ShmError::OutOfSharedMemory {
            requested,
            available,
        })) => assert!(requested >= 20_000 && available < requested),
        other => panic!("expected OutOfSharedMemory for the reply, got {other:?}"),
    }

    // Both live on, and everything works again once there is room.
    let shm_codec::Serde(x): shm_codec::Serde<u64> =
        worker.call("echo", &shm_codec::Serde(7u64)).unwrap();
    assert_eq!(x, 7);
    drop(full);
    let shm_codec::Serde(long): shm_codec::Serde<String> =
        worker.call("repeat", &shm_codec::Serde(&text)).unwrap();
    assert_eq!(long.len(), 20_000);
    let shm_codec::Serde(sum): shm_codec::Serde<f64> = worker.call("sum", &a).unwrap();
    assert_eq!(sum, (1 << 17) as f64);
    worker.shutdown();
    clean.end();
}
