//! refdpo: offline Direct Preference Optimization with a cached reference model.
//!
//! Data flows one way: [`data`] → [`tokenize`] → [`model`] → [`logprobs`] → [`cache`] →
//! [`train`] / [`stats`]. [`inputs`] resolves a run's dataset, model and tokenizer in one place.
//! Stage one ([`precompute`]) runs the frozen reference once and writes the cache; stage two
//! ([`train`]) reads it through a memory map and trains only the policy.

pub mod cache;
pub mod cli;
pub mod config;
pub mod data;
pub mod dpo;
pub mod error;
pub mod generate;
pub mod hub;
pub mod inputs;
pub mod logprobs;
pub mod model;
pub mod outputs;
pub mod precompute;
pub mod profile;
pub mod progress;
pub mod rng;
pub mod run;
pub mod selftest;
pub mod show;
pub mod signals;
pub mod stats;
pub mod tokenize;
pub mod train;

#[cfg(test)]
mod test_util;

pub use config::Config;
pub use error::{Error, Result};
