//! `cargo xtask <task>`: the developer workflows of shm, in plain Rust.
//!
//! - `test`  — formatting, clippy, every test of the workspace, the Python package's tests
//!   (pytest), the unsafe-heavy tests under valgrind, and a check that `/dev/shm` is left as it
//!   was found.
//! - `lint`  — formatting and clippy only.
//! - `demo`  — the main job, in release mode (`--size 256MiB` scales it down).
//! - `bench` — the benchmark suite; writes `target/bench/report.md` (`--quick` for a short run).
//! - `fuzz`  — the mutation fuzzer over every decoder of foreign bytes (`--secs N` per target,
//!   default 60; `--target NAME`), in release mode; `test` runs each target for a second.
//! - `soak`  — the model-based test of the transport, long (`--steps N`, default 1,000,000;
//!   `--threads T`; `--seed S` to replay a run), in release mode.
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
        "soak" => soak(rest),
        "fuzz" => fuzz(rest),
        "ci" => test().and_then(|()| demo(&["--size".into(), "256MiB".into()])),
        "valgrind" => test_artifacts().and_then(|artifacts| valgrind(&artifacts)),
        _ => {
            eprintln!(
                "usage: cargo xtask <test | lint | demo [--size N] | bench [--quick] [--workers N] | \
                 soak [--steps N] [--threads T] [--seed S] | fuzz [--secs N] [--target NAME] | ci>"
            );
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

/// The optional features that the tests and clippy turn on: TLS for the Flight workers, and
/// the Flight benchmark (optional so that the demo builds without the gRPC stack).
const FEATURES: &str = "shm-flight/tls,shm-tests/tls,shm-bench/flight";

/// The test build: every later step of `test` (pytest's workers, valgrind) runs executables of
/// this one build. Building a single package instead would resolve other features for its
/// dependencies (dev-dependencies and the features above count) and compile them again.
const TEST_BUILD: &[&str] = &["test", "--workspace", "--features", FEATURES];

fn lint() -> Result {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        FEATURES,
        "--",
        "-D",
        "warnings",
    ])?;
    // The Flight crate as most users build it: without TLS.
    cargo(&[
        "clippy",
        "-p",
        "shm-flight",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The benchmarks as `cargo xtask bench` builds them: with iceoryx2, B2's peer.
    cargo(&[
        "clippy",
        "-p",
        "shm-bench",
        "--all-targets",
        "--features",
        "iceoryx2,flight",
        "--",
        "-D",
        "warnings",
    ])
}

fn test() -> Result {
    let before = shm_listing()?;
    lint()?;
    let python = python_env()?;
    // Every fuzz target runs for a second here too (crates/shm-fuzz/tests).
    run(Command::new(cargo_bin())
        .args(TEST_BUILD)
        .current_dir(root())
        .env("SHM_PYTHON", &python)
        .env("SHM_REQUIRE_PYTHON", "1"))?;
    let artifacts = test_artifacts()?;
    python_package(&python, &artifacts)?;
    valgrind(&artifacts)?;
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

/// The Python interpreter of the interop tests: a virtual environment in `target/pyenv` with
/// the packages of `tests/python/requirements.txt`, created (from the package index) when it is
/// missing or lacks them.
fn python_env() -> Result<PathBuf> {
    let venv = root().join("target/pyenv");
    let python = venv.join("bin/python");
    let requirements = root().join("tests/python/requirements.txt");
    let ready = Command::new(&python)
        .args(["-c", "import numpy, pyarrow, pytest, maturin"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(python);
    }
    println!("xtask: creating the Python environment of the interop tests in target/pyenv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .map_err(|e| format!("{e} (the interop tests need python3 with its venv module)"))?;
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements))?;
    Ok(python)
}

/// Builds the Python package `shm` (`crates/shm-py`) into the environment of `python`, with
/// the test workers it drives, and runs its tests with pytest.
fn python_package(python: &Path, artifacts: &[Artifact]) -> Result {
    install_python_package(python, false)?;
    let binary = |name: &str| find_artifact(artifacts, "tests", "bin", name, false);
    run(Command::new(python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "crates/shm-py/tests",
        ])
        .current_dir(root())
        .env("SHM_TEST_WORKER", binary("shm-test-worker")?)
        .env("SHM_TEST_PYTHON_PARENT", binary("shm-test-python-parent")?))
}

/// `maturin develop`: builds the package `shm` and installs it, editable, into the
/// environment of `python` (optimised for the benchmarks).
fn install_python_package(python: &Path, release: bool) -> Result {
    let venv = python
        .parent()
        .and_then(Path::parent)
        .ok_or("the Python environment has no root")?;
    println!("xtask: building the Python package shm into target/pyenv");
    run(Command::new(venv.join("bin/maturin"))
        .args(["develop", "--quiet"])
        .args(release.then_some("--release"))
        .current_dir(root().join("crates/shm-py"))
        .env("VIRTUAL_ENV", venv))
}

/// The tests that exercise `unsafe` code (segment mapping, byte casts, views over shared
/// memory), as (crate directory, target kind, target name, tests to skip).
const VALGRIND_TESTS: &[(&str, &str, &str, &[&str])] = &[
    // The thread test fills gigabytes byte by byte, minutes under valgrind, and runs no unsafe
    // code that the other tests do not.
    (
        "crates/shm-core",
        "lib",
        "shm_core",
        &["many_threads_share_one_pool"],
    ),
    ("crates/shm-codec", "test", "arrays", &[]),
    ("crates/shm-arrow", "test", "frames", &[]),
    ("crates/shm-transport", "lib", "shm_transport", &[]),
];

/// Runs the tests of the crates that hold `unsafe` code under valgrind's memcheck, which
/// reports invalid reads and writes, uses of uninitialised memory and leaks.
fn valgrind(artifacts: &[Artifact]) -> Result {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("xtask: valgrind is not installed; skipping the memcheck run");
        return Ok(());
    }
    for (dir, kind, name, skip) in VALGRIND_TESTS {
        let binary = find_artifact(artifacts, dir, kind, name, true)?;
        println!("xtask: running {dir}'s {kind} target {name} under valgrind");
        let mut command = Command::new("valgrind");
        command
            .args([
                "--quiet",
                "--error-exitcode=97",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--show-leak-kinds=definite",
            ])
            .arg(&binary)
            .arg("--test-threads=1")
            // Property and mutation tests run fewer cases: valgrind is some fifty times slower.
            .env("PROPTEST_CASES", "24")
            .env("SHM_FUZZ_ROUNDS", "400");
        for name in *skip {
            command.args(["--skip", name]);
        }
        run(&mut command)?;
    }
    Ok(())
}

/// One executable of the test build.
#[derive(Debug)]
struct Artifact {
    /// The manifest of its package.
    manifest: PathBuf,
    /// Its target's kind (`lib`, `bin`, `test`, …) and name.
    kind: String,
    name: String,
    /// Whether it is a test harness (`cargo test`'s) rather than the target itself.
    harness: bool,
    executable: PathBuf,
}

/// The executables of the test build ([`TEST_BUILD`]), building whatever is missing: cargo's
/// JSON messages, one per line, read for the few fields needed.
fn test_artifacts() -> Result<Vec<Artifact>> {
    let output = Command::new(cargo_bin())
        .args(TEST_BUILD)
        .args(["--no-run", "--message-format=json"])
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !output.status.success() {
        return Err("building the tests failed".into());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("{\"reason\":\"compiler-artifact\""))
        .filter_map(|line| {
            let profile = &line[line.find("\"profile\":{")?..];
            Some(Artifact {
                manifest: PathBuf::from(json_string(line, r#""manifest_path":""#)?),
                kind: json_string(line, r#""kind":[""#)?.to_owned(),
                name: json_string(&line[line.find(r#""target":{"#)?..], r#""name":""#)?.to_owned(),
                harness: profile[..profile.find('}')?].contains("\"test\":true"),
                executable: PathBuf::from(json_string(line, r#""executable":""#)?),
            })
        })
        .collect())
}

/// The JSON string that follows the first `prefix` (which ends with its opening quote) in
/// `line`. Strings with escapes (a path with a quote or a backslash) are not found.
fn json_string<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let value = &line[line.find(prefix)? + prefix.len()..];
    let value = &value[..value.find('"')?];
    (!value.contains('\\')).then_some(value)
}

/// The executable of target `name` (of `kind`) in the package at `dir`, from `artifacts`.
fn find_artifact(
    artifacts: &[Artifact],
    dir: &str,
    kind: &str,
    name: &str,
    harness: bool,
) -> Result<PathBuf> {
    let manifest = root().join(dir).join("Cargo.toml");
    artifacts
        .iter()
        .find(|a| {
            a.manifest == manifest && a.kind == kind && a.name == name && a.harness == harness
        })
        .map(|a| a.executable.clone())
        .ok_or_else(|| format!("the test build made no {kind} executable {name} of {dir}"))
}

/// Runs the fuzzer (`crates/shm-fuzz`), in release mode, over every target for 60 seconds
/// each (unless the arguments say otherwise); a finding fails the task.
fn fuzz(args: &[String]) -> Result {
    run(Command::new(cargo_bin())
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "shm-fuzz",
            "--",
            "--secs",
            "60",
        ])
        .args(args)
        .current_dir(root()))
}

/// Runs the model-based test (`tests/tests/model.rs`) for many steps, in release mode.
fn soak(args: &[String]) -> Result {
    let mut command = Command::new(cargo_bin());
    command
        .args([
            "test",
            "--release",
            "-p",
            "shm-tests",
            "--test",
            "model",
            "--",
            "--nocapture",
        ])
        .current_dir(root())
        .env("SHM_MODEL_STEPS", "1000000");
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let variable = match flag.as_str() {
            "--steps" => "SHM_MODEL_STEPS",
            "--threads" => "SHM_MODEL_THREADS",
            "--seed" => "SHM_MODEL_SEED",
            other => return Err(format!("soak: unknown option {other}")),
        };
        let value = rest
            .next()
            .filter(|v| v.parse::<u64>().is_ok())
            .ok_or_else(|| format!("soak: {flag} takes a whole number"))?;
        command.env(variable, value);
    }
    let before = shm_listing()?;
    run(&mut command)?;
    let after = shm_listing()?;
    if after != before {
        return Err(format!(
            "/dev/shm changed during the soak: left behind {:?}",
            after.difference(&before).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

fn demo(args: &[String]) -> Result {
    let mut command = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "shm-examples",
        "--example",
        "demo",
        "--",
    ];
    command.extend(args.iter().map(String::as_str));
    cargo(&command)
}

/// Runs every benchmark, each of which writes a section into `target/bench/`, and joins the
/// sections into `target/bench/report.md` under a line that names the machine.
fn bench(args: &[String]) -> Result {
    let sections = [
        ("shm-bench", "core_bench", "core.md"),
        ("shm-bench", "codec_bench", "codec.md"),
        ("shm-bench", "arrow_bench", "arrow.md"),
        ("shm-bench", "transport_bench", "transport.md"),
        ("shm-bench", "channel_bench", "channel.md"),
        ("shm-bench", "workers_bench", "workers.md"),
        ("shm-bench", "flight_bench", "flight.md"),
    ];
    let python = python_env()?;
    install_python_package(&python, true)?;
    for (package, binary, _) in sections {
        run(Command::new(cargo_bin())
            .args([
                "run",
                "--release",
                "--quiet",
                "-p",
                package,
                // The peers of B2 (iceoryx2, from the registry), for the bench alone, and
                // the Flight benchmark.
                "--features",
                "shm-bench/iceoryx2,shm-bench/flight",
                "--bin",
                binary,
                "--",
            ])
            .args(args)
            .current_dir(root())
            .env("SHM_PYTHON", &python))?;
    }
    let dir = root().join("target/bench");
    let mut report = format!("# shm benchmarks\n\nMachine: {}\n\n", machine());
    for (_, _, file) in sections {
        let section =
            std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        report.push_str(&section);
        report.push('\n');
    }
    let path = dir.join("report.md");
    std::fs::write(&path, report).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nreport written to {}", path.display());
    Ok(())
}

/// The CPU model, core count and memory of this machine, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / (1 << 20) as f64);
    format!("{model}, {cores} cores, {memory_gib:.0} GiB")
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
    shm_core::list_files().map_err(|e| format!("/dev/shm: {e}"))
}
