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

use super::cpu::{Dims, Order};
use super::op::Params;
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

/// (batch, token, head) strides of a contiguous tensor with `h` heads over `t` positions in
/// `n.order`.
fn strides<'r, 'v>(n: Dims, h: usize, t: usize) -> Result<[Arg<'r, 'v>; 3]> {
    let head = match n.order {
        Order::Bhtd => t * n.d,
        Order::Bthd => n.d,
    };
    Ok([
        Arg::I32(i32_of("batch stride", h * t * n.d)?),
        Arg::I32(i32_of("position stride", n.position_stride(h))?),
        Arg::I32(i32_of("head stride", head)?),
    ])
}

/// The sequences on the flat token axis: their offsets on the device (0, T, 2T, …, B·T, or the
/// running sums of packed lengths), how many, and the longest.
struct Seqs {
    cu: CudaSlice<i32>,
    count: u32,
    longest: usize,
}

/// Uploaded offsets with the lengths they were made from and the device's ordinal.
type Uploaded = (Vec<usize>, usize, Rc<Seqs>);

thread_local! {
    /// The offsets last uploaded (the keys' and the queries'): every layer's forward, recompute
    /// and backward of a micro-batch take the same, uploaded once (refdpo runs its CUDA work on
    /// one thread).
    static LAST_SEQS: std::cell::RefCell<Vec<Uploaded>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The keys' sequence offsets: `lens` packed, else one sequence per batch row.
fn seqs(dev: &CudaDevice, n: Dims, lens: Option<&[usize]>) -> Result<Rc<Seqs>> {
    match lens {
        Some(lens) => offsets(dev, lens),
        None => offsets(dev, &vec![n.t; n.b]),
    }
}

/// The queries' offsets: their own where they are fewer, else the keys'.
fn query_seqs(
    dev: &CudaDevice,
    n: Dims,
    lens: Option<&[usize]>,
    queries: Option<Queries>,
) -> Result<Rc<Seqs>> {
    match queries {
        Some(q) => offsets(dev, q.lens),
        None => seqs(dev, n, lens),
    }
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
    let made = Rc::new(upload(dev, lens)?);
    LAST_SEQS.with_borrow_mut(|last| {
        if last.len() == 2 {
            last.remove(0);
        }
        last.push((lens.to_vec(), ordinal, made.clone()));
    });
    Ok(made)
}

fn upload(dev: &CudaDevice, lens: &[usize]) -> Result<Seqs> {
    let mut cu = vec![0i32];
    let mut at = 0;
    for len in lens {
        at += len;
        cu.push(i32_of("tokens", at)?);
    }
    Ok(Seqs {
        cu: dev.clone_htod(&cu)?,
        count: i32_of("sequences", lens.len())? as u32,
        longest: lens.iter().copied().max().unwrap_or(0),
    })
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

/// Grid rows per sequence: ⌈longest / block⌉ (a shorter sequence's extra programs return).
fn tiles(sq: &Seqs, block: usize) -> Result<u32> {
    Ok(i32_of("tiles", sq.longest.div_ceil(block))? as u32)
}

/// The scalar arguments every attention kernel but the delta ends with (`tq` query positions
/// per batch row).
fn scalars<'r, 'v>(n: Dims, tq: usize, p: &Params) -> Result<[Arg<'r, 'v>; 8]> {
    Ok([
        Arg::I32(i32_of("positions", n.t)?),
        Arg::I32(i32_of("query positions", tq)?),
        Arg::I32(i32_of("query tokens", n.b * tq)?),
        Arg::I32(i32_of("head dim", n.d)?),
        Arg::I32(i32_of("groups", n.hq / n.hkv)?),
        Arg::I32(i32_of("window", p.window)?),
        Arg::Float(p.scale),
        Arg::Float(p.softcap.unwrap_or(1.0)),
    ])
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
    let tq = queries.map_or(n.t, |q| q.t);
    let nq = n.b * n.hq * tq * n.d;
    // SAFETY: the forward writes every query row of every sequence, and the offsets cover all
    // B·Tq query tokens, so no element of o or lse is read unwritten.
    let mut o = unsafe { dev.alloc::<T>(nq)? };
    let mut lse = unsafe { dev.alloc::<f32>(n.hq * n.b * tq)? };
    let (sk, sq) = (seqs(dev, n, lens)?, query_seqs(dev, n, lens, queries)?);
    {
        let (mut ov, mut lv) = (o.slice_mut(..), lse.slice_mut(..));
        let mut args = vec![
            T::arg(&qv),
            T::arg(&kv),
            T::arg(&vv),
            T::arg_mut(&mut ov),
            Arg::F32Mut(&mut lv),
            Arg::Offsets(&sk.cu),
            Arg::Offsets(&sq.cu),
        ];
        for (h, t) in [(n.hq, tq), (n.hkv, n.t), (n.hkv, n.t), (n.hq, tq)] {
            args.extend(strides(n, h, t)?);
        }
        args.extend(scalars(n, tq, p)?);
        // a program per query tile of each sequence's positions (those before its queries
        // return at once)
        let grid = (tiles(&sk, block(kern, "BLOCK_M")?)?, sk.count, n.hq as u32);
        launch(dev, kern, grid, &mut args)?;
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
    let tq = queries.map_or(n.t, |q| q.t);
    let (nq, nk) = (n.b * n.hq * tq * n.d, n.b * n.hkv * n.t * n.d);
    let (sk, sq) = (seqs(dev, n, lens)?, query_seqs(dev, n, lens, queries)?);
    // SAFETY: each pass writes every element of its output (delta per query row, dK/dV per key
    // row, dQ per query row), the offsets covering all B·Tq query and B·T key tokens.
    let mut delta = unsafe { dev.alloc::<f32>(n.hq * n.b * tq)? };
    let mut all = unsafe { dev.alloc::<T>(nq + 2 * nk)? };
    with_cuda(saved.o, |os, ol| {
        with_cuda(saved.grad, |gs, gl| {
            with_cuda(saved.lse, |ls, ll| {
                let (ov, gv) = (view::<T>(os, ol)?, view::<T>(gs, gl)?);
                let lse = view::<f32>(ls, ll)?;
                // delta = Σ_d o · do per query row, on the queries' axis.
                {
                    let mut deltav = delta.slice_mut(..);
                    let mut args = vec![
                        T::arg(&ov),
                        T::arg(&gv),
                        Arg::F32Mut(&mut deltav),
                        Arg::Offsets(&sq.cu),
                    ];
                    args.extend(strides(n, n.hq, tq)?);
                    args.extend(strides(n, n.hq, tq)?);
                    args.extend([
                        Arg::I32(i32_of("query positions", tq)?),
                        Arg::I32(i32_of("query tokens", n.b * tq)?),
                        Arg::I32(i32_of("head dim", n.d)?),
                    ]);
                    let grid = (
                        tiles(&sq, block(k_delta, "BLOCK_M")?)?,
                        sq.count,
                        n.hq as u32,
                    );
                    launch(dev, k_delta, grid, &mut args)?;
                }
                let (qv, kv, vv) = (
                    view::<T>(x.q, x.ql)?,
                    view::<T>(x.k, x.kl)?,
                    view::<T>(x.v, x.vl)?,
                );
                let deltav = delta.slice(..);
                let (mut dq, mut rest) = all.split_at_mut(nq);
                let (mut dk, mut dv) = rest.split_at_mut(nk);
                // Q, K, V, dO, LSE, DELTA, then the outputs, CU, CU_Q and the inputs' strides.
                let ins = [&qv, &kv, &vv, &gv];
                let input_strides = [(n.hq, tq), (n.hkv, n.t), (n.hkv, n.t), (n.hq, tq)];
                // dK and dV: grid over the key tiles of each kv head.
                {
                    let mut args: Vec<Arg<'_, '_>> = ins.iter().map(|v| T::arg(v)).collect();
                    args.extend([Arg::F32(&lse), Arg::F32(&deltav)]);
                    args.extend([
                        T::arg_mut(&mut dk),
                        T::arg_mut(&mut dv),
                        Arg::Offsets(&sk.cu),
                        Arg::Offsets(&sq.cu),
                    ]);
                    for (h, t) in input_strides.into_iter().chain([(n.hkv, n.t); 2]) {
                        args.extend(strides(n, h, t)?);
                    }
                    args.extend(scalars(n, tq, p)?);
                    let grid = (
                        tiles(&sk, block(k_dkdv, "BLOCK_N")?)?,
                        sk.count,
                        n.hkv as u32,
                    );
                    launch(dev, k_dkdv, grid, &mut args)?;
                }
                // dQ: grid over the query tiles of each head's sequence positions.
                let mut args: Vec<Arg<'_, '_>> = ins.iter().map(|v| T::arg(v)).collect();
                args.extend([Arg::F32(&lse), Arg::F32(&deltav)]);
                args.extend([
                    T::arg_mut(&mut dq),
                    Arg::Offsets(&sk.cu),
                    Arg::Offsets(&sq.cu),
                ]);
                for (h, t) in input_strides.into_iter().chain([(n.hq, tq)]) {
                    args.extend(strides(n, h, t)?);
                }
                args.extend(scalars(n, tq, p)?);
                let grid = (tiles(&sk, block(k_dq, "BLOCK_M")?)?, sk.count, n.hq as u32);
                launch(dev, k_dq, grid, &mut args)
            })
        })
    })?;
    Ok(CudaStorage::wrap_cuda_slice(all, dev.clone()))
}
