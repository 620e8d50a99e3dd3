//! The parent/worker channel: workers spawned, called by method name, watched for crashes.
//!
//! This crate is where control messages travel through a shared-memory ring while payloads
//! travel as shared-memory references. It holds no code yet.
