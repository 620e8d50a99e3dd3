//! `shm`: what shm holds in memory, for the operator who wonders where it went.
//!
//! Segments are memfds, which live exactly as long as a process holds them: `shm ls` finds
//! them in `/proc/PID/fd`. Named segments in `/dev/shm` are left only by versions before
//! memfds (or by a crash of one); `shm gc` removes those whose session is dead.
//!
//! ```text
//! shm ls                 every live segment: size, session, the pid that holds it, and what it
//!                        holds (a block, a slab of small blocks, a channel); then the named
//!                        leftovers in /dev/shm, with whether their owner lives and their age
//! shm inspect NAME       one segment (or session lock); for a channel, its header and rings
//! shm gc [--dry-run]     remove the named segments of dead sessions from /dev/shm
//! shm df                 /dev/shm's use against its limit, and shm's part of memory
//! ```
//!
//! Human tables by default; `--json` anywhere on the line prints JSON for scripts instead.
//! Exit status: 0 on success, 1 on an error (with a message on stderr), 2 on a usage error.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use shm_core::{
    LiveSegment, SegmentEntry, SegmentHolds, SessionEntry, SessionId, SessionState,
    list_live_segments, list_sessions,
};
use shm_transport::{CONTROL_LEN, ChannelState, RingState};

const USAGE: &str = "usage: shm [--json] <ls | inspect NAME | gc [--dry-run] | df>";
const SHM_DIR: &str = "/dev/shm";

/// What a command prints: a table for people, a value for scripts.
struct Output {
    human: String,
    json: Value,
}

type Result<T, E = String> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let rest: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let output = match rest.as_slice() {
        ["ls"] => ls(),
        ["inspect", name] => inspect(name),
        ["gc"] => gc(false),
        ["gc", "--dry-run"] => gc(true),
        ["df"] => df(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match output {
        Ok(output) if json => {
            println!("{:#}", output.json);
            ExitCode::SUCCESS
        }
        Ok(output) => {
            print!("{}", output.human);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("shm: {message}");
            ExitCode::FAILURE
        }
    }
}

fn sessions() -> Result<Vec<SessionEntry>> {
    list_sessions().map_err(|e| format!("cannot list {SHM_DIR}: {e}"))
}

fn live() -> Result<Vec<LiveSegment>> {
    list_live_segments().map_err(|e| format!("cannot list /proc: {e}"))
}

fn ls() -> Result<Output> {
    let live = live()?;
    let mut live_rows = Vec::new();
    let mut json_live = Vec::new();
    for segment in &live {
        let kind = kind_of(&segment.name, &segment.path);
        live_rows.push(vec![
            segment.name.trim_start_matches('/').to_owned(),
            human_bytes(segment.len),
            segment.session.to_string(),
            segment.pid.to_string(),
            kind.to_owned(),
        ]);
        json_live.push(json!({
            "name": segment.name,
            "bytes": segment.len,
            "session": segment.session.to_string(),
            "pid": segment.pid,
            "kind": kind,
        }));
    }
    let mut human = table(&["NAME", "SIZE", "SESSION", "PID", "KIND"], &live_rows);
    let live_bytes: u64 = live.iter().map(|s| s.len).sum();
    let _ = writeln!(
        human,
        "{} live segments, {} in memory (they go when their process does)",
        live_rows.len(),
        human_bytes(live_bytes)
    );
    let sessions = sessions()?;
    let mut rows = Vec::new();
    let mut json_sessions = Vec::new();
    for s in &sessions {
        let mut json_segments = Vec::new();
        for segment in &s.segments {
            let kind = kind_of(&segment.name, &named_path(segment));
            rows.push(vec![
                segment.name.trim_start_matches('/').to_owned(),
                human_bytes(segment.len),
                s.session.to_string(),
                s.pid.map_or("-".into(), |p| p.to_string()),
                state_word(&s.state).to_owned(),
                segment.modified.map_or("?".into(), age),
                kind.to_owned(),
            ]);
            json_segments.push(json!({
                "name": segment.name,
                "bytes": segment.len,
                "age_seconds": segment.modified.and_then(seconds_since),
                "kind": kind,
            }));
        }
        json_sessions.push(json!({
            "session": s.session.to_string(),
            "state": state_word(&s.state),
            "pid": s.pid,
            "lock": s.has_lock,
            "segments": json_segments,
        }));
    }
    if !rows.is_empty() {
        human.push_str(&format!("\nnamed segments in {SHM_DIR}:\n"));
        human.push_str(&table(
            &["NAME", "SIZE", "SESSION", "PID", "OWNER", "AGE", "KIND"],
            &rows,
        ));
        let dead = sessions
            .iter()
            .filter(|s| s.state == SessionState::Dead)
            .count();
        let _ = writeln!(
            human,
            "{} named segments in {} sessions ({} of them dead: `shm gc` removes their segments)",
            rows.len(),
            sessions.len(),
            dead
        );
    }
    Ok(Output {
        human,
        json: json!({ "segments": json_live, "sessions": json_sessions }),
    })
}

fn inspect(name: &str) -> Result<Output> {
    let bare = name.trim_start_matches('/');
    let Some(session) = SessionId::of_segment(bare) else {
        return Err(format!(
            "{name} is not a name shm makes (shm-SSSSSSSS-RRRRRRRRRRRRRRRR, or \
             shm-SSSSSSSS-lock for a session's lock)"
        ));
    };
    if let Some(segment) = live()?
        .into_iter()
        .find(|s| s.name.trim_start_matches('/') == bare)
    {
        return Ok(inspect_live(&segment));
    }
    let sessions = sessions()?;
    let Some(entry) = sessions.iter().find(|s| s.session == session) else {
        return Err(format!("no session {session} in {SHM_DIR}"));
    };
    let mut fields = vec![
        ("session", session.to_string()),
        ("owner", state_word(&entry.state).to_owned()),
        ("pid", entry.pid.map_or("-".into(), |p| p.to_string())),
    ];
    let mut json = json!({
        "session": session.to_string(),
        "state": state_word(&entry.state),
        "pid": entry.pid,
    });
    if bare.ends_with("-lock") {
        if !entry.has_lock {
            return Err(format!("session {session} has no lock in {SHM_DIR}"));
        }
        fields.insert(0, ("lock of session", session.to_string()));
        let bytes: u64 = entry.segments.iter().map(|s| s.len).sum();
        fields.push(("segments", entry.segments.len().to_string()));
        fields.push(("bytes", human_bytes(bytes)));
        json["lock"] = json!(true);
        json["segments"] = json!(entry.segments.len());
        json["bytes"] = json!(bytes);
    } else {
        let Some(segment) = entry
            .segments
            .iter()
            .find(|s| s.name.trim_start_matches('/') == bare)
        else {
            return Err(format!("no segment {bare} in {SHM_DIR}"));
        };
        let kind = kind_of(&segment.name, &named_path(segment));
        fields.insert(0, ("name", bare.to_owned()));
        fields.push((
            "size",
            format!("{} ({} bytes)", human_bytes(segment.len), segment.len),
        ));
        fields.push(("age", segment.modified.map_or("?".into(), age)));
        fields.push(("kind", kind.to_owned()));
        json["name"] = json!(segment.name);
        json["bytes"] = json!(segment.len);
        json["age_seconds"] = json!(segment.modified.and_then(seconds_since));
        json["kind"] = json!(kind);
        if kind == "channel" {
            let state = read_control(&named_path(segment))?;
            json["channel"] = channel_json(&state);
            fields.extend(channel_fields(&state));
        }
    }
    Ok(Output {
        human: aligned(fields),
        json,
    })
}

/// One live segment, as `inspect` shows it.
fn inspect_live(segment: &LiveSegment) -> Output {
    let kind = kind_of(&segment.name, &segment.path);
    let mut fields = vec![
        ("name", segment.name.trim_start_matches('/').to_owned()),
        ("session", segment.session.to_string()),
        ("owner", "alive".to_owned()),
        ("pid", segment.pid.to_string()),
        (
            "size",
            format!("{} ({} bytes)", human_bytes(segment.len), segment.len),
        ),
        ("kind", kind.to_owned()),
    ];
    let mut json = json!({
        "name": segment.name,
        "session": segment.session.to_string(),
        "state": "alive",
        "pid": segment.pid,
        "bytes": segment.len,
        "kind": kind,
    });
    if let Ok(state) = read_control(&segment.path) {
        json["channel"] = channel_json(&state);
        fields.extend(channel_fields(&state));
    }
    Output {
        human: aligned(fields),
        json,
    }
}

/// `key  value` lines, the values aligned.
fn aligned(fields: Vec<(&str, String)>) -> String {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut human = String::new();
    for (key, value) in fields {
        let _ = writeln!(human, "{key:width$}  {value}");
    }
    human
}

fn gc(dry_run: bool) -> Result<Output> {
    if dry_run {
        let dead: Vec<SessionEntry> = sessions()?
            .into_iter()
            .filter(|s| s.state == SessionState::Dead)
            .collect();
        let segments: usize = dead.iter().map(|s| s.segments.len()).sum();
        let bytes: u64 = dead.iter().flat_map(|s| &s.segments).map(|s| s.len).sum();
        let rows: Vec<Vec<String>> = dead
            .iter()
            .flat_map(|s| {
                s.segments.iter().map(move |seg| {
                    vec![
                        seg.name.trim_start_matches('/').to_owned(),
                        human_bytes(seg.len),
                        s.session.to_string(),
                    ]
                })
            })
            .collect();
        let mut human = table(&["WOULD REMOVE", "SIZE", "SESSION"], &rows);
        let _ = writeln!(
            human,
            "would free {} in {segments} segments of {} dead sessions",
            human_bytes(bytes),
            dead.len()
        );
        let sessions: Vec<String> = dead.iter().map(|s| s.session.to_string()).collect();
        return Ok(Output {
            human,
            json: json!({ "dry_run": true, "sessions": sessions, "segments": segments, "bytes": bytes }),
        });
    }
    let report = shm_core::sweep_orphans().map_err(|e| format!("sweep failed: {e}"))?;
    let mut human = format!(
        "freed {} in {} segments of {} dead sessions\n",
        human_bytes(report.bytes),
        report.segments,
        report.sessions.len()
    );
    for skipped in &report.skipped {
        let _ = writeln!(human, "skipped {skipped}");
    }
    let sessions: Vec<String> = report.sessions.iter().map(|s| s.to_string()).collect();
    Ok(Output {
        human,
        json: json!({
            "dry_run": false,
            "sessions": sessions,
            "segments": report.segments,
            "bytes": report.bytes,
            "skipped": report.skipped,
        }),
    })
}

fn df() -> Result<Output> {
    let stat = rustix::fs::statvfs(SHM_DIR).map_err(|e| format!("statvfs {SHM_DIR}: {e}"))?;
    let total = stat.f_blocks.saturating_mul(stat.f_frsize);
    let free = stat.f_bfree.saturating_mul(stat.f_frsize);
    let available = stat.f_bavail.saturating_mul(stat.f_frsize);
    let used = total.saturating_sub(free);
    let sessions = sessions()?;
    let bytes_of = |pick: &dyn Fn(&SessionState) -> bool| -> u64 {
        sessions
            .iter()
            .filter(|s| pick(&s.state))
            .flat_map(|s| &s.segments)
            .map(|s| s.len)
            .sum()
    };
    let in_memory: u64 = live()?.iter().map(|s| s.len).sum();
    let live = bytes_of(&|s| *s == SessionState::Alive);
    let dead = bytes_of(&|s| *s == SessionState::Dead);
    let unknown = bytes_of(&|s| matches!(s, SessionState::Unknown(_)));
    let percent = |n: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * n as f64 / total as f64
        }
    };
    let rows = vec![
        vec!["size".into(), human_bytes(total), String::new()],
        vec![
            "used".into(),
            human_bytes(used),
            format!("{:.1} %", percent(used)),
        ],
        vec![
            "available".into(),
            human_bytes(available),
            format!("{:.1} %", percent(available)),
        ],
        vec![
            "shm, live sessions".into(),
            human_bytes(live),
            format!("{:.1} %", percent(live)),
        ],
        vec![
            "shm, dead sessions".into(),
            human_bytes(dead),
            format!("{:.1} %", percent(dead)),
        ],
        vec![
            "shm, other users".into(),
            human_bytes(unknown),
            format!("{:.1} %", percent(unknown)),
        ],
    ];
    let mut human = table(&[SHM_DIR, "BYTES", "OF SIZE"], &rows);
    let _ = writeln!(
        human,
        "shm's live segments (memfds, not in {SHM_DIR}): {}",
        human_bytes(in_memory)
    );
    if dead > 0 {
        let _ = writeln!(
            human,
            "`shm gc` frees the {} of dead sessions",
            human_bytes(dead)
        );
    }
    Ok(Output {
        human,
        json: json!({
            "size": total, "used": used, "available": available,
            "shm_live": live, "shm_dead": dead, "shm_unknown": unknown,
            "memfd_live": in_memory,
        }),
    })
}

/// Where a named segment's file is.
fn named_path(segment: &SegmentEntry) -> std::path::PathBuf {
    std::path::Path::new(SHM_DIR).join(segment.name.trim_start_matches('/'))
}

/// `slab` for a slab of small blocks (its name says so), `channel` for a channel block (its
/// magic number), `block` for any other block, `?` when it cannot be read.
fn kind_of(name: &str, path: &std::path::Path) -> &'static str {
    if SegmentHolds::of_segment(name) == Some(SegmentHolds::Slab) {
        return "slab";
    }
    match read_control(path) {
        Ok(_) => "channel",
        Err(err) if err.starts_with("unreadable") => "?",
        Err(_) => "block",
    }
}

/// The channel state in a segment's first bytes, through a plain read (no mapping).
fn read_control(path: &std::path::Path) -> Result<ChannelState> {
    let path = path.display();
    let file =
        std::fs::File::open(path.to_string()).map_err(|e| format!("unreadable {path}: {e}"))?;
    let mut control = vec![0u8; CONTROL_LEN];
    file.read_exact_at(&mut control, 0)
        .map_err(|_| format!("{path} is shorter than a channel's control area"))?;
    ChannelState::parse(&control).ok_or_else(|| format!("{path} is not a channel"))
}

fn ring_words(ring: &RingState) -> String {
    let mut text = format!(
        "head {} tail {} ({} waiting)",
        ring.head,
        ring.tail,
        ring.occupied()
    );
    if ring.producer_waiting == Some(true) {
        text.push_str(", producer waits for room");
    }
    text
}

fn channel_fields(state: &ChannelState) -> Vec<(&'static str, String)> {
    vec![
        ("version", state.version.to_string()),
        ("parent pid", state.parent_pid.to_string()),
        (
            "geometry",
            format!(
                "{} slots of {} bytes per frame ring, {} entries per release ring",
                state.slots, state.slot_len, state.releases
            ),
        ),
        ("calls", ring_words(&state.frame_rings[0])),
        ("replies", ring_words(&state.frame_rings[1])),
        ("returns to the worker", ring_words(&state.release_rings[0])),
        ("returns to the parent", ring_words(&state.release_rings[1])),
        (
            "parent's bell",
            format!("seq {}, {} sleeping", state.bells[0].0, state.bells[0].1),
        ),
        (
            "worker's bell",
            format!("seq {}, {} sleeping", state.bells[1].0, state.bells[1].1),
        ),
    ]
}

fn channel_json(state: &ChannelState) -> Value {
    let ring = |r: &RingState| {
        json!({ "head": r.head, "tail": r.tail, "waiting": r.occupied(),
                "producer_waiting": r.producer_waiting })
    };
    json!({
        "version": state.version,
        "parent_pid": state.parent_pid,
        "slot_len": state.slot_len,
        "slots": state.slots,
        "releases": state.releases,
        "calls": ring(&state.frame_rings[0]),
        "replies": ring(&state.frame_rings[1]),
        "returns_to_worker": ring(&state.release_rings[0]),
        "returns_to_parent": ring(&state.release_rings[1]),
        "bells": {
            "parent": { "seq": state.bells[0].0, "sleeping": state.bells[0].1 },
            "worker": { "seq": state.bells[1].0, "sleeping": state.bells[1].1 },
        },
    })
}

fn state_word(state: &SessionState) -> &'static str {
    match state {
        SessionState::Alive => "alive",
        SessionState::Dead => "dead",
        SessionState::Unknown(_) => "unknown",
    }
}

fn seconds_since(time: SystemTime) -> Option<u64> {
    SystemTime::now()
        .duration_since(time)
        .ok()
        .map(|d| d.as_secs())
}

fn age(time: SystemTime) -> String {
    let secs = seconds_since(time).unwrap_or(0);
    let age = Duration::from_secs(secs);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", age.as_secs() / 60),
        3600..86400 => format!("{}h", age.as_secs() / 3600),
        _ => format!("{}d", age.as_secs() / 86400),
    }
}

fn human_bytes(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift {
            return format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes} B")
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}
