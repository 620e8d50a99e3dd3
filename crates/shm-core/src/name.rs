//! Segment names: how they are made, checked and read back.
//!
//! A segment this project creates is named `/shm-SSSSSSSS-RRRRRRRRRRRRRRRR`: a fixed prefix, the
//! session id of the process that created it (32 bits, hex) and 64 bits (hex), 60 of them random
//! and the first hex digit telling what the segment holds (`a` for a slab of small blocks,
//! anything else for one block). That is 30 characters, under macOS's limit of 31,
//! unguessable, and it tells a receiver whose segment a reference names. Versions before memfd
//! segments also kept a session lock `/dev/shm/shm-SSSSSSSS-lock`, which the sweep of their
//! leftovers reads.

use std::fmt;

use crate::error::{Result, ShmError};

/// The prefix of every segment name this project creates (without the leading slash).
pub const NAME_PREFIX: &str = "shm-";

/// Longest name accepted on attach, leading slash included (Linux's `NAME_MAX` is 255).
const MAX_NAME_LEN: usize = 255;

/// The id of a session: the segments created by one process's pools, guarded by one lock.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u32);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl SessionId {
    /// The session that created a segment of this project, from the segment's name (with or
    /// without its leading slash); `None` for names this project did not make.
    pub fn of_segment(name: &str) -> Option<SessionId> {
        match parse_name(name.strip_prefix('/').unwrap_or(name))? {
            NameKind::Segment(session) | NameKind::Lock(session) => Some(session),
        }
    }

    /// The pid written in the session's lock by the process that holds it; `None` when the
    /// session has no lock in `/dev/shm` (ended, never started) or the lock holds no pid. A
    /// transport uses it to check the session a peer claims against the peer's pid.
    pub fn owner_pid(self) -> Option<u32> {
        let text = std::fs::read_to_string(crate::sys::segment_path(&self.lock_name())).ok()?;
        text.trim().parse().ok()
    }

    /// The name of the shared-memory object whose lock marks this session as alive.
    pub(crate) fn lock_name(self) -> String {
        format!("/{NAME_PREFIX}{self}-lock")
    }

    /// A new segment name of this session, from 64 random bits of which the first four are
    /// replaced by what the segment holds.
    pub(crate) fn segment_name(self, random: u64, holds: SegmentHolds) -> String {
        let tag: u64 = match holds {
            SegmentHolds::Slab => SLAB_TAG,
            // Any digit but the slab's: `a` becomes `2`.
            SegmentHolds::Block if random >> 60 == SLAB_TAG => 0x2,
            SegmentHolds::Block => random >> 60,
        };
        let random = (random & (u64::MAX >> 4)) | (tag << 60);
        format!("/{NAME_PREFIX}{self}-{random:016x}")
    }
}

/// The first hex digit of a slab segment's random part.
const SLAB_TAG: u64 = 0xa;

/// What a segment of this project holds, as its name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentHolds {
    /// One block (an array, a column, a channel…).
    Block,
    /// A slab: many small blocks in slots of one size.
    Slab,
}

impl SegmentHolds {
    /// What the segment named `name` (with or without its leading slash) holds; `None` for a
    /// name this project did not make, or a session lock.
    pub fn of_segment(name: &str) -> Option<SegmentHolds> {
        let name = name.strip_prefix('/').unwrap_or(name);
        match parse_name(name)? {
            NameKind::Segment(_) => {
                let random = name.rsplit('-').next()?;
                Some(if random.starts_with('a') {
                    SegmentHolds::Slab
                } else {
                    SegmentHolds::Block
                })
            }
            NameKind::Lock(_) => None,
        }
    }
}

impl std::str::FromStr for SessionId {
    type Err = ShmError;

    /// Reads a session id as [`Display`](fmt::Display) writes it: eight hex digits.
    fn from_str(text: &str) -> Result<Self> {
        parse_hex(text, 8)
            .and_then(|id| u32::try_from(id).ok())
            .map(SessionId)
            .ok_or_else(|| ShmError::InvalidName {
                name: text.to_owned(),
                reason: "a session id is eight hex digits",
            })
    }
}

/// What a file name in `/dev/shm` is to this project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameKind {
    /// A segment of the given session.
    Segment(SessionId),
    /// The liveness lock of the given session.
    Lock(SessionId),
}

/// Reads a file name of `/dev/shm` (no leading slash); `None` when this project did not make it.
pub(crate) fn parse_name(file_name: &str) -> Option<NameKind> {
    let rest = file_name.strip_prefix(NAME_PREFIX)?;
    let (session, tail) = rest.split_once('-')?;
    let session = parse_hex(session, 8)?;
    let session = SessionId(u32::try_from(session).ok()?);
    if tail == "lock" {
        return Some(NameKind::Lock(session));
    }
    parse_hex(tail, 16)?;
    Some(NameKind::Segment(session))
}

fn parse_hex(text: &str, digits: usize) -> Option<u64> {
    if text.len() != digits || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// Checks a segment name received from a peer before it reaches `shm_open`.
///
/// Any POSIX name of safe characters is accepted, not only this project's own, so that segments
/// made by other programs (Python's `SharedMemory`, say) can be attached.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(ShmError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    let Some(body) = name.strip_prefix('/') else {
        return invalid("must start with '/'");
    };
    if body.is_empty() {
        return invalid("is empty after the leading '/'");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("is longer than 255 bytes");
    }
    if body == "." || body == ".." {
        return invalid("names a directory");
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("may hold only ASCII letters, digits, '.', '_' and '-' after the '/'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_30_characters_and_parse_back() {
        let session = SessionId(0xdead_beef);
        let name = session.segment_name(0x0123_4567_89ab_cdef, SegmentHolds::Block);
        assert_eq!(name, "/shm-deadbeef-0123456789abcdef");
        assert_eq!(SegmentHolds::of_segment(&name), Some(SegmentHolds::Block));
        let slab = session.segment_name(0x0123_4567_89ab_cdef, SegmentHolds::Slab);
        assert_eq!(slab, "/shm-deadbeef-a123456789abcdef");
        assert_eq!(
            SegmentHolds::of_segment(&slab[1..]),
            Some(SegmentHolds::Slab)
        );
        let not_a_slab = session.segment_name(0xa123_4567_89ab_cdef, SegmentHolds::Block);
        assert_eq!(not_a_slab, "/shm-deadbeef-2123456789abcdef");
        assert_eq!(SegmentHolds::of_segment(&session.lock_name()), None);
        assert_eq!(name.len(), 30);
        assert_eq!(
            parse_name(&name[1..]),
            Some(NameKind::Segment(session)),
            "a name this project made is recognised"
        );
        assert_eq!(
            parse_name(&session.lock_name()[1..]),
            Some(NameKind::Lock(session))
        );
        validate_name(&name).unwrap();
        assert_eq!(session.to_string().parse::<SessionId>().unwrap(), session);
        for bad in ["", "deadbee", "deadbeeff", "deadbeeg", "+eadbeef"] {
            assert!(bad.parse::<SessionId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "psm_abc123",
            "shm-deadbeef",
            "shm-deadbee-0123456789abcdef",
            "shm-deadbeef-0123456789abcdeg",
            "shm-deadbeef-0123456789abcdef0",
            "shm-deadbeef-locks",
        ] {
            assert_eq!(parse_name(name), None, "{name}");
        }
    }

    #[test]
    fn malformed_names_are_rejected_with_the_name() {
        let too_long = format!("/{}", "a".repeat(255));
        for name in [
            "", "/", "noslash", "/a/b", "/..", "/a b", "/\u{e9}", &too_long,
        ] {
            match validate_name(name) {
                Err(ShmError::InvalidName { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{name:?}: expected InvalidName, got {other:?}"),
            }
        }
        validate_name("/psm_abc123").unwrap();
    }
}
