//! Every fuzz target for a second, as part of `cargo test`: the fuzzer is built with the
//! features of the rest of the test build (so `cargo xtask test` compiles nothing twice), and a
//! finding fails the test with the fuzzer's report.

use std::process::Command;

#[test]
fn every_target_runs_a_second_without_a_finding() {
    let output = Command::new(env!("CARGO_BIN_EXE_shm-fuzz"))
        .args(["--secs", "1"])
        .output()
        .expect("the fuzzer starts");
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}");
    assert!(
        output.status.success(),
        "the fuzzer failed ({}): {report}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The report is whole: a row for the first target and for the last.
    assert!(report.contains("| payload |") && report.contains("| value |"));
}
