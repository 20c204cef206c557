//! refdpo's fused ops (forward and every input's gradient) against the composed ones.

use super::optim::{bf16_weights_step, eight_bit_step, optimizer_step, quantized_round_trip};
use super::{dtype_name, guarded, tolerance, values, Check};
use crate::error::{Error, Result};
use crate::model::fused::tiled::Order;
use crate::model::fused::{self, AttnSoftmax, Kernel};
use candle_core::{DType, Device, Tensor, Var, D};

/// An op over its inputs (on one device, in one dtype).
type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// One fused op's case: its kernel, its inputs (CPU f32), how many of them (leading) get a
/// gradient, the fused op and the composed reference.
struct FusedCase {
    name: &'static str,
    kernel: Kernel,
    inputs: Vec<Tensor>,
    tracked: usize,
    fused: OpFn,
    composed: OpFn,
}

/// x in [B, H, T, D] from `order` (or back: the swap is its own inverse).
fn in_bhtd(x: &Tensor, order: Order) -> Result<Tensor> {
    Ok(match order {
        Order::Bhtd => x.clone(),
        Order::Bthd => x.transpose(1, 2)?.contiguous()?,
    })
}

/// The tiled attention with fewer queries than keys, as a shared prompt runs it: sequences of
/// 17, 70 and 5 keys in [1, T, H, D] whose last 17, 30 and 2 positions are queries (the kernels'
/// query offsets), against the composed attention over each whole sequence, the other
/// positions' queries zero and their outputs dropped.
fn shared_prompts_case() -> Result<FusedCase> {
    let (lens, queries) = ([17usize, 70, 5], [17usize, 30, 2]);
    let p = fused::tiled::Params {
        scale: 0.125,
        window: 0,
        softcap: None,
    };
    let packing = (
        std::sync::Arc::from(&lens[..]),
        std::sync::Arc::from(&queries[..]),
    );
    let (t, tq) = (lens.iter().sum::<usize>(), queries.iter().sum::<usize>());
    Ok(FusedCase {
        name: "tiled attention, fewer queries than keys (shared prompts)",
        kernel: Kernel::Tiled,
        inputs: vec![
            values(&[1, tq, 4, 64], 20)?,
            values(&[1, t, 2, 64], 21)?,
            values(&[1, t, 2, 64], 22)?,
        ],
        tracked: 3,
        fused: Box::new(move |t| {
            Ok(fused::tiled::tiled_attention_shared(
                &t[0],
                &t[1],
                &t[2],
                p,
                packing.clone(),
                Order::Bthd,
            )?)
        }),
        composed: Box::new(move |t| {
            let (mut at, mut q_at, mut outs) = (0, 0, Vec::new());
            for (&n, &m) in lens.iter().zip(&queries) {
                let part = |x: &Tensor| in_bhtd(&x.narrow(1, at, n)?, Order::Bthd);
                let own = t[0].narrow(1, q_at, m)?;
                let zeros = Tensor::zeros((1, n - m, 4, 64), own.dtype(), own.device())?;
                let q = in_bhtd(&Tensor::cat(&[&zeros, &own], 1)?, Order::Bthd)?;
                let o = fused::tiled::composed_attention(&q, &part(&t[1])?, &part(&t[2])?, p)?;
                outs.push(in_bhtd(&o, Order::Bthd)?.narrow(1, n - m, m)?);
                (at, q_at) = (at + n, q_at + m);
            }
            Ok(Tensor::cat(&outs, 1)?)
        }),
    })
}

/// refdpo's fused ops on `device` in `dtype`, forward and backward, against the composed ops on
/// the CPU in f32: each check its kernel's own, none of a kernel `REFDPO_FUSED` leaves out.
pub(super) fn fused_ops(device: &Device, dtype: DType, checks: &mut Vec<Check>) -> Result<()> {
    let tol = tolerance(dtype);
    let d = dtype_name(dtype);
    let (cos, sin) = {
        let f = values(&[17, 8], 5)?;
        (f.cos()?, f.sin()?)
    };
    let (cos_t, sin_t) = (cos.clone(), sin.clone());
    // 2 kv heads with 2 query heads each over T = 17: scores [b, kv, 2·17, 17]
    let attention = |window: usize| AttnSoftmax {
        scale: 0.25,
        group_rows: 17,
        q_offset: 0,
        window,
    };
    let mut cases = Vec::new();
    for (name, window) in [("attention row op", 0), ("attention row op, window 5", 5)] {
        let op = attention(window);
        cases.push(FusedCase {
            name,
            kernel: Kernel::Softmax,
            inputs: vec![(values(&[2, 2, 34, 17], 1)? * 16.0)?],
            tracked: 1,
            fused: Box::new(move |t| Ok(fused::attention_probs(&t[0], op)?)),
            composed: Box::new(move |t| Ok(op.composed(&t[0])?)),
        });
    }
    // and many rows: the weight's gradient from many blocks' partial sums (a batch's thousands)
    for (name, x) in [
        ("rms_norm", values(&[2, 17, 48], 2)?),
        ("rms_norm, 8192 rows", values(&[1, 8192, 48], 39)?),
    ] {
        cases.push(FusedCase {
            name,
            kernel: Kernel::Norm,
            inputs: vec![x, (values(&[48], 3)? + 1.5)?],
            tracked: 2,
            fused: Box::new(|t| Ok(fused::rms_norm(&t[0], &t[1], 1e-5)?)),
            composed: Box::new(|t| Ok(candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5)?)),
        });
    }
    cases.push(FusedCase {
        name: "rope",
        kernel: Kernel::Rope,
        inputs: vec![values(&[2, 3, 17, 16], 4)?, cos, sin],
        tracked: 1,
        fused: Box::new(|t| Ok(fused::rope(&t[0], &t[1], &t[2])?)),
        composed: Box::new(|t| Ok(candle_nn::rotary_emb::rope_slow(&t[0], &t[1], &t[2])?)),
    });
    // [b, t, heads, d]: the order the tiled attention's path keeps (no transposes)
    cases.push(FusedCase {
        name: "rope, positions before heads",
        kernel: Kernel::Rope,
        inputs: vec![values(&[2, 17, 3, 16], 4)?, cos_t, sin_t],
        tracked: 1,
        fused: Box::new(|t| Ok(fused::rope_in(Order::Bthd, &t[0], &t[1], &t[2])?)),
        composed: Box::new(|t| {
            let heads_first = t[0].transpose(1, 2)?.contiguous()?;
            let y = candle_nn::rotary_emb::rope_slow(&heads_first, &t[1], &t[2])?;
            Ok(y.transpose(1, 2)?)
        }),
    });
    cases.push(FusedCase {
        name: "swiglu",
        kernel: Kernel::Swiglu,
        inputs: vec![(values(&[2, 17, 48], 6)? * 4.0)?, values(&[2, 17, 48], 7)?],
        tracked: 2,
        fused: Box::new(|t| Ok(fused::swiglu(&t[0], &t[1])?)),
        composed: Box::new(|t| Ok((t[0].silu()? * &t[1])?)),
    });
    // The tiled attention, where it runs (every dtype on the CPU; bf16/f16 on CUDA): 4 query
    // heads over 2 kv heads in compiled tiles: heads 128 wide over T = 17 (one diagonal tile),
    // and 64 wide over T = 70, past the first 64-query tile (a key tile seen whole, unmasked).
    // The last in [B, T, H, D] (the kernels' strides for each position's heads together).
    let bhtd = Order::Bhtd;
    for (name, window, softcap, d, t, order) in [
        ("tiled attention", 0, None, 128, 17, bhtd),
        ("tiled attention, window 5", 5, None, 128, 17, bhtd),
        (
            "tiled attention, soft cap 5",
            0,
            Some(5.0f32),
            128,
            17,
            bhtd,
        ),
        (
            "tiled attention, heads 64 wide, T 70",
            0,
            None,
            64,
            70,
            bhtd,
        ),
        (
            "tiled attention, positions before heads, T 70",
            3,
            None,
            64,
            70,
            Order::Bthd,
        ),
    ] {
        if fused::tiled::uncovered(device, dtype, d, softcap.is_some(), 1 << 20).is_some() {
            continue;
        }
        let p = fused::tiled::Params {
            scale: 0.25,
            window,
            softcap,
        };
        let shape = |h| match order {
            Order::Bhtd => [2, h, t, d],
            Order::Bthd => [2, t, h, d],
        };
        cases.push(FusedCase {
            name,
            kernel: Kernel::Tiled,
            inputs: vec![
                values(&shape(4), 12)?,
                values(&shape(2), 13)?,
                values(&shape(2), 14)?,
            ],
            tracked: 3,
            fused: Box::new(move |t| {
                Ok(fused::tiled::tiled_attention_packed(
                    &t[0], &t[1], &t[2], p, None, order,
                )?)
            }),
            composed: Box::new(move |t| {
                let x = |i: usize| in_bhtd(&t[i], order);
                let o = fused::tiled::composed_attention(&x(0)?, &x(1)?, &x(2)?, p)?;
                in_bhtd(&o, order)
            }),
        });
    }
    // Packed sequences of 17, 70 and 5 positions in one row (the kernels' sequence offsets, as
    // stage one and packed training batches run them), against each sequence's own attention.
    if fused::tiled::uncovered(device, dtype, 64, false, 1 << 20).is_none() {
        let lens: std::sync::Arc<[usize]> = std::sync::Arc::from(vec![17, 70, 5]);
        let p = fused::tiled::Params {
            scale: 0.125,
            window: 0,
            softcap: None,
        };
        let packed = lens.clone();
        cases.push(FusedCase {
            name: "tiled attention, packed 17 + 70 + 5",
            kernel: Kernel::Tiled,
            inputs: vec![
                values(&[1, 4, 92, 64], 17)?,
                values(&[1, 2, 92, 64], 18)?,
                values(&[1, 2, 92, 64], 19)?,
            ],
            tracked: 3,
            fused: Box::new(move |t| {
                Ok(fused::tiled::tiled_attention_packed(
                    &t[0],
                    &t[1],
                    &t[2],
                    p,
                    Some(packed.clone()),
                    Order::Bhtd,
                )?)
            }),
            composed: Box::new(move |t| {
                let mut start = 0;
                let mut outs = Vec::new();
                for &len in lens.iter() {
                    let part = |x: &Tensor| x.narrow(2, start, len);
                    outs.push(fused::tiled::composed_attention(
                        &part(&t[0])?,
                        &part(&t[1])?,
                        &part(&t[2])?,
                        p,
                    )?);
                    start += len;
                }
                Ok(Tensor::cat(&outs, 2)?)
            }),
        });
        cases.push(shared_prompts_case()?);
    }
    for case in cases.iter().filter(|c| !fused::leaves_out(c.kernel)) {
        let run = |dev: &Device, dt: DType, f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars = case
                .inputs
                .iter()
                .map(|t| Ok(Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?)?))
                .collect::<Result<Vec<_>>>()?;
            let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&inputs)?.to_dtype(DType::F32)?;
            let weight = values(y.dims(), 9)?.to_device(dev)?;
            let store = (&y * weight)?.sum_all()?.backward()?;
            let grads = vars[..case.tracked]
                .iter()
                .map(|v| {
                    store.get(v.as_tensor()).cloned().ok_or_else(|| {
                        Error::Model(format!("selftest: no gradient through fused {}", case.name))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok::<_, Error>((y, grads))
        };
        let (want_y, want_g) = run(&Device::Cpu, DType::F32, &case.composed)?;
        let name = case.name;
        guarded(
            checks,
            device,
            format!("fused {name} {d}"),
            Some(case.kernel),
            |checks| {
                let (got_y, got_g) = run(device, dtype, &case.fused)?;
                checks.push(
                    Check::compare(format!("fused {name} forward {d}"), &got_y, &want_y, tol)?
                        .of(case.kernel),
                );
                for (i, (got, want)) in got_g.iter().zip(&want_g).enumerate() {
                    let which = if case.tracked > 1 {
                        format!(" (input {})", i + 1)
                    } else {
                        String::new()
                    };
                    checks.push(
                        Check::compare(
                            format!("fused {name} backward{which} {d}"),
                            got,
                            want,
                            tol,
                        )?
                        .of(case.kernel),
                    );
                }
                Ok(())
            },
        )?;
    }
    // gradient accumulation in place: rows 3..9 of a [9, 33] store (a view at an offset)
    if !fused::leaves_out(Kernel::Accumulate) {
        let (acc0, add) = (values(&[9, 33], 34)?, values(&[6, 33], 35)?);
        let want = Tensor::cat(&[acc0.narrow(0, 0, 3)?, (acc0.narrow(0, 3, 6)? + &add)?], 0)?;
        let name = format!("fused accumulation in place {d}");
        guarded(
            checks,
            device,
            name.clone(),
            Some(Kernel::Accumulate),
            |checks| {
                let acc = acc0.to_dtype(dtype)?.to_device(device)?.copy()?;
                fused::accumulate(&acc.narrow(0, 3, 6)?, &add.to_device(device)?)?;
                checks.push(Check::compare(name, &acc, &want, tol)?.of(Kernel::Accumulate));
                Ok(())
            },
        )?;
        // an embedding's gradient: 7 rows of 5 tokens (two repeated, one the skipped pad id)
        // into a [9, 33] table
        let ids = [4u32, 0, 4, 8, 2, 0, 4];
        let rows = values(&[7, 33], 36)?;
        let keep: Vec<u32> = ids.iter().map(|&t| u32::from(t != 8)).collect();
        let masked = rows.broadcast_mul(
            &Tensor::new(keep, &Device::Cpu)?
                .to_dtype(DType::F32)?
                .unsqueeze(1)?,
        )?;
        let want = acc0.index_add(&Tensor::new(&ids, &Device::Cpu)?, &masked, 0)?;
        let name = format!("fused embedding gradient in place {d}");
        guarded(
            checks,
            device,
            name.clone(),
            Some(Kernel::Accumulate),
            |checks| {
                let table = acc0.to_dtype(dtype)?.to_device(device)?.copy()?;
                fused::embed_grad(
                    &table,
                    &ids,
                    Some(8),
                    &rows.to_dtype(dtype)?.to_device(device)?,
                )?;
                checks.push(Check::compare(name, &table, &want, tol)?.of(Kernel::Accumulate));
                Ok(())
            },
        )?;
    }
    // completion log-probs: [6, 97] logits, their targets, an upstream gradient
    let logits = (values(&[6, 97], 10)? * 8.0)?;
    let targets = Tensor::new(&[0u32, 96, 5, 5, 40, 77], &Device::Cpu)?;
    let g = values(&[6], 11)?;
    let log_softmax = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let want_lp = log_softmax.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let onehot = Tensor::zeros((6, 97), DType::F32, &Device::Cpu)?.scatter_add(
        &targets.unsqueeze(1)?,
        &Tensor::ones((6, 1), DType::F32, &Device::Cpu)?,
        1,
    )?;
    let want_grad = (onehot - log_softmax.exp()?)?.broadcast_mul(&g.unsqueeze(1)?)?;
    let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
    if !fused::leaves_out(Kernel::Logprobs) {
        guarded(
            checks,
            device,
            format!("fused log-probs {d}"),
            Some(Kernel::Logprobs),
            |checks| {
                let dev_logits = on(&logits.to_dtype(dtype)?)?;
                let (lp, lse) = fused::logp_lse(&dev_logits, &on(&targets)?)?;
                checks.push(
                    Check::compare(format!("fused log-probs forward {d}"), &lp, &want_lp, tol)?
                        .of(Kernel::Logprobs),
                );
                let lse_g = fused::lse_and_grad(&lse, &on(&g)?)?;
                let grad = fused::logp_grad(&dev_logits, &on(&targets)?, &lse_g, 0)?;
                checks.push(
                    Check::compare(
                        format!("fused log-probs backward {d}"),
                        &grad,
                        &want_grad,
                        tol,
                    )?
                    .of(Kernel::Logprobs),
                );
                Ok(())
            },
        )?;
    }
    let adamw = !fused::leaves_out(Kernel::Adamw);
    if adamw {
        let (want_delta, want_norm) = optimizer_step(&Device::Cpu, DType::F32)?;
        guarded(
            checks,
            device,
            format!("fused optimizer step {d}"),
            Some(Kernel::Adamw),
            |checks| {
                let (delta, norm) = optimizer_step(device, dtype)?;
                checks.push(
                    Check::compare(
                        format!("fused optimizer step {d}"),
                        &delta,
                        &want_delta,
                        tol,
                    )?
                    .of(Kernel::Adamw),
                );
                checks.push(
                    Check::compare(format!("fused gradient norm {d}"), &norm, &want_norm, tol)?
                        .of(Kernel::Adamw),
                );
                Ok(())
            },
        )?;
    }
    // 8-bit moments (`train.optim = "adamw_8bit"`) beside a dense tensor: the weights' change,
    // the moments (codes on a midpoint may take the other neighbour: one map spacing) and norms
    if !fused::leaves_out(Kernel::Adamw8) && adamw {
        let (want_w, want_mv, want_norm) = eight_bit_step(&Device::Cpu, dtype)?;
        let name = format!("fused 8-bit optimizer step {d}");
        guarded(
            checks,
            device,
            name.clone(),
            Some(Kernel::Adamw8),
            |checks| {
                let (w, mv, norm) = eight_bit_step(device, dtype)?;
                checks.push(Check::compare(name, &w, &want_w, tol)?.of(Kernel::Adamw8));
                checks.push(
                    Check::compare(
                        format!("fused 8-bit optimizer step, moments {d}"),
                        &mv,
                        &want_mv,
                        0.02,
                    )?
                    .of(Kernel::Adamw8),
                );
                checks.push(
                    Check::compare(
                        format!("fused 8-bit optimizer step, norms {d}"),
                        &norm,
                        &want_norm,
                        tol,
                    )?
                    .of(Kernel::Adamw8),
                );
                Ok(())
            },
        )?;
    }
    if dtype == DType::BF16 {
        // bf16 master weights: each lands on a bf16 neighbour of the f32 result, so only the
        // mean over many elements is the f32 step's (means of 32,768: σ 1.5%; round-to-nearest
        // or a biased rounding is off by 50-100%)
        if adamw {
            let want = bf16_weights_step(&Device::Cpu, DType::F32)?;
            let name = "fused optimizer step, bf16 weights (means)";
            guarded(checks, device, name.into(), Some(Kernel::Adamw), |checks| {
                let got = bf16_weights_step(device, DType::BF16)?;
                checks.push(Check::compare(name.into(), &got, &want, 0.1)?.of(Kernel::Adamw));
                Ok(())
            })?;
        }
        // train.optim = "adamw_8bit": the composed ops' blockwise quantization round trip; a
        // value on a midpoint may take the other neighbour, one map spacing (1.4% of its
        // block's absmax at most) away
        let want = quantized_round_trip(&Device::Cpu)?;
        let name = "8-bit AdamW moments (quantized and back)";
        guarded(checks, device, name.into(), None, |checks| {
            let got = quantized_round_trip(device)?;
            checks.push(Check::compare(name.into(), &got, &want, 0.02)?);
            Ok(())
        })?;
    }
    Ok(())
}
