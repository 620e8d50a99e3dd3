//! The truncation guard: a process that shrinks a segment under our mapping cannot kill us.
//!
//! Touching a page of a shared mapping that lies past the end of its file raises SIGBUS, and
//! any process of the same user can `ftruncate` a segment — a worker its result, our cached
//! slab, the channel. Checking the length before each read cannot help, since the cut may come
//! right after the check. So every segment this crate maps is registered here, and a
//! process-wide SIGBUS handler (installed once, with the first segment) repairs the fault
//! instead: when the faulting address lies in a registered mapping, it maps anonymous zero
//! pages over the rest of that mapping (from the faulting page to its end, all of which is past
//! the new end of the file), marks the segment truncated, and returns. The faulting instruction
//! runs again and reads zeros (or writes into private pages). Wayland compositors protect
//! themselves from their clients' buffers the same way.
//!
//! A SIGBUS anywhere else is passed to the handler that was installed before ours (Rust's own
//! stack-overflow handler, or the program's); with none, the default action is restored and the
//! signal raised again, so the process dies as it would have without us. A program that installs
//! its own SIGBUS handler after creating a pool must pass on the signals it does not handle, as
//! ours does.
//!
//! Cost: nothing on any read or write. Registering a mapping (once per segment created or
//! attached, both cached by the pool) takes a short spin lock and a B-tree insert;
//! `cargo xtask bench` measures attaching with the guard against bare system calls.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

/// One registered mapping (its start is the key it is registered under).
struct Watched {
    end: usize,
    writable: bool,
    /// Set by the handler; shared with the [`Watch`].
    truncated: Arc<AtomicBool>,
}

/// The registered mappings by start address, behind a spin lock that the signal handler can
/// take too: the handler runs on the faulting thread, which never holds the lock (nothing
/// under it touches mapped memory), so the holder is another thread that will let go. The
/// handler only looks up the map, which allocates nothing.
struct Registry {
    busy: AtomicBool,
    ranges: UnsafeCell<BTreeMap<usize, Watched>>,
}

// SAFETY: `ranges` is only reached through `Registry::with`, which holds `busy`.
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    busy: AtomicBool::new(false),
    ranges: UnsafeCell::new(BTreeMap::new()),
};

impl Registry {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<usize, Watched>) -> R) -> R {
        let mut spins = 0u32;
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                // A plain system call, safe in a signal handler too.
                std::thread::yield_now();
            }
        }
        // SAFETY: `busy` is held, so this is the only reference to the map.
        let result = f(unsafe { &mut *self.ranges.get() });
        self.busy.store(false, Ordering::Release);
        result
    }
}

/// The SIGBUS action that was in place before ours (reading a `OnceLock` that is set is one
/// atomic load, fine in a signal handler).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// A mapping under the guard's watch; unregistered when dropped, which must happen before the
/// mapping is unmapped.
#[derive(Debug)]
pub(crate) struct Watch {
    start: usize,
    truncated: Arc<AtomicBool>,
}

impl Watch {
    /// Whether the object under the mapping was cut short while mapped: its bytes from the cut
    /// on now read as zero here.
    pub(crate) fn truncated(&self) -> bool {
        self.truncated.load(Ordering::Relaxed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        REGISTRY.with(|ranges| ranges.remove(&self.start));
    }
}

/// Watches `len` bytes mapped at `ptr` (a whole mapping of ours), installing the handler first
/// if this is the first watch of the process.
pub(crate) fn watch(ptr: *mut u8, len: usize, writable: bool) -> Watch {
    INSTALL.call_once(install);
    let truncated = Arc::new(AtomicBool::new(false));
    let start = ptr as usize;
    let entry = Watched {
        end: start.saturating_add(len),
        writable,
        truncated: Arc::clone(&truncated),
    };
    REGISTRY.with(|ranges| ranges.insert(start, entry));
    Watch { start, truncated }
}

fn install() {
    // Not `rustix::param::page_size`: it reads the vDSO's ELF header through the auxiliary
    // vector, which faults under valgrind.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if let Ok(page) = usize::try_from(page)
        && page.is_power_of_two()
    {
        PAGE_SIZE.store(page, Ordering::Relaxed);
    }
    // SAFETY: a zeroed `sigaction` is a valid value (no handler, empty flags, no restorer);
    // the mask is emptied before use, and `on_sigbus` has the three-argument form SA_SIGINFO
    // asks for. The kernel fills `previous` before we read it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
            let _ = PREVIOUS.set(previous);
        }
    }
}

/// Maps zero pages over a registered mapping from the page of `addr` on; `false` when `addr`
/// is not in one of ours or the kernel refuses.
fn repair(addr: usize) -> bool {
    let page = addr & !(PAGE_SIZE.load(Ordering::Relaxed) - 1);
    REGISTRY.with(|ranges| {
        let Some((&start, watched)) = ranges.range(..=addr).next_back() else {
            return false;
        };
        if addr >= watched.end {
            return false;
        }
        let from = page.max(start);
        let prot = if watched.writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: `from..end` lies inside a live mapping of ours (entries are removed before
        // their mapping is unmapped, under the lock held here), so MAP_FIXED replaces only our
        // own pages, whose file bytes are gone anyway. The mapping stays one range of the same
        // length, which `munmap` later removes whole.
        let mapped = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                watched.end - from,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        watched.truncated.store(true, Ordering::Relaxed);
        true
    })
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to a SA_SIGINFO handler; `si_addr` is the
    // faulting address for the memory faults (`si_code > 0`) we look at.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR && repair(addr) {
        return;
    }
    forward(signal, info, context);
}

/// Hands a SIGBUS that is not ours to the previous handler, or lets it kill the process.
fn forward(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if let Some(previous) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            // SAFETY: the previous handler was installed with these flags, so it has the form
            // they say; we call it as the kernel would have.
            unsafe {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let handler: extern "C" fn(
                        libc::c_int,
                        *mut libc::siginfo_t,
                        *mut libc::c_void,
                    ) = std::mem::transmute(handler);
                    handler(signal, info, context);
                } else {
                    let handler: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                    handler(signal);
                }
            }
            return;
        }
    }
    // SAFETY: restoring the default action and raising the signal are async-signal-safe; the
    // signal is blocked while this handler runs and is delivered, fatally, when it returns.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut default.sa_mask);
        libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
        libc::raise(signal);
    }
}
