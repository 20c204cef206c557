//! Tiled attention (FlashAttention-2's algorithm): the [T, T] scores never reach memory. Each
//! program holds a tile of queries against tiles of keys and values with an online softmax in
//! f32, and the backward recomputes the probabilities from the saved log-sum-exp. Causal, sliding
//! window, grouped-query heads without repeated K/V, and Gemma 2's soft cap.
//!
//! The kernels are Triton (`../triton/flash_attn.py`), committed as cubins ([`super::cubins`]);
//! `cuda` launches them. On the CPU the op computes the same attention in f32 blocks with gemm
//! (`cpu_blocks`, what CPU training runs) and in plain loops for the other dtypes ([`cpu`], the
//! reference the blocks are tested against).

pub mod cpu;
mod cpu_blocks;
#[cfg(feature = "cuda")]
mod cuda;
mod op;
#[cfg(any(feature = "cuda", test))]
mod plan;

pub use cpu::Order;
pub use op::{
    composed_attention, tiled_attention, tiled_attention_packed, tiled_attention_shared, Params,
};

use super::cubins::{Manifest, Want};
use candle_core::{DType, Device};

/// The head-dim tile a head of `head_dim` runs in: the next power of two.
pub fn block_d(head_dim: usize) -> usize {
    head_dim.next_power_of_two()
}

/// Why the tiled op does not take this attention on `device`, or `None` when it does. The CPU
/// loops take every float dtype and head size; CUDA takes what the manifest compiled for the
/// GPU's architecture, with every tensor under the kernels' 32-bit offsets.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn uncovered(
    device: &Device,
    dtype: DType,
    head_dim: usize,
    softcap: bool,
    largest_tensor: usize,
) -> Option<String> {
    match device {
        Device::Cpu => None,
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use super::cubins::launch;
            let (arch, manifest) = match (launch::arch(dev), launch::manifest()) {
                (Ok(arch), Ok(m)) => (arch, m),
                (Err(e), _) | (_, Err(e)) => return Some(e.to_string()),
            };
            compiled_for(manifest, arch, dtype, head_dim, softcap, largest_tensor)
        }
        other => Some(format!("no tiled attention on {other:?}")),
    }
}

/// Why `manifest` has no tiled attention for these inputs on `arch`: the four kernels compiled
/// for the dtype, head tile and soft cap, a head dim that is a multiple of 16 (so are the
/// strides of contiguous [B, H, T, D] and [B, T, H, D] tensors, as the kernels were compiled to
/// assume), and
/// every tensor under 2^31 elements.
pub fn compiled_for(
    manifest: &Manifest,
    arch: u32,
    dtype: DType,
    head_dim: usize,
    softcap: bool,
    largest_tensor: usize,
) -> Option<String> {
    if largest_tensor >= 1 << 31 {
        return Some(format!(
            "{largest_tensor} elements exceed the kernels' 32-bit offsets"
        ));
    }
    if !head_dim.is_multiple_of(16) {
        return Some(format!(
            "head dim {head_dim} is not a multiple of 16 (the kernels' vector loads)"
        ));
    }
    let ty = match dtype {
        DType::BF16 => "*bf16",
        DType::F16 => "*fp16",
        other => return Some(format!("{other:?} inputs (the kernels take bf16 and f16)")),
    };
    let d = block_d(head_dim);
    for kernel in [
        "flash_fwd",
        "flash_bwd_delta",
        "flash_bwd_dkdv",
        "flash_bwd_dq",
    ] {
        let want = Want {
            kernel,
            arch,
            types: &[(0, ty)],
            constexprs: &[("BLOCK_D", d.into()), ("SOFTCAP", softcap.into())],
        };
        if manifest.find(&want).is_none() {
            return Some(format!(
                "no {kernel} compiled for sm_{arch}, {dtype:?}, head dim {head_dim} (tile {d}){}",
                if softcap { ", soft cap" } else { "" }
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_names_what_is_missing() {
        let m = Manifest::embedded().unwrap();
        let (bf16, f16) = (DType::BF16, DType::F16);
        // Qwen2-0.5B (64), Qwen2-1.5B and Llama (128), Phi-3 (96 in the 128 tile), Gemma 2
        // (256, capped), Gemma 2 27B (128, capped).
        for (d, cap) in [
            (64, false),
            (128, false),
            (96, false),
            (256, true),
            (128, true),
        ] {
            for arch in [80, 90] {
                for dtype in [bf16, f16] {
                    let why = compiled_for(&m, arch, dtype, d, cap, 1 << 20);
                    assert_eq!(why, None, "{d} {cap} {arch}");
                }
            }
        }
        let why = compiled_for(&m, 90, DType::F32, 64, false, 1 << 20).unwrap();
        assert!(why.contains("F32"), "{why}");
        let why = compiled_for(&m, 75, bf16, 64, false, 1 << 20).unwrap();
        assert!(why.contains("sm_75"), "{why}");
        let why = compiled_for(&m, 90, bf16, 512, false, 1 << 20).unwrap();
        assert!(why.contains("head dim 512"), "{why}");
        let why = compiled_for(&m, 90, bf16, 64, true, 1 << 20).unwrap();
        assert!(why.contains("soft cap"), "{why}");
        let why = compiled_for(&m, 90, bf16, 24, false, 1 << 20).unwrap();
        assert!(why.contains("multiple of 16"), "{why}");
        let why = compiled_for(&m, 90, bf16, 64, false, 1 << 31).unwrap();
        assert!(why.contains("32-bit"), "{why}");
    }
}
