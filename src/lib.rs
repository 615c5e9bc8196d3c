//! SecuMon: a Prometheus- and OpenTelemetry-compatible metrics backend.
//!
//! Layers, one direction only: `api` (protocols) → `ingest` and `promql` → `storage` (trait) →
//! backends. `model` (and `varint`) is shared by all.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod fleet;
pub mod ingest;
pub mod model;
pub mod promql;
pub mod rules;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod varint;
