//! The MLP: gate and up projections, SiLU or GELU-tanh gating (SwiGLU fused where it applies),
//! the down projection.

use super::config::Activation;
use super::fused::{self, Kernel};
use super::lora::{Dropout, Proj};
use super::OpMode;
use crate::error::Result;
use crate::profile::{self, Phase};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) gate: Proj,
    pub(super) up: Proj,
    pub(super) down: Proj,
    pub(super) activation: Activation,
}

impl Mlp {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        dropout: Option<&Dropout>,
        mode: OpMode,
    ) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Mlp);
        let gate = self.gate.forward(x, dropout)?;
        if mode.fuses(x, Kernel::Swiglu) && self.activation == Activation::Silu {
            let h = fused::swiglu(&gate, &self.up.forward(x, dropout)?)?;
            return self.down.forward(&h, dropout);
        }
        let gate = match self.activation {
            Activation::Silu => gate.silu()?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let h = (gate * self.up.forward(x, dropout)?)?;
        self.down.forward(&h, dropout)
    }
}
