//! The segments of live processes: memfds of this project, found in `/proc/PID/fd`.
//!
//! A segment has no name in `/dev/shm`; its creator holds a descriptor of it for as long as it
//! lives (see [`crate::SegmentLink`]), and `/proc/PID/fd/N` shows it as
//! `/memfd:shm-SSSSSSSS-RRRRRRRRRRRRRRRR (deleted)`. Listing those is how an operator sees
//! what shm holds in memory now (`shm ls`). A process of another user is not readable there
//! and is left out.

use std::path::PathBuf;

use crate::name::{NameKind, SessionId, parse_name};

/// One segment of a live process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSegment {
    /// The segment's name, with its leading slash.
    pub name: String,
    /// The session its name carries.
    pub session: SessionId,
    /// The process that holds its descriptor (its creator).
    pub pid: u32,
    /// Its length in bytes.
    pub len: u64,
    /// Where it can be opened for reading (`/proc/PID/fd/N`), by this user.
    pub path: PathBuf,
}

/// Every segment of this project that a live process of this user holds, by name: what
/// `shm ls` lists.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = shm_core::ShmPool::new()?;
/// let block = pool.alloc(1 << 20)?.freeze();
/// let live = shm_core::list_live_segments()?;
/// let ours = live.iter().find(|s| s.name == block.name()).expect("listed");
/// assert_eq!(ours.pid, std::process::id());
/// # Ok(())
/// # }
/// ```
pub fn list_live_segments() -> std::io::Result<Vec<LiveSegment>> {
    let mut found = Vec::new();
    for process in std::fs::read_dir("/proc")? {
        let Ok(process) = process else { continue };
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that ended meanwhile, or of another user: nothing to list.
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let path = fd.path();
            let Ok(target) = std::fs::read_link(&path) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(name) = target
                .strip_prefix("/memfd:")
                .map(|rest| rest.trim_end_matches(" (deleted)"))
            else {
                continue;
            };
            let Some(NameKind::Segment(session)) = parse_name(name) else {
                continue;
            };
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            found.push(LiveSegment {
                name: format!("/{name}"),
                session,
                pid,
                len: metadata.len(),
                path,
            });
        }
    }
    found.sort_by(|a, b| (a.pid, &a.name).cmp(&(b.pid, &b.name)));
    found.dedup_by(|a, b| a.pid == b.pid && a.name == b.name);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShmPool;

    #[test]
    fn a_live_segment_is_listed_with_its_process_and_length() {
        let pool = ShmPool::new().unwrap();
        let block = pool.alloc(3 << 20).unwrap();
        let listed = list_live_segments().unwrap();
        let ours = listed
            .iter()
            .find(|s| s.name == block.name())
            .expect("the block's segment is listed");
        assert_eq!(ours.pid, std::process::id());
        assert_eq!(ours.session, pool.session());
        assert_eq!(ours.len, 3 << 20);
        let name = block.name().to_owned();
        drop(block);
        pool.trim();
        assert!(list_live_segments().unwrap().iter().all(|s| s.name != name));
    }
}
