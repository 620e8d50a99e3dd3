//! The native half of the Python module `shm` (work in progress): workers spawned and called
//! from Python with payloads as docs/format.md describes them, and blocks of shared memory as
//! read-only Python buffers, so numpy views them without a copy. The Python half
//! (`python/shm/__init__.py`) turns numpy arrays and plain values into payloads and back.

use std::ffi::c_int;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyBufferError, PyException, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use shm_codec::Payload;
use shm_core::{ShmBlock, ShmError};
use shm_transport::{Callee, Lifecycle, RemoteErrorKind, TransportError, Worker, WorkerConfig};

create_exception!(_shm, Error, PyException, "Anything that went wrong in shm.");
create_exception!(
    _shm,
    WorkerDied,
    Error,
    "The worker process ended during or before the call."
);
create_exception!(
    _shm,
    Timeout,
    Error,
    "The call did not finish within its timeout."
);
create_exception!(
    _shm,
    OutOfSharedMemory,
    Error,
    "Shared memory could not be had for a value (here or in the worker)."
);
create_exception!(
    _shm,
    RemoteError,
    Error,
    "The worker failed inside the call; `args` is (message, kind, method)."
);

/// The Python exception for a transport error, with the Rust message.
fn error(err: TransportError) -> PyErr {
    let message = err.to_string();
    match err {
        TransportError::WorkerDied { .. } | TransportError::PoolShutdown { .. } => {
            WorkerDied::new_err(message)
        }
        TransportError::Timeout { .. } => Timeout::new_err(message),
        TransportError::Shm(ShmError::OutOfSharedMemory { .. }) => {
            OutOfSharedMemory::new_err(message)
        }
        TransportError::Remote(remote) => {
            let kind = match remote.kind {
                RemoteErrorKind::Handler => "handler",
                RemoteErrorKind::Panic => "panic",
                RemoteErrorKind::UnknownMethod => "unknown-method",
                RemoteErrorKind::BadArguments => "bad-arguments",
                RemoteErrorKind::BadResult => "bad-result",
                RemoteErrorKind::OutOfSharedMemory { .. } => "out-of-shared-memory",
                _ => "other",
            };
            RemoteError::new_err((remote.message, kind, remote.method))
        }
        _ => Error::new_err(message),
    }
}

/// A block of shared memory, read-only: a Python buffer whose memory lives as long as any
/// view of it (numpy arrays built over it hold this object).
#[pyclass(frozen, module = "shm._shm")]
struct Block {
    block: Arc<ShmBlock>,
}

#[pymethods]
impl Block {
    fn __len__(&self) -> usize {
        self.block.as_slice().len()
    }

    /// The address of the first byte, for tests that check that a view is not a copy.
    fn address(&self) -> usize {
        self.block.as_slice().as_ptr() as usize
    }

    /// # Safety
    /// Called by Python with a `view` to fill; the view holds a reference to this object, so
    /// the block outlives every view.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no view to fill"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "a block of shared memory is read-only once it holds a value",
            ));
        }
        let data = slf.get().block.as_slice();
        // SAFETY: `view` is the non-null buffer Python asked us to fill. The pointer and length
        // describe the block's content, which stays mapped and unwritten while the block lives;
        // `obj` keeps this object, hence the block, alive until Python releases the view.
        unsafe {
            (*view).obj = slf.clone().into_any().into_ptr();
            (*view).buf = data.as_ptr() as *mut _;
            (*view).len = data.len() as ffi::Py_ssize_t;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                &raw mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// How often a thread waiting for a call looks for a signal (Ctrl-C) to handle.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Runs `call` on a thread of its own, without the GIL, while this thread handles signals:
/// when a handler raises (Ctrl-C's `KeyboardInterrupt`), the worker is killed, which ends the
/// call at once, and the exception goes to the caller.
fn interruptible<T: Send>(
    py: Python<'_>,
    worker: &Worker,
    call: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    let done = (Mutex::new(false), Condvar::new());
    std::thread::scope(|scope| {
        let done = &done;
        let thread = scope.spawn(move || {
            let out = call();
            *done.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
            done.1.notify_one();
            out
        });
        let finished = || {
            let flag = done.0.lock().unwrap_or_else(PoisonError::into_inner);
            let (flag, _) = done
                .1
                .wait_timeout_while(flag, SIGNAL_CHECK, |done| !*done)
                .unwrap_or_else(PoisonError::into_inner);
            *flag
        };
        let mut interrupted = None;
        while !py.detach(finished) {
            if let Err(err) = py.check_signals() {
                Lifecycle::cancel(worker);
                interrupted = Some(err);
                break;
            }
        }
        let out = py.detach(|| thread.join());
        match (interrupted, out) {
            (Some(err), _) => Err(err),
            (None, Ok(out)) => Ok(out),
            (None, Err(_)) => Err(Error::new_err("the call panicked")),
        }
    })
}

/// A reply as the Python half reads it: codec, metadata, inline bytes, and its data block.
type RawReply = (String, Py<PyBytes>, Py<PyBytes>, Option<Py<Block>>);

/// A worker process and the channel to it.
#[pyclass(frozen, module = "shm._shm")]
struct RawWorker {
    /// Locked only to clone or take the worker, never across a wait: a thread holding the GIL
    /// may wait for this lock, so its holder must never wait for the GIL.
    worker: Mutex<Option<Arc<Worker>>>,
}

impl RawWorker {
    /// The worker, unless it was closed.
    fn worker(&self) -> PyResult<Arc<Worker>> {
        self.worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::new_err("the worker is closed"))
    }
}

#[pymethods]
impl RawWorker {
    #[new]
    #[pyo3(signature = (argv, untrusted = false))]
    fn new(py: Python<'_>, argv: Vec<String>, untrusted: bool) -> PyResult<Self> {
        let Some((program, args)) = argv.split_first() else {
            return Err(PyValueError::new_err("argv names no program"));
        };
        let config = WorkerConfig::new(program)
            .with_args(args.iter().cloned())
            .with_untrusted(untrusted);
        let worker = py.detach(|| Worker::spawn(config)).map_err(error)?;
        Ok(RawWorker {
            worker: Mutex::new(Some(Arc::new(worker))),
        })
    }

    /// Calls `method` with a payload (`data`, any buffer, is copied into one fresh block) and
    /// returns the reply's codec, metadata, inline bytes and block.
    #[pyo3(signature = (method, codec, meta, inline, data = None, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        py: Python<'_>,
        method: &str,
        codec: &str,
        meta: Vec<u8>,
        inline: Vec<u8>,
        data: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<RawReply> {
        let worker = &*self.worker()?;
        let blocks = match data {
            None => Vec::new(),
            Some(data) => {
                let buffer = PyBuffer::<u8>::get(data)?;
                let mut block = worker
                    .shm_pool()
                    .alloc(buffer.len_bytes())
                    .map_err(|e| error(e.into()))?;
                buffer.copy_to_slice(py, block.as_mut_slice())?;
                vec![block.freeze()]
            }
        };
        let timeout = timeout
            .map(Duration::try_from_secs_f64)
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("timeout: {e}")))?;
        let args = Payload::new(codec, meta, blocks, inline);
        let reply = interruptible(py, worker, || {
            let mut reply = None;
            worker
                .call_with(method, args, timeout, &mut |payload, decoder| {
                    let block = match payload.buffers() {
                        [] => None,
                        [only] => Some(decoder.attach(only)?),
                        more => {
                            return Err(TransportError::Malformed {
                                what: format!(
                                    "a reply of {} blocks; this module reads one",
                                    more.len()
                                ),
                            });
                        }
                    };
                    reply = Some((
                        payload.codec.to_string(),
                        payload.meta.clone(),
                        payload.inline.clone(),
                        block,
                    ));
                    Ok(())
                })
                .map(|()| reply)
        })?;
        let (codec, meta, inline, block) = reply
            .map_err(error)?
            .ok_or_else(|| Error::new_err("the call returned without a reply"))?;
        Ok((
            codec,
            PyBytes::new(py, &meta).unbind(),
            PyBytes::new(py, &inline).unbind(),
            block
                .map(|block| Py::new(py, Block { block }))
                .transpose()?,
        ))
    }

    /// Starts the worker again if it died.
    fn restart(&self, py: Python<'_>) -> PyResult<()> {
        let worker = self.worker()?;
        py.detach(|| worker.restart()).map_err(error)
    }

    /// Kills the worker at once: calls under way raise `WorkerDied`.
    fn kill(&self) {
        if let Ok(worker) = self.worker() {
            Lifecycle::cancel(&*worker);
        }
    }

    /// The worker's process id.
    fn pid(&self) -> PyResult<u32> {
        Ok(self.worker()?.pid())
    }

    /// Asks the worker to exit (killing it after its grace period); later calls raise. Calls
    /// still under way on other threads end at once with `WorkerDied`: the worker is killed, and
    /// the last of them lets go of it.
    fn close(&self, py: Python<'_>) {
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match worker.map(Arc::try_unwrap) {
            None => {}
            Some(Ok(worker)) => py.detach(|| worker.shutdown()),
            Some(Err(shared)) => Lifecycle::cancel(&*shared),
        }
    }
}

#[pymodule]
fn _shm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Block>()?;
    m.add_class::<RawWorker>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("WorkerDied", py.get_type::<WorkerDied>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("OutOfSharedMemory", py.get_type::<OutOfSharedMemory>())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    Ok(())
}
