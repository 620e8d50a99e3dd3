//! Payload codecs over shm-core blocks: the layer between values and shared memory.
//!
//! This crate is where `ShmArray` (an ndarray view backed by a shared-memory block), the simple
//! one-block frame and the codec registry live. It holds no code yet: until it does, values
//! travel as raw [`shm_core::ShmBlock`]s.
