//! The op sets a forward can use, and which one each device gets: the one place the choice is
//! made (scoring, evaluation, decoding and training all ask here).

use super::fused::{self, Kernel};
use candle_core::{DType, Device, Tensor};

/// Which implementation of the fused ops a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpMode {
    /// candle's fused kernels; no gradients (reference forward).
    Fast,
    /// Composed from differentiable primitives (policy forward).
    Differentiable,
    /// refdpo's fused ops, differentiable ([`fused`]); where one does not apply (Gemma's GELU,
    /// Gemma 2's attention soft cap), the composed ops.
    Fused,
}

impl OpMode {
    /// For a frozen model's forward on `device`.
    pub fn scoring(device: &Device) -> Self {
        if fused::enabled(device) {
            Self::Fused
        } else {
            Self::Fast
        }
    }

    /// For a forward whose backward is taken, on `device`.
    pub fn training(device: &Device) -> Self {
        if fused::enabled(device) {
            Self::Fused
        } else {
            Self::Differentiable
        }
    }

    /// Whether `kernel` (RMSNorm, RoPE or SwiGLU) over x takes refdpo's fused op in this mode:
    /// in `Fused`; in a differentiable forward in f32 on the CPU too ([`Self::cpu_loops`]);
    /// never in `Fast`, which has candle's fused kernels, nor when `REFDPO_FUSED` leaves the
    /// kernel out.
    pub fn fuses(self, x: &Tensor, kernel: Kernel) -> bool {
        !fused::leaves_out(kernel)
            && match self {
                Self::Fused => true,
                Self::Differentiable => Self::cpu_loops(x.device(), x.dtype()),
                Self::Fast => false,
            }
    }

    /// Whether a differentiable forward in `dtype` on `device` runs refdpo's CPU loops, forward
    /// and backward, in place of composed nodes and candle's autograd through them (RMSNorm,
    /// RoPE, SwiGLU, the tiled attention in blocks): in f32 on the CPU, unless `REFDPO_FUSED=0`.
    pub fn cpu_loops(device: &Device, dtype: DType) -> bool {
        device.is_cpu() && dtype == DType::F32 && !fused::disabled()
    }
}
