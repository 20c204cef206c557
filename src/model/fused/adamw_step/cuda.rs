//! The step's launches on CUDA: `grad_sumsq` and `clip_norm` over every gradient, `adamw_multi`
//! over the dense tensors' chunks and, with 8-bit moments, `adamw8_multi` over theirs, all from
//! one table of addresses whose rows and chunks list the dense tensors first.

use super::{Eight, Hyper, Slot};
use crate::model::fused::cubins::launch::{arch, err, kernel, launch, view, Arg};
use crate::model::fused::cubins::{Kernel, Want};
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Result, Storage, StorageRef, Tensor};
use half::bf16;

/// `name` for bf16 state and bf16 weights (whichever of the two it takes).
fn kernel_for(name: &str, arch: u32, bf16: &[(&str, bool)]) -> Result<&'static Kernel> {
    let consts: Vec<(&str, serde_json::Value)> = bf16.iter().map(|&(k, b)| (k, b.into())).collect();
    kernel(&Want {
        kernel: name,
        arch,
        types: &[],
        constexprs: &consts,
    })
}

/// The device address of element `start` of a tensor's storage.
fn address<T: CudaDType>(s: &CudaStorage, start: usize, dev: &CudaDevice) -> Result<i64> {
    let stream = dev.cuda_stream();
    let (ptr, _record) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
    Ok((ptr + (start * std::mem::size_of::<T>()) as u64) as i64)
}

/// `t`'s address, its storage read-locked in `guards` until the launches are queued.
fn table_entry<'a>(
    t: &'a Tensor,
    dev: &CudaDevice,
    guards: &mut Vec<StorageRef<'a>>,
) -> Result<i64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(err(
            "the optimizer step's tensors are not all on CUDA".into()
        ));
    };
    let (start, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| err("the optimizer step's tensors must be contiguous".into()))?;
    let addr = match t.dtype() {
        DType::F32 => address::<f32>(s, start, dev)?,
        DType::BF16 => address::<bf16>(s, start, dev)?,
        DType::U8 => address::<u8>(s, start, dev)?,
        other => return Err(err(format!("the optimizer step takes no {other:?}"))),
    };
    guards.push(storage);
    Ok(addr)
}

pub fn step(
    dev: &CudaDevice,
    slots: &[Slot<'_>],
    eight: Option<&Eight<'_>>,
    h: Hyper,
    max_norm: f64,
) -> Result<f64> {
    let arch = arch(dev)?;
    // every gradient in the state dtype (`unsupported`): the dense slots', or the 8-bit ones'
    let any_g = slots
        .first()
        .map(|s| s.g)
        .or_else(|| eight.and_then(|e| e.slots.first()).map(|s| s.g));
    let Some(any_g) = any_g else {
        return Ok(0.0);
    };
    let any_w = slots
        .first()
        .map(|s| s.w)
        .or_else(|| eight.and_then(|e| e.slots.first()).map(|s| s.w))
        .unwrap_or(any_g);
    let bf16 = any_g.dtype() == DType::BF16;
    let w_bf16 = any_w.dtype() == DType::BF16;
    let sumsq = kernel_for("grad_sumsq", arch, &[("BF16", bf16)])?;
    let clip = kernel_for("clip_norm", arch, &[])?;
    let adamw = kernel_for("adamw_multi", arch, &[("BF16", bf16), ("W_BF16", w_bf16)])?;
    let chunk = adamw
        .tile("CHUNK")
        .filter(|&c| Some(c) == sumsq.tile("CHUNK"))
        .ok_or_else(|| err("grad_sumsq and adamw_multi disagree on CHUNK".into()))?;

    // A row of 7 words per tensor (`adamw.PTR_WORDS`): [w, m, v, g, seed m, seed v, seed w],
    // or for 8-bit moments [w, m codes, v codes, g, m absmax, v absmax, seed w] (the gradient
    // at word 3 either way, where grad_sumsq reads it); [tensor, start, end, decays] per chunk.
    let n_eight = eight.map_or(0, |e| e.slots.len());
    let mut guards = Vec::with_capacity(4 * slots.len() + 6 * n_eight);
    let mut ptrs = Vec::with_capacity(7 * (slots.len() + n_eight));
    let mut chunks = Vec::new();
    let add_chunks = |t: usize, n: usize, decays: bool, chunks: &mut Vec<i32>| {
        for start in (0..n).step_by(chunk) {
            // under 2^31 each (`unsupported`)
            let end = (start + chunk).min(n);
            chunks.extend([t as i32, start as i32, end as i32, i32::from(decays)]);
        }
    };
    for (t, s) in slots.iter().enumerate() {
        for x in [s.w, s.m, s.v, s.g] {
            ptrs.push(table_entry(x, dev, &mut guards)?);
        }
        ptrs.extend(s.seeds.map(i64::from));
        add_chunks(t, s.w.elem_count(), s.decays, &mut chunks);
    }
    let n_dense = chunks.len() / 4;
    for (t, s) in eight.iter().flat_map(|e| e.slots).enumerate() {
        for x in [s.w, s.m_codes, s.v_codes, s.g, s.m_absmax, s.v_absmax] {
            ptrs.push(table_entry(x, dev, &mut guards)?);
        }
        ptrs.push(i64::from(s.seed));
        add_chunks(slots.len() + t, s.w.elem_count(), s.decays, &mut chunks);
    }
    let n_chunks = chunks.len() / 4;
    let grid = |n: usize| -> Result<(u32, u32, u32)> {
        Ok((
            u32::try_from(n).map_err(|_| err("too many chunks".into()))?,
            1,
            1,
        ))
    };
    // Host-to-device copies from pageable memory are staged and return at once: no wait
    // for the backward still running.
    let stream = dev.cuda_stream();
    let table = stream.clone_htod(&ptrs).w()?;
    let chunks_dev = stream.clone_htod(&chunks).w()?;
    let mut partials = stream.alloc_zeros::<f32>(n_chunks.max(1)).w()?;
    let mut out = stream.alloc_zeros::<f64>(2).w()?;
    {
        let mut pv = partials.slice_mut(..);
        let mut args = [
            Arg::Table(&table),
            Arg::Offsets(&chunks_dev),
            Arg::F32Mut(&mut pv),
        ];
        launch(dev, sumsq, grid(n_chunks)?, &mut args)?;
    }
    {
        let pv = partials.slice(..);
        let mut args = [
            Arg::F32(&pv),
            Arg::I32(n_chunks as i32),
            Arg::F64Mut(&mut out),
            Arg::Double(max_norm),
        ];
        launch(dev, clip, (1, 1, 1), &mut args)?;
    }
    let f = |x: f64| Arg::Float(x as f32);
    let scalars = || {
        [
            f(h.beta1),
            f(1.0 - h.beta1),
            f(h.beta2),
            f(1.0 - h.beta2),
            f(h.decay),
            f(h.lr_bc1),
            f(h.inv_sqrt_bc2),
            f(h.eps),
        ]
    };
    if n_dense > 0 {
        let [a, b, c, d, e, g, i, j] = scalars();
        let mut args = [
            Arg::Table(&table),
            Arg::Offsets(&chunks_dev),
            Arg::F64(&out),
            a,
            b,
            c,
            d,
            e,
            g,
            i,
            j,
        ];
        launch(dev, adamw, grid(n_dense)?, &mut args)?;
    }
    if let Some(q8) = eight.filter(|_| n_chunks > n_dense) {
        let adamw8 = kernel_for("adamw8_multi", arch, &[("BF16", bf16), ("W_BF16", w_bf16)])?;
        if adamw8.tile("CHUNK") != Some(chunk) || adamw8.tile("QBLOCK") != Some(super::QBLOCK) {
            return Err(err(
                "adamw8_multi's CHUNK or QBLOCK is not the launcher's".into()
            ));
        }
        // the 8-bit tensors' chunks, which index the same table
        let chunks8 = stream.clone_htod(&chunks[n_dense * 4..]).w()?;
        let (maps, maps_layout) = q8.maps.storage_and_layout();
        let (bounds, bounds_layout) = q8.bounds.storage_and_layout();
        let (Storage::Cuda(maps), Storage::Cuda(bounds)) = (&*maps, &*bounds) else {
            return Err(err("the 8-bit maps are not on CUDA".into()));
        };
        let maps = view::<f32>(maps, maps_layout)?;
        let bounds = view::<f32>(bounds, bounds_layout)?;
        let [a, b, c, d, e, g, i, j] = scalars();
        let mut args = [
            Arg::Table(&table),
            Arg::Offsets(&chunks8),
            Arg::F64(&out),
            Arg::F32(&maps),
            Arg::F32(&bounds),
            a,
            b,
            c,
            d,
            e,
            g,
            i,
            j,
        ];
        launch(dev, adamw8, grid(n_chunks - n_dense)?, &mut args)?;
    }
    drop(guards);
    // The step's one device-to-host copy: [norm, coefficient].
    let host = stream.clone_dtoh(&out).w()?;
    Ok(host[0])
}
