//! The `shm` command against this machine: a live pool of this process (memfds, found in
//! `/proc`), a planted named orphan in `/dev/shm`, and names that are not shm's.

use std::process::Command;

use serde_json::Value;
use shm_core::ShmPool;

const SHM: &str = env!("CARGO_BIN_EXE_shm");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SHM).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn json(args: &[&str]) -> Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn ls_inspect_gc_and_df_see_live_segments_and_named_leftovers() {
    let pool = ShmPool::new().unwrap();
    let block = pool.alloc(3 << 20).unwrap();
    let mine = block.name().to_owned();
    // An orphan: a segment of a session with no lock and no owner.
    let orphan = format!(
        "/dev/shm/shm-{:08x}-{:016x}",
        std::process::id() ^ 0x5a5a_0000,
        7u64
    );
    std::fs::write(&orphan, vec![0u8; 8192]).unwrap();

    let listing = json(&["--json", "ls"]);
    let segment = listing["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == mine.as_str())
        .expect("our block's segment is listed");
    assert_eq!(segment["session"], pool.session().to_string());
    assert_eq!(segment["pid"], std::process::id());
    assert_eq!(segment["bytes"], 3 << 20);
    assert_eq!(segment["kind"], "block");
    let sessions = listing["sessions"].as_array().unwrap();
    let small = pool.alloc(100).unwrap();
    let slab = json(&["--json", "inspect", &small.name()[1..]]);
    assert_eq!(slab["kind"], "slab");
    let dead = sessions
        .iter()
        .find(|s| s["segments"][0]["name"] == orphan["/dev/shm".len()..])
        .expect("the orphan is listed");
    assert_eq!(dead["state"], "dead");
    let (code, table, _) = run(&["ls"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("NAME") && table.contains(&mine[1..]),
        "{table}"
    );

    let inspected = json(&["--json", "inspect", &mine[1..]]);
    assert_eq!(
        (inspected["name"].as_str(), inspected["state"].as_str()),
        (Some(mine.as_str()), Some("alive"))
    );

    let dry = json(&["--json", "gc", "--dry-run"]);
    assert!(dry["bytes"].as_u64().unwrap() >= 8192);
    assert!(
        std::path::Path::new(&orphan).exists(),
        "a dry run removes nothing"
    );
    let swept = json(&["--json", "gc"]);
    assert!(swept["segments"].as_u64().unwrap() >= 1);
    assert!(
        !std::path::Path::new(&orphan).exists(),
        "the orphan is gone"
    );
    assert!(
        !std::path::Path::new(&format!("/dev/shm{mine}")).exists(),
        "a live segment has no name in /dev/shm"
    );
    let listing = json(&["--json", "ls"]);
    assert!(
        listing["segments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == mine.as_str()),
        "the live segment is still listed after gc"
    );

    let usage = json(&["--json", "df"]);
    assert!(usage["size"].as_u64().unwrap() > 0);
    assert!(usage["memfd_live"].as_u64().unwrap() >= 3 << 20);

    let (code, _, err) = run(&["inspect", "psm_12345"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a name shm makes"), "{err}");
    let (code, _, err) = run(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("usage: shm"), "{err}");
    drop((small, block));
    drop(pool);
}
