//! The benchmarks and the demo of shm, as binaries of their own so that no library crate
//! carries them: `cargo xtask bench` runs `core_bench`, `codec_bench`, `arrow_bench`,
//! `transport_bench` and `channel_bench`, each of which writes a section of
//! `target/bench/report.md`; `cargo xtask demo` runs `demo`. The code they share is in
//! `src/bin/common`.
