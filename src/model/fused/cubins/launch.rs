//! Launching the committed cubins (embedded by build.rs) as the manifest says: module from the
//! cubin's bytes, the entry point, the kernel's parameters in order and then Triton's two
//! scratch pointers (null: compile.py refuses kernels that need scratch), num_warps × 32 threads,
//! the manifest's dynamic shared memory. `../triton/cubin.py` launches the same bytes the same way
//! from Python, which is how a GPU host checks them.

use super::{Kernel, Manifest, Want};
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUfunction_attribute, CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

include!(concat!(env!("OUT_DIR"), "/triton_cubins.rs"));

pub fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("Triton kernels: {msg}"))
}

/// The embedded manifest, parsed once.
pub fn manifest() -> Result<&'static Manifest> {
    static M: OnceLock<std::result::Result<Manifest, String>> = OnceLock::new();
    M.get_or_init(|| Manifest::embedded().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| err(e.clone()))
}

/// The cubin architecture for this GPU: sm_90 (Hopper: its cubins are sm_90a), sm_80 for every
/// 8.x (a cubin runs on later minors of its major).
/// Asked of the driver once per device: every attention layer and launch asks again.
pub fn arch(dev: &CudaDevice) -> Result<u32> {
    static CAPS: OnceLock<Mutex<HashMap<usize, (i32, i32)>>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let mut caps = CAPS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (major, minor) = match caps.get(&ctx.ordinal()) {
        Some(&cap) => cap,
        None => {
            let cap = ctx.compute_capability().w()?;
            caps.insert(ctx.ordinal(), cap);
            cap
        }
    };
    match major {
        9 if minor == 0 => Ok(90),
        8 => Ok(80),
        _ => Err(err(format!(
            "compute capability {major}.{minor}: the kernels are compiled for sm_80 and sm_90"
        ))),
    }
}

/// The kernel's function on `dev`, its module loaded once per device.
fn function(dev: &CudaDevice, k: &Kernel) -> Result<CudaFunction> {
    static FUNCS: OnceLock<Mutex<HashMap<(usize, String), CudaFunction>>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let key = (ctx.ordinal(), k.name.clone());
    let mut funcs = FUNCS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(f) = funcs.get(&key) {
        return Ok(f.clone());
    }
    let cubin = CUBINS
        .iter()
        .find(|(name, _)| *name == k.name)
        .ok_or_else(|| err(format!("{}.cubin is not embedded", k.name)))?
        .1;
    let module = ctx.load_module(Ptx::from_binary(cubin.to_vec())).w()?;
    let f = module.load_function(&k.entry).w()?;
    if k.shared > 48 << 10 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            k.shared as i32,
        )
        .w()?;
    }
    funcs.insert(key, f.clone());
    Ok(f)
}

/// One kernel argument as the manifest types it: a device tensor of some element type (read,
/// or written in place), sequence offsets, or a scalar.
pub enum Arg<'r, 'v> {
    Bf16(&'r CudaView<'v, bf16>),
    F16(&'r CudaView<'v, f16>),
    F32(&'r CudaView<'v, f32>),
    Bf16Mut(&'r mut CudaViewMut<'v, bf16>),
    F16Mut(&'r mut CudaViewMut<'v, f16>),
    F32Mut(&'r mut CudaViewMut<'v, f32>),
    Offsets(&'r CudaSlice<i32>),
    /// A table of int64 words (the optimizer's device addresses and seeds).
    Table(&'r CudaSlice<i64>),
    F64(&'r CudaSlice<f64>),
    F64Mut(&'r mut CudaSlice<f64>),
    I32(i32),
    Float(f32),
    Double(f64),
}

/// An element type the kernels take, and its argument.
pub trait KernelElem: CudaDType + DeviceRepr {
    fn arg<'r, 'v>(v: &'r CudaView<'v, Self>) -> Arg<'r, 'v>;
    fn arg_mut<'r, 'v>(v: &'r mut CudaViewMut<'v, Self>) -> Arg<'r, 'v>;
}

macro_rules! kernel_elem {
    ($t:ty, $in:ident, $out:ident) => {
        impl KernelElem for $t {
            fn arg<'r, 'v>(v: &'r CudaView<'v, Self>) -> Arg<'r, 'v> {
                Arg::$in(v)
            }
            fn arg_mut<'r, 'v>(v: &'r mut CudaViewMut<'v, Self>) -> Arg<'r, 'v> {
                Arg::$out(v)
            }
        }
    };
}
kernel_elem!(bf16, Bf16, Bf16Mut);
kernel_elem!(f16, F16, F16Mut);
kernel_elem!(f32, F32, F32Mut);

/// Launches `k` over `grid` with `args` (each checked against the manifest's parameter type),
/// then Triton's null scratch pointers.
pub fn launch(
    dev: &CudaDevice,
    k: &Kernel,
    grid: (u32, u32, u32),
    args: &mut [Arg<'_, '_>],
) -> Result<()> {
    if args.len() != k.params.len() {
        return Err(err(format!(
            "{}: {} arguments for {} parameters",
            k.name,
            args.len(),
            k.params.len()
        )));
    }
    let f = function(dev, k)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    for (i, a) in args.iter_mut().enumerate() {
        let ty = k.param_type(i).unwrap_or("");
        let given = match a {
            Arg::Bf16(v) => {
                b.arg(&**v);
                "*bf16"
            }
            Arg::F16(v) => {
                b.arg(&**v);
                "*fp16"
            }
            Arg::F32(v) => {
                b.arg(&**v);
                "*fp32"
            }
            Arg::Bf16Mut(v) => {
                b.arg(&mut **v);
                "*bf16"
            }
            Arg::F16Mut(v) => {
                b.arg(&mut **v);
                "*fp16"
            }
            Arg::F32Mut(v) => {
                b.arg(&mut **v);
                "*fp32"
            }
            Arg::Offsets(v) => {
                b.arg(*v);
                "*i32"
            }
            Arg::Table(v) => {
                b.arg(*v);
                "*i64"
            }
            Arg::F64(v) => {
                b.arg(*v);
                "*fp64"
            }
            Arg::F64Mut(v) => {
                b.arg(&mut **v);
                "*fp64"
            }
            Arg::I32(v) => {
                if let Some(why) = k.misfit(i, i64::from(*v)) {
                    return Err(err(why));
                }
                b.arg(&*v);
                "i32"
            }
            Arg::Float(v) => {
                b.arg(&*v);
                "fp32"
            }
            Arg::Double(v) => {
                b.arg(&*v);
                "fp64"
            }
        };
        if given != ty {
            return Err(err(format!(
                "{}: a {given} argument for parameter `{}`",
                k.name, k.params[i]
            )));
        }
    }
    let null = 0u64;
    for _ in 0..k.scratch_params {
        b.arg(&null);
    }
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (k.num_warps * 32, 1, 1),
        shared_mem_bytes: k.shared,
    };
    if grid.0 > 0 && grid.1 > 0 && grid.2 > 0 {
        // SAFETY: the arguments are the compiled kernel's parameters in order, each checked
        // against the manifest's type above (device pointers of its element type, i32/f32
        // scalars), then its two scratch pointers, which may be null since it needs no scratch
        // (compile.py); the callers size every buffer to what the kernel addresses (the
        // attention's contiguous [B, H, T, D] tensors and [Hq, B·T] statistics; the optimizer's
        // tables name only live, contiguous tensors of the types its kernels read, each chunk
        // within its tensor), and all of it is queued on the device's one stream.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(())
}

/// The kernel `want` names, or why there is none.
pub fn kernel(want: &Want<'_>) -> Result<&'static Kernel> {
    manifest()?.find(want).ok_or_else(|| {
        err(format!(
            "no {} compiled for sm_{} with {:?} {:?}",
            want.kernel, want.arch, want.types, want.constexprs
        ))
    })
}

/// `v` as a kernel's 32-bit integer.
pub fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("{what} = {v} exceeds the kernels' 32-bit offsets")))
}

/// A contiguous input's elements on the device, starting on a 16-byte boundary as the kernels
/// were compiled to assume.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err("input not contiguous".into()))?;
    if !(a * std::mem::size_of::<T>()).is_multiple_of(16) {
        return Err(err(format!(
            "an input starts at element {a}, not on a 16-byte boundary"
        )));
    }
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// A contiguous output updated in place, as [`view`] checks an input.
pub fn view_mut<'a, T: CudaDType>(
    s: &'a mut CudaStorage,
    l: &Layout,
) -> Result<CudaViewMut<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err("output not contiguous".into()))?;
    if !(a * std::mem::size_of::<T>()).is_multiple_of(16) {
        return Err(err(format!(
            "an output starts at element {a}, not on a 16-byte boundary"
        )));
    }
    Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b))
}
