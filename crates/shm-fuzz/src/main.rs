//! A mutation fuzzer for every decoder of bytes that come from another process, on stable
//! Rust: payloads, each codec's metadata, references, Arrow IPC blocks, channel frames.
//!
//! Each target starts from valid encodings (its seeds, made by our encoders at start-up) and
//! from the committed corpus (`crates/shm-fuzz/corpus/TARGET/`: the seeds as they were
//! written by `--write-corpus`, and any input that once was a finding, kept as a regression
//! case), mutates them (bit flips, interesting values, insertions, deletions, splices) and runs
//! the decoder on each result. Any result is fine — a value or a typed error — but a panic is
//! a finding: the input is written to `target/fuzz/findings/` and the run fails.
//!
//! `cargo xtask fuzz [--secs N] [--target NAME]` runs it in release mode;
//! `cargo xtask test` runs every target for a moment.

mod targets;

use std::cell::RefCell;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use shm_core::{PoolConfig, ShmPool};

use targets::{Harness, TARGETS, Target};

thread_local! {
    /// The message of the last panic on this thread, kept by the quiet panic hook.
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A small deterministic generator (xorshift64*), so that a run replays from its seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff_ffff,
    1 << 31,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// One to four mutations of `input`, sometimes spliced with another seed.
fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len());
        match rng.below(8) {
            0 if !data.is_empty() => data[at] ^= 1 << rng.below(8),
            1 if !data.is_empty() => data[at] = rng.next_u64() as u8,
            2 if !data.is_empty() => data[at] = INTERESTING[rng.below(5)] as u8,
            3 => {
                let bytes: Vec<u8> = (0..1 + rng.below(8))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                data.splice(at..at, bytes);
            }
            4 if !data.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            5 if data.len() >= 8 => {
                let at = rng.below(data.len() - 7);
                let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                data[at..at + 8].copy_from_slice(&value);
            }
            6 if !data.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                let chunk = data[at..end].to_vec();
                data.splice(at..at, chunk);
            }
            _ if !seeds.is_empty() => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    data
}

/// What one target's run found.
struct Outcome {
    executions: u64,
    /// Inputs that decoded to a value (the rest were refused with an error).
    decoded: u64,
    /// Seeds the decoder refused: a harness that does not reach the decoder.
    refused_seeds: usize,
    findings: Vec<String>,
}

/// The directory of a target's committed corpus.
fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The committed corpus of a target, in file-name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .collect()
}

/// FNV-1a of an input: the name of its file in the corpus or the findings.
fn input_hash(input: &[u8]) -> u64 {
    input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Writes every target's start-up seeds into its corpus directory.
fn write_corpus(harness: &Harness) -> std::io::Result<usize> {
    let mut written = 0;
    for target in TARGETS {
        let dir = corpus_dir(target.name);
        std::fs::create_dir_all(&dir)?;
        for seed in (target.seeds)(harness) {
            std::fs::write(dir.join(format!("seed-{:016x}", input_hash(&seed))), &seed)?;
            written += 1;
        }
    }
    Ok(written)
}

fn fuzz(target: &Target, harness: &Harness, budget: Duration, seed: u64) -> Outcome {
    let fresh = (target.seeds)(harness);
    let fresh_count = fresh.len();
    let mut seeds = fresh;
    // Committed inputs may name segments that no longer exist: they are run and mutated, but
    // only the fresh seeds must reach the decoder.
    seeds.extend(corpus(target.name));
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    let mut rng = Rng(seed | 1);
    let mut outcome = Outcome {
        executions: 0,
        decoded: 0,
        refused_seeds: 0,
        findings: Vec::new(),
    };
    let start = Instant::now();
    // The seeds and the corpus themselves first (every one of them, whatever the budget),
    // then mutants until the budget is spent.
    let mut pending: Vec<(Vec<u8>, bool)> = seeds
        .iter()
        .enumerate()
        .map(|(i, input)| (input.clone(), i < fresh_count))
        .rev()
        .collect();
    while (!pending.is_empty() || start.elapsed() < budget) && outcome.findings.len() < 10 {
        let (input, is_seed) = pending.pop().unwrap_or_else(|| {
            let base = &seeds[rng.below(seeds.len())];
            (mutate(&mut rng, base, &seeds), false)
        });
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (target.run)(harness, &input)
        }));
        outcome.executions += 1;
        match run {
            Ok(true) => outcome.decoded += 1,
            Ok(false) => outcome.refused_seeds += usize::from(is_seed),
            Err(_) => {
                let message = LAST_PANIC.with(|m| m.borrow().clone());
                outcome
                    .findings
                    .push(save_finding(target.name, &input, &message));
            }
        }
    }
    outcome
}

/// Writes a finding's input where the report points, and says what it was.
fn save_finding(target: &str, input: &[u8], message: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz/findings");
    let path = dir.join(format!("{target}-{:016x}.bin", input_hash(input)));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input));
    let place = match saved {
        Ok(()) => path.display().to_string(),
        Err(err) => format!("not saved: {err}"),
    };
    format!(
        "{target}: panic \"{message}\" on {} bytes ({place}); once fixed, copy it into \
         crates/shm-fuzz/corpus/{target}/ to keep it as a regression case",
        input.len()
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut secs = 10.0f64;
    let mut only: Option<String> = None;
    let mut seed = 0x5eed_u64;
    let write = args.iter().any(|a| a == "--write-corpus");
    let mut rest = args.iter().filter(|a| *a != "--write-corpus");
    while let Some(flag) = rest.next() {
        let value = rest.next();
        match (flag.as_str(), value) {
            ("--secs", Some(v)) if v.parse::<f64>().is_ok() => secs = v.parse().unwrap_or(secs),
            ("--target", Some(v)) => only = Some(v.clone()),
            ("--seed", Some(v)) if v.parse::<u64>().is_ok() => seed = v.parse().unwrap_or(seed),
            _ => {
                eprintln!(
                    "usage: shm-fuzz [--secs N] [--target NAME] [--seed S] [--write-corpus]; \
                     targets: {}",
                    TARGETS
                        .iter()
                        .map(|t| t.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return ExitCode::FAILURE;
            }
        }
    }
    // Panics are caught and counted; keep their message, print nothing on the way.
    std::panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|m| *m.borrow_mut() = info.to_string());
    }));
    let pool = match ShmPool::with_config(PoolConfig::default().with_cache_bytes(64 << 20)) {
        Ok(pool) => pool,
        Err(err) => {
            eprintln!("shm-fuzz: no pool: {err}");
            return ExitCode::FAILURE;
        }
    };
    let harness = Harness::new(pool);
    if write {
        return match write_corpus(&harness) {
            Ok(n) => {
                println!("wrote {n} seeds under {}", corpus_dir("").display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("shm-fuzz: cannot write the corpus: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let budget = Duration::from_secs_f64(secs);
    let mut failed = false;
    println!("| target | executions | per second | decoded to a value | findings |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for target in TARGETS {
        if only.as_deref().is_some_and(|name| name != target.name) {
            continue;
        }
        let start = Instant::now();
        let outcome = fuzz(target, &harness, budget, seed);
        println!(
            "| {} | {} | {:.0} | {} | {} |",
            target.name,
            outcome.executions,
            outcome.executions as f64 / start.elapsed().as_secs_f64(),
            outcome.decoded,
            outcome.findings.len()
        );
        for finding in &outcome.findings {
            eprintln!("finding: {finding}");
        }
        if outcome.refused_seeds > 0 {
            eprintln!(
                "{}: {} seeds were refused: the target does not reach its decoder",
                target.name, outcome.refused_seeds
            );
        }
        failed |= !outcome.findings.is_empty() || outcome.refused_seeds > 0;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
