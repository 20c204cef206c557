//! Loading and launching the fused kernels: the PTX that build.rs compiles from `kernels.cu`
//! with nvcc under `--features cuda`, loaded once per device as its own module.

use super::elem::offsets;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result};

pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
pub const MODULE: &str = "refdpo_fused";

/// A contiguous input's elements on the device.
pub fn view<'a, T: CudaDType>(
    op: &str,
    s: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    let (a, b) = offsets(op, layout)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// One block per row of `cols` elements.
pub fn per_row(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(cols), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a kernel that reduces rows of `cols` elements: about four elements per
/// thread, a multiple of the warp, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

/// A grid-stride loop over `n` elements.
pub fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` as a kernel's 32-bit count: every fused kernel indexes in 32 bits.
pub fn count(op: &str, n: usize) -> Result<u32> {
    if n >= 1 << 31 {
        return Err(candle_core::Error::Msg(format!(
            "fused {op}: {n} elements exceed the kernels' 32-bit indexing"
        )));
    }
    Ok(n as u32)
}

/// Allocates the output `$out` ($len elements of $t) on `$dev`, then launches kernel `$name`
/// with `$cfg` and the arguments in order (an empty grid launches nothing); yields `$out`.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $out:ident: $t:ty = $len:expr; $($arg:expr),* $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let dev: &candle_core::CudaDevice = $dev;
        let cfg: candle_core::cuda_backend::cudarc::driver::LaunchConfig = $cfg;
        let func = dev.get_or_load_custom_func(&$name, $crate::model::fused::launch::MODULE, $crate::model::fused::launch::PTX)?;
        // SAFETY: the output is allocated uninitialized and every kernel writes each element of
        // its output (its loops cover the whole output; `kernels.cu`); the arguments are the
        // kernel's declared types in its order: device views of contiguous inputs of the checked
        // dtype and lengths, and u32/f32 scalars; all of it is queued on the device's one stream.
        let $out: candle_core::cuda_backend::cudarc::driver::CudaSlice<$t>;
        unsafe {
            $out = dev.alloc::<$t>($len)?;
            if cfg.grid_dim.0 > 0 && $len > 0 {
                let mut builder = func.builder();
                $( builder.arg($arg); )*
                builder.launch(cfg).w()?;
            }
        }
        $out
    }};
}
pub(crate) use launch;

/// Launches kernel `$name` with `$cfg` on arguments that include an output updated in place
/// (an empty grid launches nothing).
macro_rules! launch_in_place {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let dev: &candle_core::CudaDevice = $dev;
        let cfg: candle_core::cuda_backend::cudarc::driver::LaunchConfig = $cfg;
        let func = dev.get_or_load_custom_func(&$name, $crate::model::fused::launch::MODULE, $crate::model::fused::launch::PTX)?;
        if cfg.grid_dim.0 > 0 {
            let mut builder = func.builder();
            $( builder.arg($arg); )*
            // SAFETY: as in `launch!`: the arguments are the kernel's declared types in its
            // order (device views of contiguous tensors of the checked dtype and length, the
            // updated one borrowed mutably, and u32 scalars), queued on the device's one stream.
            unsafe { builder.launch(cfg) }.w()?;
        }
    }};
}
pub(crate) use launch_in_place;
