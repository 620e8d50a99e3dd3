//! The peers of B2: what a user would otherwise pick to pass small messages between two
//! processes, timed as ping-pongs of one 8-byte value in the same run as shm's small call.
//!
//! - **Spin**: two words in a shared page, each side spinning on the other's — the floor any
//!   shared-memory channel pays (a cache line each way), with both cores burning while idle.
//! - **iceoryx2** (the crate from the registry; feature `iceoryx2`, which `cargo xtask bench`
//!   turns on): publish-subscribe with the receiver busy-polling (its fastest mode, burning a
//!   core while idle), and publish-subscribe with an event per message that the receiver sleeps
//!   on (its mode that costs nothing idle).
//!
//! The bench binary is also the peer process: [`serve_peer`] runs the other side when the
//! arguments name one.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Error, sample};

/// A peer of B2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Words in a shared page, spun on.
    Spin,
    /// iceoryx2 publish-subscribe, the receiver busy-polling.
    IceoryxPoll,
    /// iceoryx2 publish-subscribe with an event per message, the receiver asleep on it.
    IceoryxEvent,
}

impl Peer {
    /// The peers this build can run.
    pub fn available() -> Vec<Peer> {
        let mut peers = vec![Peer::Spin];
        if cfg!(feature = "iceoryx2") {
            peers.extend([Peer::IceoryxPoll, Peer::IceoryxEvent]);
        }
        peers
    }

    /// The row's name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Spin => "spin on a shared page (the floor; both sides burn a core)",
            Peer::IceoryxPoll => "iceoryx2 publish-subscribe, busy-polling (burns a core)",
            Peer::IceoryxEvent => "iceoryx2 publish-subscribe + event, sleeping",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Peer::Spin => "--spin-peer",
            Peer::IceoryxPoll => "--iceoryx2-poll-peer",
            Peer::IceoryxEvent => "--iceoryx2-event-peer",
        }
    }
}

/// The value that tells a peer to stop.
const STOP: u64 = u64::MAX;

/// How long a round may take before the peer counts as gone.
const ROUND_LIMIT: Duration = Duration::from_secs(5);

/// Runs the peer side if `args` name one (`FLAG NAME`); `Ok(false)` if they do not.
pub fn serve_peer(args: &[String]) -> Result<bool, Error> {
    let [flag, name] = args else {
        return Ok(false);
    };
    let Some(peer) = [Peer::Spin, Peer::IceoryxPoll, Peer::IceoryxEvent]
        .into_iter()
        .find(|p| p.flag() == flag)
    else {
        return Ok(false);
    };
    match peer {
        Peer::Spin => spin::serve(Path::new(name))?,
        #[cfg(feature = "iceoryx2")]
        Peer::IceoryxPoll | Peer::IceoryxEvent => ice::serve(name, peer == Peer::IceoryxEvent)?,
        #[cfg(not(feature = "iceoryx2"))]
        _ => return Err("this build has no iceoryx2 (feature `iceoryx2`)".into()),
    }
    Ok(true)
}

/// Times `rounds` ping-pongs with `peer`, after a tenth as many of warm-up; the times come
/// back sorted.
pub fn ping_pong(peer: Peer, rounds: usize) -> Result<Vec<Duration>, Error> {
    let exe = std::env::current_exe()?;
    match peer {
        Peer::Spin => spin::ping_pong(&exe, rounds),
        #[cfg(feature = "iceoryx2")]
        Peer::IceoryxPoll | Peer::IceoryxEvent => {
            // iceoryx2 keeps its nodes' and services' records under /tmp/iceoryx2 and removes
            // them when they end, but not the directories: those it made for this run go too.
            // It also leaves a small management segment of its own in /dev/shm (`iox2_…`):
            // one that was not there before goes too.
            let root = Path::new("/tmp/iceoryx2");
            let existed = root.exists();
            let dev_shm = || -> Vec<std::ffi::OsString> {
                std::fs::read_dir("/dev/shm")
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default()
            };
            let before = dev_shm();
            let times = ice::ping_pong(&exe, rounds, peer == Peer::IceoryxEvent);
            for name in dev_shm() {
                if name.to_string_lossy().starts_with("iox2_") && !before.contains(&name) {
                    let _ = std::fs::remove_file(Path::new("/dev/shm").join(name));
                }
            }
            if !existed {
                for dir in [root.join("services"), root.join("nodes"), root.to_owned()] {
                    // Only if empty: anything else there is another program's.
                    let _ = std::fs::remove_dir(dir);
                }
            }
            times
        }
        #[cfg(not(feature = "iceoryx2"))]
        _ => Err("this build has no iceoryx2 (feature `iceoryx2`)".into()),
    }
}

/// Waits for `child` to exit, killing it if it has not within a second.
fn reap(mut child: Child) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait()?;
    Err("the peer did not stop".into())
}

mod spin {
    use super::*;

    /// The page: the ping word, the pong word a cache line further, and a ready word.
    const PAGE: usize = 4096;
    const PING: usize = 0;
    const PONG: usize = 128;
    const READY: usize = 256;

    /// A shared mapping of the page file.
    struct Page {
        ptr: *mut u8,
    }

    impl Page {
        fn map(path: &Path) -> Result<Page, Error> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?;
            // SAFETY: a fresh shared mapping of a file of `PAGE` bytes that nothing else in
            // this process maps; it is unmapped on drop, and only read and written through
            // the atomics of `word`.
            let ptr = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    PAGE,
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::SHARED,
                    &file,
                    0,
                )?
            };
            Ok(Page { ptr: ptr.cast() })
        }

        fn word(&self, offset: usize) -> &AtomicU64 {
            // SAFETY: `offset` is one of the 8-byte aligned offsets above, inside the page,
            // which lives as long as `self`; both processes access the words only atomically.
            unsafe { &*self.ptr.add(offset).cast::<AtomicU64>() }
        }
    }

    impl Drop for Page {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `map`, no longer referenced (words borrow `self`).
            let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), PAGE) };
        }
    }

    /// Spins until `word` holds something other than `not`, or the round limit passes.
    fn wait_for_change(word: &AtomicU64, not: u64) -> Result<u64, Error> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let value = word.load(Ordering::Acquire);
            if value != not {
                return Ok(value);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 16) && start.elapsed() > ROUND_LIMIT {
                return Err("the spin peer stopped answering".into());
            }
            std::hint::spin_loop();
        }
    }

    pub(super) fn serve(path: &Path) -> Result<(), Error> {
        let page = Page::map(path)?;
        page.word(READY).store(1, Ordering::Release);
        let mut last = 0;
        loop {
            let ping = wait_for_change(page.word(PING), last)?;
            if ping == STOP {
                return Ok(());
            }
            last = ping;
            page.word(PONG).store(ping, Ordering::Release);
        }
    }

    pub(super) fn ping_pong(exe: &Path, rounds: usize) -> Result<Vec<Duration>, Error> {
        // In the temporary directory, not /dev/shm, and unlinked once both have mapped it.
        let path = std::env::temp_dir().join(format!("shm-bench-{}-spin", std::process::id()));
        std::fs::File::create(&path)?.set_len(PAGE as u64)?;
        let page = Page::map(&path);
        let child = Command::new(exe).arg(Peer::Spin.flag()).arg(&path).spawn();
        let (page, child) = match (page, child) {
            (Ok(page), Ok(child)) => (page, child),
            (page, child) => {
                let _ = std::fs::remove_file(&path);
                return Err(page
                    .err()
                    .or(child.err().map(Into::into))
                    .unwrap_or_else(|| "the spin peer did not start".into()));
            }
        };
        let ready = wait_for_change(page.word(READY), 0);
        std::fs::remove_file(&path)?;
        ready?;
        let mut next = 0u64;
        let times = sample(rounds / 10, rounds, || {
            next += 1;
            page.word(PING).store(next, Ordering::Release);
            while wait_for_change(page.word(PONG), next - 1)? != next {}
            Ok(())
        });
        page.word(PING).store(STOP, Ordering::Release);
        reap(child)?;
        times
    }
}

#[cfg(feature = "iceoryx2")]
mod ice {
    use iceoryx2::prelude::{Node, NodeBuilder, SignalHandlingMode, ipc};

    use super::*;

    /// The two directions' services of a run named `name`.
    fn names(name: &str) -> (String, String) {
        (
            format!("shm-bench/{name}/ping"),
            format!("shm-bench/{name}/pong"),
        )
    }

    /// One end: publishes on `out`, subscribes to `into`, and with `events` notifies the peer
    /// of each message and sleeps on its notifications.
    struct End {
        publisher: iceoryx2::port::publisher::Publisher<ipc::Service, u64, ()>,
        subscriber: iceoryx2::port::subscriber::Subscriber<ipc::Service, u64, ()>,
        events: Option<(
            iceoryx2::port::notifier::Notifier<ipc::Service>,
            iceoryx2::port::listener::Listener<ipc::Service>,
        )>,
        // Dropped last: the node owns the ports' resources.
        _node: Node<ipc::Service>,
    }

    impl End {
        fn open(out: &str, into: &str, events: bool) -> Result<End, Error> {
            // The bench takes no signals of its own.
            let node = NodeBuilder::new()
                .signal_handling_mode(SignalHandlingMode::Disabled)
                .create::<ipc::Service>()?;
            let service = |name: &str| -> Result<_, Error> {
                Ok(node
                    .service_builder(&name.try_into()?)
                    .publish_subscribe::<u64>()
                    .open_or_create()?)
            };
            let publisher = service(out)?.publisher_builder().create()?;
            let subscriber = service(into)?.subscriber_builder().create()?;
            let events = if events {
                let event = |name: &str| -> Result<_, Error> {
                    Ok(node
                        .service_builder(&format!("{name}/event").as_str().try_into()?)
                        .event()
                        .open_or_create()?)
                };
                Some((
                    event(out)?.notifier_builder().create()?,
                    event(into)?.listener_builder().create()?,
                ))
            } else {
                None
            };
            Ok(End {
                publisher,
                subscriber,
                events,
                _node: node,
            })
        }

        fn send(&self, value: u64) -> Result<(), Error> {
            self.publisher.loan_uninit()?.write_payload(value).send()?;
            if let Some((notifier, _)) = &self.events {
                notifier.notify()?;
            }
            Ok(())
        }

        fn receive(&self) -> Result<u64, Error> {
            let start = Instant::now();
            loop {
                if let Some(sample) = self.subscriber.receive()? {
                    return Ok(*sample);
                }
                match &self.events {
                    Some((_, listener)) => {
                        listener.timed_wait(|_| {}, ROUND_LIMIT)?;
                    }
                    None => std::hint::spin_loop(),
                }
                if start.elapsed() > ROUND_LIMIT {
                    return Err("the iceoryx2 peer stopped answering".into());
                }
            }
        }
    }

    pub(super) fn serve(name: &str, events: bool) -> Result<(), Error> {
        let (ping, pong) = names(name);
        let end = End::open(&pong, &ping, events)?;
        loop {
            let value = end.receive()?;
            if value == STOP {
                return Ok(());
            }
            end.send(value)?;
        }
    }

    pub(super) fn ping_pong(
        exe: &Path,
        rounds: usize,
        events: bool,
    ) -> Result<Vec<Duration>, Error> {
        let name = format!(
            "{}-{}",
            std::process::id(),
            if events { "event" } else { "poll" }
        );
        let (ping, pong) = names(&name);
        let end = End::open(&ping, &pong, events)?;
        let flag = if events {
            Peer::IceoryxEvent.flag()
        } else {
            Peer::IceoryxPoll.flag()
        };
        let child = Command::new(exe).arg(flag).arg(&name).spawn()?;
        // The subscriber must be connected before the first message counts: ping until the
        // peer answers.
        let start = Instant::now();
        loop {
            end.send(0)?;
            std::thread::sleep(Duration::from_millis(1));
            if end.subscriber.receive()?.is_some() {
                break;
            }
            if start.elapsed() > ROUND_LIMIT {
                let _ = reap(child);
                return Err("the iceoryx2 peer did not connect".into());
            }
        }
        // Drain what the handshake left.
        while end.subscriber.receive()?.is_some() {}
        let mut next = 0u64;
        let times = sample(rounds / 10, rounds, || {
            next += 1;
            end.send(next)?;
            while end.receive()? != next {}
            Ok(())
        });
        end.send(STOP)?;
        reap(child)?;
        drop(end);
        times
    }
}
