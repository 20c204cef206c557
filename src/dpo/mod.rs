//! DPO objectives: the loss family and TRL-named metrics.

pub mod loss;
pub mod metrics;

pub use loss::{dpo_loss, LossKind, LossMix, LossOutput, LossParams, PairLogps};
pub use metrics::{Metric, MetricsAccumulator};
