//! The float element types the fused ops take (f32, bf16, f16), and contiguous access to a
//! storage: what the CPU loops and the CUDA launches share.

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

/// A float element, read and written as f32 (reductions accumulate in f32, as the kernels do).
pub trait Elem: WithDType {
    fn f(self) -> f32;
    fn of(v: f32) -> Self;
}

impl Elem for f32 {
    fn f(self) -> f32 {
        self
    }
    fn of(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn of(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn of(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `v` rounded to `T` and back: where transformers keeps an intermediate in the compute dtype.
pub fn round<T: Elem>(v: f32) -> f32 {
    T::of(v).f()
}

/// Runs `$body` with `$t` the Rust type of float dtype `$dtype`; other dtypes are an error.
macro_rules! with_float {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => Err($crate::model::fused::elem::unsupported($op, other)),
        }
    };
}
pub(crate) use with_float;

pub fn unsupported(op: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused {op}: unsupported dtype {dtype:?}"))
}

/// The elements of a contiguous layout (the wrappers make their inputs contiguous).
pub fn offsets(op: &str, layout: &Layout) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("fused {op}: input not contiguous")))
}

/// A contiguous CPU storage's elements.
pub fn slice<'a, T: WithDType>(op: &str, s: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let (a, b) = offsets(op, layout)?;
    Ok(&s.as_slice::<T>()?[a..b])
}
