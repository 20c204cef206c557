//! Where a model's tensors come from ([`ParamSource`]): plain loaded tensors, or the policy's
//! tracked variables and LoRA adapters.

use super::lora::{Adapter, Proj};
use crate::error::{Error, Result};
use candle_core::Tensor;
use candle_nn::Linear;

/// Where a model's tensors come from: named HF tensors in the compute dtype, and LoRA adapters
/// of projections (by HF module name) where there are any.
pub trait ParamSource {
    fn get(&self, name: &str) -> Result<Tensor>;

    fn adapter(&self, _module: &str) -> Result<Option<Adapter>> {
        Ok(None)
    }
}

impl ParamSource for std::collections::HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::Model(format!("tensor `{name}` is missing from the weights")))
    }
}

pub(super) fn linear(p: &dyn ParamSource, prefix: &str, bias: bool) -> Result<Proj> {
    let w = p.get(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(p.get(&format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Proj::new(Linear::new(w, b), p.adapter(prefix)?, prefix))
}
