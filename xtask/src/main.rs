//! `cargo xtask <task>`: the developer workflows of shm, in plain Rust.
//!
//! - `test`  — formatting, clippy, every test of the workspace, the unsafe-heavy tests under
//!   valgrind, and a check that `/dev/shm` is left as it was found.
//! - `lint`  — formatting and clippy only.
//! - `demo`  — the main job, in release mode (`--size 256MiB` scales it down).
//! - `bench` — the benchmark suite; writes `target/bench/report.md` (`--quick` for a short run).
//! - `ci`    — what CI runs: `test`, then a scaled-down `demo`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match task {
        "test" => test(),
        "lint" => lint(),
        "demo" => demo(rest),
        "bench" => bench(rest),
        "ci" => test().and_then(|()| demo(&["--size".into(), "256MiB".into()])),
        "valgrind" => valgrind(),
        _ => {
            eprintln!("usage: cargo xtask <test | lint | demo [--size N] | bench [--quick] | ci>");
            return if task == "help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask {task}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn lint() -> Result {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
}

fn test() -> Result {
    let before = shm_listing()?;
    lint()?;
    cargo(&["test", "--workspace"])?;
    valgrind()?;
    let after = shm_listing()?;
    if after != before {
        let leaked: Vec<_> = after.difference(&before).collect();
        let removed: Vec<_> = before.difference(&after).collect();
        return Err(format!(
            "/dev/shm changed during the tests: left behind {leaked:?}, removed {removed:?}"
        ));
    }
    println!("xtask test: all checks passed; /dev/shm left as it was found");
    Ok(())
}

/// Runs the unit tests of the crates that hold `unsafe` code under valgrind's memcheck, which
/// reports invalid reads and writes, uses of uninitialised memory and leaks.
fn valgrind() -> Result {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("xtask: valgrind is not installed; skipping the memcheck run");
        return Ok(());
    }
    let package = "shm-core";
    let binary = test_binary(package)?;
    println!("xtask: running the {package} unit tests under valgrind");
    run(Command::new("valgrind")
        .args([
            "--quiet",
            "--error-exitcode=97",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&binary)
        // The thread test fills gigabytes byte by byte, minutes under valgrind, and runs no
        // unsafe code that the other tests do not.
        .args(["--test-threads=1", "--skip", "many_threads_share_one_pool"]))
}

/// Builds a package's unit-test binary and returns its path.
fn test_binary(package: &str) -> Result<PathBuf> {
    let output = Command::new(cargo_bin())
        .args([
            "test",
            "--package",
            package,
            "--lib",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!("building the {package} tests failed"));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter(|line| line.contains("\"executable\":\"") && line.contains("\"test\":true"))
        .find_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
        .ok_or_else(|| format!("no unit-test binary found for {package}"))
}

fn demo(args: &[String]) -> Result {
    let mut command = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "shm-core",
        "--example",
        "demo",
        "--",
    ];
    command.extend(args.iter().map(String::as_str));
    cargo(&command)
}

fn bench(args: &[String]) -> Result {
    let mut command = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "shm-core",
        "--example",
        "bench",
        "--",
    ];
    command.extend(args.iter().map(String::as_str));
    cargo(&command)
}

fn cargo(args: &[&str]) -> Result {
    run(Command::new(cargo_bin()).args(args).current_dir(root()))
}

fn run(command: &mut Command) -> Result {
    let status = command
        .status()
        .map_err(|e| format!("{command:?} did not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}"))
    }
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// This project's files in `/dev/shm`.
fn shm_listing() -> Result<BTreeSet<String>> {
    let entries = std::fs::read_dir("/dev/shm").map_err(|e| format!("/dev/shm: {e}"))?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("shm-"))
        .collect())
}
