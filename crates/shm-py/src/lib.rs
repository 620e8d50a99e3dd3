//! The native half of the Python module `shm`: workers and pools of them spawned and called
//! from Python, a Python program served as a worker, with payloads as docs/format.md describes
//! them, and blocks of shared memory as Python buffers (read-only once they hold a value), so
//! numpy views them without a copy. The Python half (`python/shm/__init__.py`) turns numpy
//! arrays and plain values into payloads and back.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use arrow::array::{Array, RecordBatch, RecordBatchOptions, StructArray};
use arrow::datatypes::{DataType, Schema};
use arrow::error::ArrowError;
use arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyTypeError;
use pyo3::exceptions::{PyBufferError, PyException, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyCapsuleMethods, PyTuple};
use shm_arrow::ColumnFrame;
use shm_codec::{Attacher, Decode, Decoder, Encoder, Payload};
use shm_core::{ShmBlock, ShmBlockMut, ShmError, ShmPool, ShmRef};
use shm_transport::{
    Callee, CalleeExt, Context, Lifecycle, RemoteError as Remote, RemoteErrorKind, Router,
    ShutdownMode, TransportError, Worker, WorkerConfig, WorkerPool,
};

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
create_exception!(
    _shm,
    BadArguments,
    Error,
    "Raised by a served handler's decoding: the caller sends a RemoteError of kind \
     \"bad-arguments\"."
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

fn shm_error(err: ShmError) -> PyErr {
    error(TransportError::Shm(err))
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

    /// Where the block is: its segment's name and its offset in it, as a reference names it.
    fn location(&self) -> (String, usize) {
        (self.block.name().to_owned(), self.block.offset())
    }

    /// # Safety
    /// Called by Python with a `view` to fill; the view holds a reference to this object, so
    /// the block outlives every view.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let data = slf.get().block.as_slice();
        let (data, len) = (data.as_ptr(), data.len());
        let refusal = "a block of shared memory is read-only once it holds a value";
        // SAFETY: `view` is the buffer Python asked us to fill; the block's content stays
        // mapped and unwritten while the block lives, and the view holds this object.
        unsafe { fill_view(slf.into_any(), view, flags, data, len, Some(refusal)) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Fills `view` with the `len` bytes at `data`, owned by `owner`, which the view holds.
/// `read_only` refuses a writable view with that message; without it the view is writable.
///
/// # Safety
/// `view` must be a buffer Python asked `owner` to fill (it may be null: that is refused), and
/// `data..data + len` must stay mapped while `owner` lives (and unwritten by anyone, if
/// `read_only`).
unsafe fn fill_view(
    owner: Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    flags: c_int,
    data: *const u8,
    len: usize,
    read_only: Option<&str>,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("no view to fill"));
    }
    if let Some(refusal) = read_only
        && flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE
    {
        return Err(PyBufferError::new_err(refusal.to_owned()));
    }
    // SAFETY: the caller's promises; `obj` takes a reference to `owner`, which Python
    // releases with the view.
    unsafe {
        (*view).obj = owner.into_ptr();
        (*view).buf = data as *mut _;
        (*view).len = len as ffi::Py_ssize_t;
        (*view).readonly = c_int::from(read_only.is_some());
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

/// A block of shared memory to write a value into in place (`Worker.empty` makes one): a
/// writable Python buffer until the block is first sent, read-only from then on. Sending it
/// freezes it, as `ShmArrayMut::freeze` does in Rust: new views are read-only, and the Python
/// half marks the array it sent read-only; a view taken before and written after is the
/// caller's race with the reader, as with any shared memory.
#[pyclass(frozen, module = "shm._shm")]
struct BlockMut {
    /// The block while it is written; taken out when it is frozen.
    writable: Mutex<Option<ShmBlockMut>>,
    frozen: std::sync::OnceLock<Arc<ShmBlock>>,
    /// Where its bytes are, which freezing does not move.
    data: *mut u8,
    len: usize,
    location: (String, usize),
}

// SAFETY: `data` points into the block's mapping, which lives as long as `writable` or
// `frozen` holds the block; those are `Send + Sync`, and the pointer is only handed to Python's
// buffer protocol, whose users synchronise their own writes.
unsafe impl Send for BlockMut {}
// SAFETY: as for `Send`.
unsafe impl Sync for BlockMut {}

impl BlockMut {
    fn new(mut block: ShmBlockMut) -> Self {
        BlockMut {
            data: block.as_mut_ptr(),
            len: block.len(),
            location: (block.name().to_owned(), block.offset()),
            writable: Mutex::new(Some(block)),
            frozen: std::sync::OnceLock::new(),
        }
    }

    /// The block, frozen: once, on the first send.
    fn freeze(&self) -> PyResult<Arc<ShmBlock>> {
        let mut writable = self.writable.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(block) = writable.take() {
            let _ = self.frozen.set(block.freeze());
        }
        self.frozen
            .get()
            .cloned()
            .ok_or_else(|| Error::new_err("a block neither writable nor frozen"))
    }
}

#[pymethods]
impl BlockMut {
    fn __len__(&self) -> usize {
        self.len
    }

    /// The address of the first byte.
    fn address(&self) -> usize {
        self.data as usize
    }

    /// Where the block is: its segment's name and its offset in it, as a reference names it.
    fn location(&self) -> (String, usize) {
        self.location.clone()
    }

    /// Whether it was sent, and so can no longer be written through new views.
    fn frozen(&self) -> bool {
        self.frozen.get().is_some()
    }

    /// # Safety
    /// Called by Python with a `view` to fill; the view holds a reference to this object, so
    /// the block outlives every view.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (data, len) = (slf.get().data, slf.get().len);
        let refusal = "this block was sent, so it is read-only: make a new one to write";
        let read_only = slf.get().frozen().then_some(refusal);
        // SAFETY: `view` is the buffer Python asked us to fill; the block's mapping lives while
        // this object does, and the view holds it. A writable view is given only before the
        // block is frozen.
        unsafe { fill_view(slf.into_any(), view, flags, data, len, read_only) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// The blocks of a payload the Python half describes: a `Block` is sent as it is, a `BlockMut`
/// frozen and sent without a copy, any other buffer copied into one fresh block of `pool`.
fn blocks_of(
    py: Python<'_>,
    pool: &ShmPool,
    data: &[Bound<'_, PyAny>],
) -> PyResult<Vec<Arc<ShmBlock>>> {
    data.iter()
        .map(|data| {
            if let Ok(block) = data.cast::<Block>() {
                return Ok(Arc::clone(&block.get().block));
            }
            if let Ok(block) = data.cast::<BlockMut>() {
                return block.get().freeze();
            }
            let buffer = PyBuffer::<u8>::get(data)?;
            let mut block = pool.alloc(buffer.len_bytes()).map_err(shm_error)?;
            buffer.copy_to_slice(py, block.as_mut_slice())?;
            Ok(block.freeze())
        })
        .collect()
}

/// A payload as the Python half reads it: codec, metadata, inline bytes, and its blocks.
type RawPayload = (String, Py<PyBytes>, Py<PyBytes>, Vec<Py<Block>>);

/// A payload that arrived, with its blocks attached.
struct Arrived {
    codec: String,
    meta: Vec<u8>,
    inline: Vec<u8>,
    blocks: Vec<Arc<ShmBlock>>,
}

impl Decode for Arrived {
    /// Attaches the payload's blocks and keeps the rest as it came: the Python half decodes.
    fn decode(payload: &Payload, decoder: &Decoder) -> shm_codec::Result<Self> {
        Ok(Arrived {
            codec: payload.codec.to_string(),
            meta: payload.meta.clone(),
            inline: payload.inline.clone(),
            blocks: payload
                .buffers()
                .iter()
                .map(|r| decoder.attach(r))
                .collect::<shm_codec::Result<_>>()?,
        })
    }
}

impl Arrived {
    fn into_py(self, py: Python<'_>) -> PyResult<RawPayload> {
        Ok((
            self.codec,
            PyBytes::new(py, &self.meta).unbind(),
            PyBytes::new(py, &self.inline).unbind(),
            self.blocks
                .into_iter()
                .map(|block| Py::new(py, Block { block }))
                .collect::<PyResult<_>>()?,
        ))
    }
}

// --- Arrow: pyarrow batches as `arrow-columns` payloads, through the C data interface ----------

/// Attaches the blocks a payload's references name from blocks already attached (the Python
/// half holds them).
struct Listed(HashMap<ShmRef, Arc<ShmBlock>>);

impl Attacher for Listed {
    fn attach(&self, _pool: &ShmPool, r: &ShmRef) -> shm_core::Result<Arc<ShmBlock>> {
        self.0
            .get(r)
            .cloned()
            .ok_or_else(|| ShmError::SegmentNotFound {
                name: r.name.clone(),
            })
    }
}

/// A pyarrow `RecordBatch` (anything with `__arrow_c_array__` that exports a struct array
/// without nulls) encoded as an `arrow-columns` payload into `pool`: its buffers are copied
/// once, except those that already lie in a block of shared memory.
fn arrow_encode(py: Python<'_>, pool: &ShmPool, batch: &Bound<'_, PyAny>) -> PyResult<RawPayload> {
    let capsules = batch.call_method0("__arrow_c_array__")?;
    let (schema, array): (Bound<'_, PyCapsule>, Bound<'_, PyCapsule>) = capsules.extract()?;
    let schema = schema
        .pointer_checked(Some(c"arrow_schema"))?
        .cast::<FFI_ArrowSchema>();
    let array = array
        .pointer_checked(Some(c"arrow_array"))?
        .cast::<FFI_ArrowArray>();
    // SAFETY: the capsules hold an exported schema and array, as the Arrow PyCapsule interface
    // says (checked by their names). `from_raw` moves the array out and marks the capsule's
    // released, so it is released once, by us; the schema stays the capsule's, borrowed here
    // while the capsule lives.
    let (data, schema) = unsafe {
        let array = FFI_ArrowArray::from_raw(array.as_ptr());
        let schema = schema.as_ref();
        (from_ffi(array, schema), Schema::try_from(schema))
    };
    let arrow_error = |e: ArrowError| PyValueError::new_err(format!("a pyarrow batch: {e}"));
    let data = data.map_err(arrow_error)?;
    data.validate_full().map_err(arrow_error)?;
    if !matches!(data.data_type(), DataType::Struct(_)) || data.null_count() != 0 {
        return Err(PyTypeError::new_err(format!(
            "a RecordBatch exports a struct array without nulls, not {}",
            data.data_type()
        )));
    }
    let rows = data.len();
    let (_, columns, _) = StructArray::from(data).into_parts();
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    let batch = RecordBatch::try_new_with_options(
        Arc::new(schema.map_err(arrow_error)?),
        columns,
        &options,
    )
    .map_err(arrow_error)?;
    let mut payload = py
        .detach(|| Encoder::new(pool.clone()).encode(&ColumnFrame(batch)))
        .map_err(|e| error(e.into()))?;
    let blocks = payload.take_blocks();
    Arrived {
        codec: payload.codec.to_string(),
        meta: payload.meta,
        inline: payload.inline,
        blocks,
    }
    .into_py(py)
}

/// The pyarrow `RecordBatch` of an `arrow-columns` payload whose blocks the Python half holds,
/// zero-copy: its buffers are the blocks' memory, which lives as long as the batch. With
/// `copy_invariants`, a peer's offsets, strings and the like are copied before Arrow's
/// validation checks them, so the peer cannot change them afterwards.
fn arrow_decode(
    py: Python<'_>,
    pool: &ShmPool,
    copy_invariants: bool,
    (codec, meta, inline, blocks): (String, Vec<u8>, Vec<u8>, Vec<Py<Block>>),
) -> PyResult<Py<PyAny>> {
    let blocks: Vec<Arc<ShmBlock>> = blocks
        .iter()
        .map(|block| Arc::clone(&block.get().block))
        .collect();
    let listed = blocks.iter().map(|b| (b.to_ref(), Arc::clone(b))).collect();
    let payload = Payload::new(codec, meta, blocks, inline);
    let decoder = Decoder::with_attacher(pool.clone(), Arc::new(Listed(listed)))
        .copying_invariants(copy_invariants);
    let ColumnFrame(batch) = py
        .detach(|| ColumnFrame::decode(&payload, &decoder))
        .map_err(|e| Error::new_err(format!("an arrow-columns payload: {e}")))?;
    let schema = FFI_ArrowSchema::try_from(batch.schema().as_ref())
        .map_err(|e| Error::new_err(format!("exporting a schema: {e}")))?;
    let array = FFI_ArrowArray::new(&StructArray::from(batch).into_data());
    // pyarrow moves each struct out of its capsule; what it leaves (released) is dropped with
    // the capsule.
    let schema = PyCapsule::new(py, schema, Some(c"arrow_schema".to_owned()))?;
    let array = PyCapsule::new(py, array, Some(c"arrow_array".to_owned()))?;
    let pyarrow = py.import("pyarrow")?;
    Ok(pyarrow
        .getattr("RecordBatch")?
        .call_method1("_import_from_c_capsule", (schema, array))?
        .unbind())
}

/// How often a thread waiting for a call looks for a signal (Ctrl-C) to handle.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// How long a waiting side spins before it sleeps: a small call is over by then, and neither
/// side pays for a wake-up.
const SPIN: Duration = Duration::from_micros(100);

/// Whether this is the process's main thread, the only one on which Python runs signal
/// handlers.
fn on_main_thread() -> bool {
    // SAFETY: gettid and getpid take no arguments and cannot fail.
    unsafe { libc::gettid() == libc::getpid() }
}

/// A call's result, handed from the thread that made it to the one waiting for it.
struct Done<T> {
    ready: std::sync::atomic::AtomicBool,
    value: Mutex<Option<std::thread::Result<T>>>,
    woken: Condvar,
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread that makes the calls of a worker's Python main thread, so that the main thread
/// can handle signals meanwhile. Started with the first such call; it ends when its worker is
/// dropped. Between calls it spins for [`SPIN`], then sleeps.
#[derive(Default)]
struct Helper {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

impl Helper {
    fn submit(&self, job: Job) -> PyResult<()> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match jobs.as_ref() {
            Some(sender) => match sender.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (a job panicked past its guard): start another.
                Err(unsent) => unsent.0,
            },
            None => job,
        };
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("shm-py-call".into())
            .spawn(move || {
                loop {
                    let spinning = std::time::Instant::now();
                    let job = loop {
                        match receiver.try_recv() {
                            Ok(job) => break Some(job),
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                            Err(std::sync::mpsc::TryRecvError::Empty)
                                if spinning.elapsed() < SPIN =>
                            {
                                std::hint::spin_loop();
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => {
                                break receiver.recv().ok();
                            }
                        }
                    };
                    match job {
                        Some(job) => job(),
                        None => return,
                    }
                }
            })
            .map_err(|e| {
                Error::new_err(format!("starting the thread that waits for calls: {e}"))
            })?;
        sender
            .send(job)
            .map_err(|_| Error::new_err("the thread that waits for calls ended"))?;
        *jobs = Some(sender);
        Ok(())
    }

    /// Runs `call` without the GIL. On the main thread, the call is made on the helper thread
    /// while this one handles signals: when a handler raises (Ctrl-C's `KeyboardInterrupt`),
    /// `cancel` ends the call at once (it kills the worker) and the exception goes to the
    /// caller. Other threads make the call themselves: Python handles signals on the main
    /// thread only.
    fn run<T: Send + 'static>(
        &self,
        py: Python<'_>,
        cancel: impl Fn(),
        call: impl FnOnce() -> T + Send + 'static,
    ) -> PyResult<T> {
        if !on_main_thread() {
            return Ok(py.detach(call));
        }
        let done = Arc::new(Done {
            ready: std::sync::atomic::AtomicBool::new(false),
            value: Mutex::new(None),
            woken: Condvar::new(),
        });
        let job = {
            let done = Arc::clone(&done);
            Box::new(move || {
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
                let mut value = done.value.lock().unwrap_or_else(PoisonError::into_inner);
                *value = Some(out);
                done.ready.store(true, std::sync::atomic::Ordering::Release);
                done.woken.notify_one();
            })
        };
        self.submit(job)?;
        let finished = |wait: Duration| {
            let spinning = std::time::Instant::now();
            while spinning.elapsed() < SPIN {
                if done.ready.load(std::sync::atomic::Ordering::Acquire) {
                    return true;
                }
                std::thread::yield_now();
            }
            let value = done.value.lock().unwrap_or_else(PoisonError::into_inner);
            let (value, _) = done
                .woken
                .wait_timeout_while(value, wait, |value| value.is_none())
                .unwrap_or_else(PoisonError::into_inner);
            value.is_some()
        };
        while !py.detach(|| finished(SIGNAL_CHECK)) {
            if let Err(err) = py.check_signals() {
                // The call ends at once now; its result, if any, is dropped by the helper.
                cancel();
                return Err(err);
            }
        }
        let out = done
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match out {
            Some(Ok(out)) => Ok(out),
            _ => Err(Error::new_err("the call panicked")),
        }
    }
}

/// What a `RawWorker` calls: one worker process, or a pool of them.
enum Target {
    Worker(Worker),
    Pool(WorkerPool),
}

impl Target {
    fn callee(&self) -> &dyn Callee {
        match self {
            Target::Worker(worker) => worker,
            Target::Pool(pool) => pool,
        }
    }

    /// Ends the calls under way at once: kills the worker, or the pool's workers that are
    /// busy (the pool restarts them).
    fn cancel(&self) {
        match self {
            Target::Worker(worker) => Lifecycle::cancel(worker),
            Target::Pool(pool) => pool.cancel_in_flight(),
        }
    }

    fn shutdown(self) {
        match self {
            Target::Worker(worker) => worker.shutdown(),
            Target::Pool(pool) => pool.shutdown(ShutdownMode::Drain),
        }
    }

    fn kill(&self) {
        match self {
            Target::Worker(worker) => Lifecycle::cancel(worker),
            Target::Pool(pool) => pool.shutdown(ShutdownMode::Cancel),
        }
    }
}

/// Calls `method` of `target` with a payload and returns the reply as it arrived.
fn call_raw(
    target: &Target,
    method: &str,
    args: &Payload,
    timeout: Option<Duration>,
) -> Result<Arrived, TransportError> {
    let callee = target.callee();
    match timeout {
        None => callee.call(method, args),
        Some(timeout) => callee.call_timeout(method, args, timeout),
    }
}

fn timeout_of(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(Duration::try_from_secs_f64)
        .transpose()
        .map_err(|e| PyValueError::new_err(format!("timeout: {e}")))
}

/// A worker process, or a pool of them, and the channels to them.
#[pyclass(frozen, module = "shm._shm")]
struct RawWorker {
    /// Locked only to clone or take the target, never across a wait: a thread holding the GIL
    /// may wait for this lock, so its holder must never wait for the GIL.
    target: Mutex<Option<Arc<Target>>>,
    helper: Helper,
}

impl RawWorker {
    /// The worker or pool, unless it was closed.
    fn target(&self) -> PyResult<Arc<Target>> {
        self.target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::new_err("the worker is closed"))
    }
}

#[pymethods]
impl RawWorker {
    /// Starts one worker from `argv`, or a pool of `workers` of them sharing one pool of
    /// shared memory.
    #[new]
    #[pyo3(signature = (argv, untrusted = false, workers = None))]
    fn new(
        py: Python<'_>,
        argv: Vec<String>,
        untrusted: bool,
        workers: Option<usize>,
    ) -> PyResult<Self> {
        let Some((program, args)) = argv.split_first() else {
            return Err(PyValueError::new_err("argv names no program"));
        };
        let config = WorkerConfig::new(program)
            .with_args(args.iter().cloned())
            .with_untrusted(untrusted);
        let target = py
            .detach(|| match workers {
                None => Worker::spawn(config).map(Target::Worker),
                Some(n) => WorkerPool::with_workers(config, n).map(Target::Pool),
            })
            .map_err(error)?;
        Ok(RawWorker {
            target: Mutex::new(Some(Arc::new(target))),
            helper: Helper::default(),
        })
    }

    /// A fresh block of `len` bytes in the pool that arguments come from, to write in place.
    fn alloc(&self, len: usize) -> PyResult<BlockMut> {
        let target = self.target()?;
        let block = target.callee().shm_pool().alloc(len).map_err(shm_error)?;
        Ok(BlockMut::new(block))
    }

    /// A pyarrow batch as an `arrow-columns` payload in the pool that arguments come from.
    fn encode_arrow(&self, py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<RawPayload> {
        arrow_encode(py, self.target()?.callee().shm_pool(), batch)
    }

    /// The pyarrow batch of an `arrow-columns` reply, read in place; what a worker could
    /// change under Arrow's checks is copied first.
    fn decode_arrow(
        &self,
        py: Python<'_>,
        payload: (String, Vec<u8>, Vec<u8>, Vec<Py<Block>>),
    ) -> PyResult<Py<PyAny>> {
        arrow_decode(py, self.target()?.callee().shm_pool(), true, payload)
    }

    /// Calls `method` with a payload (each of `blocks` a `Block`, a `BlockMut` or a buffer to
    /// copy) and returns the reply's codec, metadata, inline bytes and blocks.
    #[pyo3(signature = (method, codec, meta, inline, blocks, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        py: Python<'_>,
        method: &str,
        codec: &str,
        meta: Vec<u8>,
        inline: Vec<u8>,
        blocks: Vec<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<RawPayload> {
        let target = self.target()?;
        let blocks = blocks_of(py, target.callee().shm_pool(), &blocks)?;
        let timeout = timeout_of(timeout)?;
        let args = Payload::new(codec, meta, blocks, inline);
        let (calling, method) = (Arc::clone(&target), method.to_owned());
        let reply = self.helper.run(
            py,
            || target.cancel(),
            move || call_raw(&calling, &method, &args, timeout),
        )?;
        reply.map_err(error)?.into_py(py)
    }

    /// Calls `method` on every worker of a pool with one payload, written once; returns, in
    /// worker order, each reply or the exception its call raised.
    fn broadcast(
        &self,
        py: Python<'_>,
        method: &str,
        codec: &str,
        meta: Vec<u8>,
        inline: Vec<u8>,
        blocks: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let target = self.target()?;
        let Target::Pool(pool) = &*target else {
            return Err(Error::new_err("broadcast is for a pool of workers"));
        };
        let blocks = blocks_of(py, pool.shm_pool(), &blocks)?;
        let args = Payload::new(codec, meta, blocks, inline);
        let (calling, method) = (Arc::clone(&target), method.to_owned());
        let replies = self
            .helper
            .run(
                py,
                || target.cancel(),
                move || match &*calling {
                    Target::Pool(pool) => pool.broadcast::<_, Arrived>(&method, &args),
                    Target::Worker(_) => Ok(Vec::new()),
                },
            )?
            .map_err(error)?;
        replies
            .into_iter()
            .map(|reply| match reply {
                Ok(arrived) => Ok(arrived.into_py(py)?.into_pyobject(py)?.into_any().unbind()),
                Err(err) => Ok(error(err).into_value(py).into_any()),
            })
            .collect()
    }

    /// How many workers there are (1 for a single worker).
    fn workers(&self) -> PyResult<usize> {
        Ok(match &*self.target()? {
            Target::Worker(_) => 1,
            Target::Pool(pool) => pool.len(),
        })
    }

    /// Starts the worker again if it died (a pool restarts its own).
    fn restart(&self, py: Python<'_>) -> PyResult<()> {
        let target = self.target()?;
        match &*target {
            Target::Worker(worker) => py.detach(|| worker.restart()).map_err(error),
            Target::Pool(_) => Ok(()),
        }
    }

    /// Kills the worker at once (every worker of a pool, which then refuses calls): calls
    /// under way raise `WorkerDied`.
    fn kill(&self) {
        if let Ok(target) = self.target() {
            target.kill();
        }
    }

    /// Ends the calls under way at once, killing the workers that run them (a pool restarts
    /// them; a single worker stays dead until `restart`).
    fn cancel(&self) {
        if let Ok(target) = self.target() {
            target.cancel();
        }
    }

    /// The process ids of the workers (`None` for one that is not running).
    fn pids(&self) -> PyResult<Vec<Option<u32>>> {
        Ok(match &*self.target()? {
            Target::Worker(worker) => vec![Some(worker.pid())],
            Target::Pool(pool) => pool.pids(),
        })
    }

    /// Asks the workers to exit (killing them after their grace period); later calls raise.
    /// Calls still under way on other threads end at once with `WorkerDied`: the workers are
    /// killed, and the last of those calls lets go of them.
    fn close(&self, py: Python<'_>) {
        let target = self
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match target.map(Arc::try_unwrap) {
            None => {}
            Some(Ok(target)) => py.detach(|| target.shutdown()),
            Some(Err(shared)) => shared.kill(),
        }
    }
}

/// What a served handler can use: the worker's pool, for results written in place.
#[pyclass(frozen, module = "shm._shm")]
struct ServeContext {
    pool: ShmPool,
    method: String,
}

#[pymethods]
impl ServeContext {
    /// A fresh block of `len` bytes in the worker's pool: a result written here is sent
    /// without a copy.
    fn alloc(&self, len: usize) -> PyResult<BlockMut> {
        Ok(BlockMut::new(self.pool.alloc(len).map_err(shm_error)?))
    }

    /// A pyarrow batch as an `arrow-columns` payload in the worker's pool.
    fn encode_arrow(&self, py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<RawPayload> {
        arrow_encode(py, &self.pool, batch)
    }

    /// The pyarrow batch of an `arrow-columns` argument, read in place (the parent is
    /// trusted, as for a Rust worker).
    fn decode_arrow(
        &self,
        py: Python<'_>,
        payload: (String, Vec<u8>, Vec<u8>, Vec<Py<Block>>),
    ) -> PyResult<Py<PyAny>> {
        arrow_decode(py, &self.pool, false, payload)
    }

    /// The method being handled.
    #[getter]
    fn method(&self) -> &str {
        &self.method
    }
}

/// The error a Python exception from a served handler becomes.
fn remote_of(py: Python<'_>, err: &PyErr) -> Remote {
    let kind = if err.is_instance_of::<BadArguments>(py) {
        RemoteErrorKind::BadArguments
    } else {
        RemoteErrorKind::Handler
    };
    let name = err
        .get_type(py)
        .name()
        .map_or_else(|_| "Exception".to_owned(), |n| n.to_string());
    Remote {
        method: String::new(),
        kind,
        message: format!("{name}: {}", err.value(py)),
    }
}

/// Runs one call in a served Python program: `dispatch(method, codec, meta, inline, blocks,
/// ctx)` returns `(codec, meta, inline, blocks)`.
fn serve_call(
    dispatch: &Py<PyAny>,
    args: &Payload,
    decoder: &Decoder,
    ctx: &Context<'_>,
) -> Result<Payload, Remote> {
    let arrived = Arrived::decode(args, decoder).map_err(|e| Remote {
        method: String::new(),
        kind: RemoteErrorKind::BadArguments,
        message: e.to_string(),
    })?;
    Python::attach(|py| {
        let result = (|| -> PyResult<Payload> {
            let (codec, meta, inline, blocks) = arrived.into_py(py)?;
            let context = ServeContext {
                pool: ctx.pool().clone(),
                method: ctx.method().to_owned(),
            };
            let call_args = (ctx.method(), codec, meta, inline, blocks, context);
            let out = dispatch.bind(py).call1(call_args)?;
            let out = out.cast::<PyTuple>()?;
            let (codec, meta, inline, data): (String, Vec<u8>, Vec<u8>, Vec<Bound<'_, PyAny>>) =
                out.extract()?;
            let blocks = blocks_of(py, ctx.pool(), &data)?;
            Ok(Payload::new(codec, meta, blocks, inline))
        })();
        result.map_err(|err| remote_of(py, &err))
    })
}

/// Serves the parent that spawned this process until it asks the worker to stop: each call of
/// one of `methods` runs `dispatch` (the Python half's), one at a time. Raises if this process
/// was not started as a worker.
#[pyfunction]
fn serve(py: Python<'_>, methods: Vec<String>, dispatch: Py<PyAny>) -> PyResult<()> {
    let dispatch = Arc::new(dispatch);
    let router = methods.iter().fold(Router::new(), |router, method| {
        let dispatch = Arc::clone(&dispatch);
        router.handle_payload(method, move |args, decoder, ctx| {
            serve_call(&dispatch, args, decoder, ctx)
        })
    });
    py.detach(|| shm_transport::serve(router)).map_err(error)
}

/// Whether this process was started as a worker.
#[pyfunction]
fn is_worker() -> bool {
    shm_transport::is_worker()
}

#[pymodule]
fn _shm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Block>()?;
    m.add_class::<BlockMut>()?;
    m.add_class::<RawWorker>()?;
    m.add_class::<ServeContext>()?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(is_worker, m)?)?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("WorkerDied", py.get_type::<WorkerDied>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("OutOfSharedMemory", py.get_type::<OutOfSharedMemory>())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    m.add("BadArguments", py.get_type::<BadArguments>())?;
    Ok(())
}
