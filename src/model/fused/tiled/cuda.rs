//! Launching the committed cubins (`../triton/kernels/`, embedded by build.rs) as the manifest
//! says: module from the cubin's bytes, the entry point, the kernel's parameters in order and
//! then Triton's two scratch pointers (null: compile.py refuses kernels that need scratch),
//! num_warps × 32 threads, the manifest's dynamic shared memory. `../triton/cubin.py` launches
//! the same bytes the same way from Python, which is how a GPU host checks them.
//!
//! Tensors are contiguous, [B, H, T, D] or [B, T, H, D] ([`super::Order`]); sequence s is
//! positions [s·T, (s+1)·T) of the flat token axis, or, packed (B = 1), the positions of its
//! length after the sequences before it. Queries may be fewer ([`Queries`]): each sequence's
//! last positions, on their own axis of Tq positions (q, o, dq and the log-sum-exp).

use super::cpu::Dims;
use super::op::Params;
use super::plan::{self, Launch, Shape, Tiles, Value};
use crate::model::fused::cubins::launch::{arch, err, i32_of, launch, view, Arg, KernelElem};
use crate::model::fused::cubins::{dtype_name, Kernel, Want};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use std::rc::Rc;

/// Each sequence's query count (its last positions) and the query positions per batch row,
/// where the queries are fewer than the keys.
#[derive(Clone, Copy)]
pub struct Queries<'a> {
    pub lens: &'a [usize],
    pub t: usize,
}

/// Sequence offsets on the device: 0 and the running sums of the lengths.
struct Seqs {
    cu: CudaSlice<i32>,
}

/// Uploaded offsets with the lengths they were made from and the device's ordinal.
type Uploaded = (Vec<usize>, usize, Rc<Seqs>);

thread_local! {
    /// The offsets last uploaded (the keys' and the queries'): every layer's forward, recompute
    /// and backward of a micro-batch take the same, uploaded once (refdpo runs its CUDA work on
    /// one thread).
    static LAST_SEQS: std::cell::RefCell<Vec<Uploaded>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn offsets(dev: &CudaDevice, lens: &[usize]) -> Result<Rc<Seqs>> {
    let ordinal = dev.cuda_stream().context().ordinal();
    if let Some(hit) = LAST_SEQS.with_borrow(|last| {
        last.iter()
            .find(|(l, o, _)| l == lens && *o == ordinal)
            .map(|(_, _, s)| s.clone())
    }) {
        return Ok(hit);
    }
    let mut cu = vec![0i32];
    let mut at = 0;
    for len in lens {
        at += len;
        cu.push(i32_of("tokens", at)?);
    }
    let made = Rc::new(Seqs {
        cu: dev.clone_htod(&cu)?,
    });
    LAST_SEQS.with_borrow_mut(|last| {
        if last.len() == 2 {
            last.remove(0);
        }
        last.push((lens.to_vec(), ordinal, made.clone()));
    });
    Ok(made)
}

/// Each sequence's keys (`lens` packed, else one sequence per batch row) and queries (their
/// own where they are fewer, else the keys'), and the queries' positions per batch row.
struct Lengths {
    n: Dims,
    tq: usize,
    keys: Vec<usize>,
    queries: Vec<usize>,
}

impl Lengths {
    fn new(n: Dims, lens: Option<&[usize]>, queries: Option<Queries>) -> Self {
        let keys = lens.map_or_else(|| vec![n.t; n.b], <[usize]>::to_vec);
        Self {
            n,
            tq: queries.map_or(n.t, |q| q.t),
            queries: queries.map_or_else(|| keys.clone(), |q| q.lens.to_vec()),
            keys,
        }
    }

    fn shape(&self) -> Shape<'_> {
        Shape {
            n: self.n,
            tq: self.tq,
            keys: &self.keys,
            queries: &self.queries,
        }
    }
}

/// The attention kernel `name` for these inputs, or why there is none.
fn kernel(
    dev: &CudaDevice,
    name: &str,
    dtype: DType,
    n: Dims,
    p: &Params,
) -> Result<&'static Kernel> {
    let dt = dtype_name(dtype)
        .filter(|d| *d != "fp32")
        .ok_or_else(|| err(format!("{dtype:?} inputs (the kernels take bf16 and f16)")))?;
    let ty = format!("*{dt}");
    crate::model::fused::cubins::launch::kernel(&Want {
        kernel: name,
        arch: arch(dev)?,
        types: &[(0, &ty)],
        constexprs: &[
            ("BLOCK_D", super::block_d(n.d).into()),
            ("SOFTCAP", p.softcap.is_some().into()),
        ],
    })
}

/// A kernel's tile size.
fn block(k: &Kernel, name: &str) -> Result<usize> {
    k.tile(name)
        .ok_or_else(|| err(format!("{}: no {name} in the manifest", k.name)))
}

/// Launches `plan` on `kern`, each named buffer taken from `bufs` (each used once).
fn run<'r, 'v>(
    dev: &CudaDevice,
    kern: &Kernel,
    plan: &Launch,
    mut bufs: Vec<(&'static str, Arg<'r, 'v>)>,
) -> Result<()> {
    let mut args = Vec::with_capacity(plan.args.len());
    for (i, value) in plan.args.iter().enumerate() {
        args.push(match value {
            Value::Buf(name) => {
                let at = bufs.iter().position(|(b, _)| b == name).ok_or_else(|| {
                    err(format!(
                        "{}: no buffer {name} for argument {i}",
                        plan.kernel
                    ))
                })?;
                bufs.swap_remove(at).1
            }
            Value::Int(v) => Arg::I32(i32_of(&format!("{} argument {i}", plan.kernel), *v)?),
            Value::Float(v) => Arg::Float(*v),
        });
    }
    let [x, y, z] = plan.grid;
    let what = |axis| format!("{} grid {axis}", plan.kernel);
    let grid = (
        i32_of(&what("x"), x)? as u32,
        i32_of(&what("y"), y)? as u32,
        i32_of(&what("z"), z)? as u32,
    );
    launch(dev, kern, grid, &mut args)
}

/// The inputs: q, k and v with their layouts.
pub struct Qkv<'a> {
    pub q: &'a CudaStorage,
    pub ql: &'a Layout,
    pub k: &'a CudaStorage,
    pub kl: &'a Layout,
    pub v: &'a CudaStorage,
    pub vl: &'a Layout,
}

fn unsupported(dtype: DType) -> candle_core::Error {
    err(format!("{dtype:?} inputs (the kernels take bf16 and f16)"))
}

/// (o, lse [Hq, B·Tq] f32) of bf16/f16 q, k, v.
pub fn forward(
    x: Qkv<'_>,
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
    queries: Option<Queries>,
) -> Result<(CudaStorage, Tensor)> {
    match x.q.dtype() {
        DType::BF16 => forward_t::<half::bf16>(x, n, p, lens, queries),
        DType::F16 => forward_t::<half::f16>(x, n, p, lens, queries),
        other => Err(unsupported(other)),
    }
}

fn forward_t<T: KernelElem>(
    x: Qkv<'_>,
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
    queries: Option<Queries>,
) -> Result<(CudaStorage, Tensor)> {
    let dev = &x.q.device;
    let kern = kernel(dev, "flash_fwd", x.q.dtype(), n, p)?;
    let (qv, kv, vv) = (
        view::<T>(x.q, x.ql)?,
        view::<T>(x.k, x.kl)?,
        view::<T>(x.v, x.vl)?,
    );
    let lengths = Lengths::new(n, lens, queries);
    let (tq, keys, qs) = (lengths.tq, &lengths.keys, &lengths.queries);
    let plan = plan::forward(&lengths.shape(), p, block(kern, "BLOCK_M")?);
    // SAFETY: the forward writes every query row of every sequence, and the offsets cover all
    // B·Tq query tokens, so no element of o or lse is read unwritten.
    let mut o = unsafe { dev.alloc::<T>(n.b * n.hq * tq * n.d)? };
    let mut lse = unsafe { dev.alloc::<f32>(n.hq * n.b * tq)? };
    let (cu, cu_q) = (offsets(dev, keys)?, offsets(dev, qs)?);
    {
        let (mut ov, mut lv) = (o.slice_mut(..), lse.slice_mut(..));
        let bufs = vec![
            ("Q", T::arg(&qv)),
            ("K", T::arg(&kv)),
            ("V", T::arg(&vv)),
            ("O", T::arg_mut(&mut ov)),
            ("LSE", Arg::F32Mut(&mut lv)),
            ("CU", Arg::Offsets(&cu.cu)),
            ("CU_Q", Arg::Offsets(&cu_q.cu)),
        ];
        run(dev, kern, &plan, bufs)?;
    }
    let lse = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(lse, dev.clone())),
        (n.hq, n.b * tq),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok((CudaStorage::wrap_cuda_slice(o, dev.clone()), lse))
}

/// What the forward kept, for the backward.
pub struct Saved<'a> {
    pub o: &'a Tensor,
    pub grad: &'a Tensor,
    pub lse: &'a Tensor,
}

/// dq, dk, dv end to end in one buffer.
pub fn backward(
    x: Qkv<'_>,
    saved: Saved<'_>,
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
    queries: Option<Queries>,
) -> Result<CudaStorage> {
    match x.q.dtype() {
        DType::BF16 => backward_t::<half::bf16>(x, saved, n, p, lens, queries),
        DType::F16 => backward_t::<half::f16>(x, saved, n, p, lens, queries),
        other => Err(unsupported(other)),
    }
}

/// A saved tensor's CUDA storage, held while `f` reads it.
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(s) => f(s, l),
        _ => Err(err("the backward's saved tensors are not on the GPU".into())),
    }
}

fn backward_t<T: KernelElem>(
    x: Qkv<'_>,
    saved: Saved<'_>,
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
    queries: Option<Queries>,
) -> Result<CudaStorage> {
    let dev = &x.q.device;
    let dtype = x.q.dtype();
    let (k_delta, k_dkdv, k_dq) = (
        kernel(dev, "flash_bwd_delta", dtype, n, p)?,
        kernel(dev, "flash_bwd_dkdv", dtype, n, p)?,
        kernel(dev, "flash_bwd_dq", dtype, n, p)?,
    );
    let lengths = Lengths::new(n, lens, queries);
    let (tq, keys, qs) = (lengths.tq, &lengths.keys, &lengths.queries);
    let tiles = Tiles {
        delta_m: block(k_delta, "BLOCK_M")?,
        dkdv_n: block(k_dkdv, "BLOCK_N")?,
        dq_m: block(k_dq, "BLOCK_M")?,
    };
    let [p_delta, p_dkdv, p_dq] = plan::backward(&lengths.shape(), p, &tiles);
    let (nq, nk) = (n.b * n.hq * tq * n.d, n.b * n.hkv * n.t * n.d);
    let (cu, cu_q) = (offsets(dev, keys)?, offsets(dev, qs)?);
    // SAFETY: each pass writes every element of its output (delta per query row, dK/dV per key
    // row, dQ per query row), the offsets covering all B·Tq query and B·T key tokens.
    let mut delta = unsafe { dev.alloc::<f32>(n.hq * n.b * tq)? };
    let mut all = unsafe { dev.alloc::<T>(nq + 2 * nk)? };
    with_cuda(saved.o, |os, ol| {
        with_cuda(saved.grad, |gs, gl| {
            with_cuda(saved.lse, |ls, ll| {
                let (ov, gv) = (view::<T>(os, ol)?, view::<T>(gs, gl)?);
                let lse = view::<f32>(ls, ll)?;
                {
                    let mut deltav = delta.slice_mut(..);
                    let bufs = vec![
                        ("O", T::arg(&ov)),
                        ("DO", T::arg(&gv)),
                        ("DELTA", Arg::F32Mut(&mut deltav)),
                        ("CU_Q", Arg::Offsets(&cu_q.cu)),
                    ];
                    run(dev, k_delta, &p_delta, bufs)?;
                }
                let (qv, kv, vv) = (
                    view::<T>(x.q, x.ql)?,
                    view::<T>(x.k, x.kl)?,
                    view::<T>(x.v, x.vl)?,
                );
                let deltav = delta.slice(..);
                let (mut dq, mut rest) = all.split_at_mut(nq);
                let (mut dk, mut dv) = rest.split_at_mut(nk);
                let inputs = || {
                    vec![
                        ("Q", T::arg(&qv)),
                        ("K", T::arg(&kv)),
                        ("V", T::arg(&vv)),
                        ("DO", T::arg(&gv)),
                        ("LSE", Arg::F32(&lse)),
                        ("DELTA", Arg::F32(&deltav)),
                        ("CU", Arg::Offsets(&cu.cu)),
                        ("CU_Q", Arg::Offsets(&cu_q.cu)),
                    ]
                };
                let mut bufs = inputs();
                bufs.extend([("DK", T::arg_mut(&mut dk)), ("DV", T::arg_mut(&mut dv))]);
                run(dev, k_dkdv, &p_dkdv, bufs)?;
                let mut bufs = inputs();
                bufs.push(("DQ", T::arg_mut(&mut dq)));
                run(dev, k_dq, &p_dq, bufs)
            })
        })
    })?;
    Ok(CudaStorage::wrap_cuda_slice(all, dev.clone()))
}
