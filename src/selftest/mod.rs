//! `refdpo selftest [--device D]`: the device's numbers against the CPU f32 reference, so a user can
//! trust a GPU setup before spending hours on it. Each fused op's forward against the composed
//! version, each composed op's backward, and a whole random tiny model of each family — reference
//! log-probs and every parameter's gradient — in f32 and bf16. One line per check with its error
//! and tolerance; the command fails unless every check passes.

mod models;
mod ops;

use crate::error::Result;
use crate::model::init;
use candle_core::{DType, Device, Tensor};
use models::{decode, lora, model};
use ops::{fused_ops, ops};
use std::fmt::Write;

/// One comparison: the largest error relative to the reference's largest magnitude.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }

    /// `got` (any device, any dtype) against `want` (CPU f32).
    pub(super) fn compare(
        name: String,
        got: &Tensor,
        want: &Tensor,
        tolerance: f64,
    ) -> Result<Self> {
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        // A max over a tensor skips NaN, so count them first: any NaN fails.
        let nans = got
            .ne(&got)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let error = if nans == 0.0 && diff.is_finite() {
            f64::from(diff / scale)
        } else {
            f64::INFINITY
        };
        Ok(Self {
            name,
            error,
            tolerance,
        })
    }
}

/// Relative tolerance of a dtype's results against f32 on the CPU.
pub(super) fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 3e-2,
    }
}

pub(super) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "?",
    }
}

/// Deterministic values in [-1, 1) (the init formula's generator).
pub(super) fn values(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| init::uniform(seed, i + 1) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// How the device computes in a model check: f32 with full-precision matmuls, f32 with TF32
/// matmuls (what runs on CUDA use, as PyTorch's `allow_tf32`), or bf16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Precision {
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    pub(super) fn dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "f32 (TF32 matmuls)",
            Precision::Bf16 => "bf16",
        }
    }

    /// Relative L2 tolerance of the whole gradient. TF32 keeps 10 mantissa bits (about 1e-3
    /// per product; measured 0.9e-3 to 1.1e-3 on an H200); bf16 compute over f32 masters
    /// measured 1.7e-2 on the CPU for both families.
    pub(super) fn grad_tolerance(self) -> f64 {
        match self {
            Precision::F32 => 1e-4,
            Precision::Tf32 => 1e-2,
            Precision::Bf16 => 5e-2,
        }
    }
}

/// Runs every check on `device`; returns them in order. The f32 checks turn TF32 off, so they
/// test the kernels at full precision; on CUDA a TF32 set follows, as runs compute.
pub fn run(device: &Device) -> Result<Vec<Check>> {
    let tf32 = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let checks = all_checks(device);
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    checks
}

fn all_checks(device: &Device) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        ops(device, dtype, &mut checks)?;
        fused_ops(device, dtype, &mut checks)?;
    }
    let mut precisions = vec![Precision::F32, Precision::Bf16];
    if device.is_cuda() {
        precisions.push(Precision::Tf32);
    }
    for arch in [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "olmo2",
        "phi3",
        "gemma2",
        "gemma3_text",
    ] {
        for &p in &precisions {
            candle_core::cuda::set_gemm_reduced_precision_f32(p == Precision::Tf32);
            model(arch, device, p, &mut checks)?;
            decode(arch, device, p, &mut checks)?;
            // LoRA on a frozen base, plain and with Phi-3's fused projections
            if matches!(arch, "llama" | "phi3") {
                lora(arch, device, p, &mut checks)?;
            }
        }
    }
    Ok(checks)
}

/// The report: one line per check, then a summary line naming the device.
pub fn report(device: &str, checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let _ = writeln!(
            out,
            "{}  {:<width$}  error {:.1e}  tolerance {:.0e}",
            if c.passed() { "ok  " } else { "FAIL" },
            c.name,
            c.error,
            c.tolerance
        );
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    let _ = write!(
        out,
        "selftest on {device}: {} passed, {failed} failed",
        checks.len() - failed
    );
    (out, failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_fails_past_its_tolerance_and_on_nan() {
        let want = Tensor::new(&[1.0f32, -2.0, 4.0], &Device::Cpu).unwrap();
        let near = Tensor::new(&[1.0f32, -2.0, 4.0002], &Device::Cpu).unwrap();
        let off = Tensor::new(&[1.0f32, -2.1, 4.0], &Device::Cpu).unwrap();
        let nan = Tensor::new(&[1.0f32, f32::NAN, 4.0], &Device::Cpu).unwrap();
        assert!(Check::compare("near".into(), &near, &want, 1e-4)
            .unwrap()
            .passed());
        assert!(!Check::compare("off".into(), &off, &want, 1e-2)
            .unwrap()
            .passed());
        assert!(!Check::compare("nan".into(), &nan, &want, 1.0)
            .unwrap()
            .passed());
    }
}
