//! Apache Arrow record batches in shared memory: per-column frames and Arrow IPC blocks.
//!
//! This crate is where a `RecordBatch` is laid out column by column in shared-memory blocks and
//! read back zero-copy. It holds no code yet.
