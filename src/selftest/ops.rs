//! The op checks: candle's fused ops' forward and the composed ops' backward (refdpo's own fused
//! ops are `fused.rs`'s).

use super::{dtype_name, tolerance, values, Check};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// Fused forwards against the composed ops, and the composed ops' backward, on `device`.
pub(super) fn ops(device: &Device, dtype: DType, checks: &mut Vec<Check>) -> Result<()> {
    let tol = tolerance(dtype);
    let d = dtype_name(dtype);
    let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
    // [b, heads, T, T] scores, [b, T, H] activations, [b, heads, T, hd] rope inputs
    let scores = (values(&[2, 3, 17, 17], 1)? * 4.0)?;
    let x = values(&[2, 17, 48], 2)?;
    let w = (values(&[48], 3)? + 1.5)?;
    let q = values(&[2, 3, 17, 16], 4)?;
    let (cos, sin) = {
        let f = values(&[17, 8], 5)?;
        (f.cos()?, f.sin()?)
    };
    let softmax_ref = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let norm_ref = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5)?;
    let rope_ref = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?;
    let fused = [
        (
            "softmax_last_dim",
            candle_nn::ops::softmax_last_dim(&on(&scores)?)?,
            &softmax_ref,
        ),
        (
            "rms_norm",
            candle_nn::ops::rms_norm(&on(&x)?, &on(&w)?, 1e-5)?,
            &norm_ref,
        ),
        (
            "rope",
            candle_nn::rotary_emb::rope(&on(&q)?, &on(&cos)?, &on(&sin)?)?,
            &rope_ref,
        ),
    ];
    for (name, got, want) in fused {
        checks.push(Check::compare(
            format!("{name} forward {d}"),
            &got,
            want,
            tol,
        )?);
    }
    // Backward of the composed ops (what training runs), through a fixed weighting of the output.
    type Op = dyn Fn(&Tensor, &Device, DType) -> Result<Tensor>;
    let composed: [(&str, &Tensor, Box<Op>); 4] = [
        (
            "softmax",
            &scores,
            Box::new(|s, _, _| Ok(candle_nn::ops::softmax(s, D::Minus1)?)),
        ),
        (
            "rms_norm",
            &x,
            Box::new(move |x, dev, dt| {
                let w = w.to_dtype(dt)?.to_device(dev)?;
                Ok(candle_nn::ops::rms_norm_slow(x, &w, 1e-5)?)
            }),
        ),
        (
            "rope",
            &q,
            Box::new(move |q, dev, dt| {
                let (c, s) = (
                    cos.to_dtype(dt)?.to_device(dev)?,
                    sin.to_dtype(dt)?.to_device(dev)?,
                );
                Ok(candle_nn::rotary_emb::rope_slow(q, &c, &s)?)
            }),
        ),
        ("silu", &x, Box::new(|x, _, _| Ok(x.silu()?))),
    ];
    for (name, input, op) in composed {
        let grad = |dev: &Device, dt: DType| -> Result<Tensor> {
            let v = Var::from_tensor(&input.to_dtype(dt)?.to_device(dev)?)?;
            let y = op(v.as_tensor(), dev, dt)?.to_dtype(DType::F32)?;
            let weight = values(y.dims(), 9)?.to_device(dev)?;
            let store = (y * weight)?.sum_all()?.backward()?;
            store
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| Error::Model(format!("selftest: no gradient through {name}")))
        };
        let want = grad(&Device::Cpu, DType::F32)?;
        let got = grad(device, dtype)?;
        checks.push(Check::compare(
            format!("{name} backward {d}"),
            &got,
            &want,
            tol,
        )?);
    }
    // A projection's bias over 8,192 rows (Qwen2's q, k and v): its gradient, summed over the
    // rows in f32 (a sum in bf16 stalls far from the total)
    let rows = (values(&[8192, 24], 36)? * 1e-3)?;
    let bias_grad = |dev: &Device, dt: DType| -> Result<Tensor> {
        let y = Var::from_tensor(&rows.to_dtype(dt)?.to_device(dev)?)?;
        let b = Var::from_tensor(&values(&[24], 37)?.to_dtype(dt)?.to_device(dev)?)?;
        let out = crate::model::row_ops::bias_add(y.as_tensor(), b.as_tensor())?;
        let weight = (values(&[8192, 24], 38)?.abs()? + 0.5)?.to_device(dev)?;
        let store = (out.to_dtype(DType::F32)? * weight)?
            .sum_all()?
            .backward()?;
        store
            .get(b.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Model("selftest: no gradient through the bias".into()))
    };
    checks.push(Check::compare(
        format!("bias backward, 8192 rows {d}"),
        &bias_grad(device, dtype)?,
        &bias_grad(&Device::Cpu, DType::F32)?,
        tol,
    )?);
    Ok(())
}
