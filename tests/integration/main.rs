//! Integration tests: one binary, one module per area. Tests that read `../shared/realdata` skip
//! (with a message) where it is absent.

mod common;
mod demo_pipeline;
mod fidelity;
mod stats;
mod train;
mod trl_fixtures;
