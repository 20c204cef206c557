//! The optimizer's tests: torch's AdamW and clipping, bf16 state and masters, the fused loops
//! against the composed ops, and 8-bit moments against bitsandbytes.

use super::*;
use crate::train::adamw8;

/// An optimizer over tensors of `shapes` with zero dense moments in `dtype`.
fn dense(params: AdamWParams, dtype: DType, shapes: &[candle_core::Shape]) -> AdamW {
    let dev = candle_core::Device::Cpu;
    AdamW {
        params,
        dtype,
        moments: shapes
            .iter()
            .map(|s| Moments::zeros(s, false, dtype, &dev).unwrap())
            .collect(),
        maps: Maps::new(&dev).unwrap(),
        step: 0,
    }
}

/// torch's AdamW defaults with `weight_decay`.
fn params(weight_decay: f64) -> AdamWParams {
    AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    }
}

#[test]
fn stochastic_bf16_rounding_is_unbiased() {
    let dev = candle_core::Device::Cpu;
    // 1 + 2^-9 lies a quarter of the way from 1 to the next bf16, 1 + 2^-7: nearest rounding
    // always gives 1; stochastic rounding averages to the value (σ of the mean 3.4e-6).
    let x = 1.0f32 + 2f32.powi(-9);
    let t = Tensor::full(x, 1_000_000, &dev).unwrap();
    let r = round_bf16_stochastic(&t).unwrap();
    let vals = r.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        vals.iter().all(|&v| v == 1.0 || v == 1.0 + 2f32.powi(-7)),
        "{:?}",
        &vals[..4]
    );
    let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / vals.len() as f64;
    assert!((mean - f64::from(x)).abs() < 2e-5, "mean {mean} vs {x}");
    let nearest = t
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(nearest.to_vec1::<f32>().unwrap()[0], 1.0);
    // zeros, negatives and exact bf16 values are kept
    let exact = Tensor::new(&[0f32, -2.5, 3.0, -0.0078125], &dev).unwrap();
    let r = round_bf16_stochastic(&exact)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        r.to_vec1::<f32>().unwrap(),
        vec![0.0, -2.5, 3.0, -0.0078125]
    );
}

/// The second moment's EMA under a constant g² = 1 (exact value 1 − 0.999^t): stored in
/// bf16 with round-to-nearest it stalls near 0.25; rounded stochastically it tracks f32.
#[test]
fn bf16_second_moment_tracks_f32_only_with_stochastic_rounding() {
    let dev = candle_core::Device::Cpu;
    let beta2 = 0.999f64;
    let steps = 2000;
    let mut nearest = Tensor::zeros(4096, DType::BF16, &dev).unwrap();
    let mut stochastic = nearest.clone();
    let ema = |v: &Tensor| -> Tensor {
        ((v.to_dtype(DType::F32).unwrap() * beta2).unwrap() + (1.0 - beta2)).unwrap()
    };
    for _ in 0..steps {
        nearest = ema(&nearest).to_dtype(DType::BF16).unwrap();
        stochastic = round_bf16_stochastic(&ema(&stochastic)).unwrap();
    }
    let exact = 1.0 - beta2.powi(steps);
    let mean = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let (n, s) = (mean(&nearest), mean(&stochastic));
    assert!(
        (s - exact).abs() < 0.01 * exact,
        "stochastic {s} vs exact {exact}"
    );
    assert!(
        n < 0.5 * exact,
        "nearest rounding was expected to stall: {n} vs {exact}"
    );
}

/// bf16 master weights in [1.25, 2) (spacing 2^-7) under three steps of lr 1e-3, each far below
/// half a spacing: with the composed and the fused step alike, every weight stays within a
/// spacing per step of the f32 masters' trajectory (each step rounds afresh) and the mean
/// change equals theirs (round-to-nearest would not move one weight).
#[test]
fn bf16_master_weights_move_by_the_update_on_average() {
    let dev = candle_core::Device::Cpu;
    let params = params(0.0);
    let (n, lr) = (1 << 16, 1e-3);
    let w0 = (Tensor::rand(1.25f32, 2f32, n, &dev).unwrap())
        .to_dtype(DType::BF16)
        .unwrap();
    let run = |weights: DType, fused: bool| -> Tensor {
        // a copy: to_dtype into the same dtype shares w0's storage
        let w = w0.to_dtype(weights).unwrap().copy().unwrap();
        let mut opt = dense(params, DType::F32, &[n.into()]);
        for step in 1..=3u32 {
            let g = Tensor::full(0.5f32 + step as f32, n, &dev).unwrap();
            opt.step += 1;
            let t = opt.step as i32;
            if fused {
                let slot = adamw_step::Slot {
                    w: &w,
                    m: opt.moments[0].dense().unwrap().0,
                    v: opt.moments[0].dense().unwrap().1,
                    g: &g,
                    decays: false,
                    seeds: [1, 2, step],
                };
                adamw_step::step(&[slot], hyper(params, lr, t), 0.0).unwrap();
            } else {
                let up = Update {
                    lr,
                    decay: 1.0,
                    grad_scale: 1.0,
                };
                opt.update_composed(0, &w, &g, up).unwrap();
            }
        }
        (w.to_dtype(DType::F32).unwrap() - w0.to_dtype(DType::F32).unwrap()).unwrap()
    };
    let exact = run(DType::F32, true);
    let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let want = mean(&exact);
    assert!(
        (want + 3e-3).abs() < 1e-4,
        "about three steps of -lr: {want}"
    );
    for fused in [true, false] {
        let got = run(DType::BF16, fused);
        let worst = crate::test_util::max_abs_diff(&got, &exact);
        // a step's rounding moves a weight by at most one spacing; the composed rounding
        // takes the next binade's (twice the) spacing within 0.07% below a power of two
        let spacings = if fused { 3.0 } else { 6.0 };
        assert!(
            worst <= spacings * 2f32.powi(-7),
            "fused {fused}: {worst} from f32's"
        );
        let m = mean(&got);
        // σ of the mean: about a third of a spacing over √65,536 elements, 1.2e-5
        assert!((m - want).abs() < 6e-5, "fused {fused}: mean {m} vs {want}");
    }
    let w0 = w0.to_dtype(DType::F32).unwrap();
    let nearest = (&w0 - 3e-3)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(crate::test_util::max_abs_diff(&nearest, &w0), 0.0);
}

/// The fused step (on the CPU the kernels' loops) against the composed one: equal with f32
/// moments, step after step, with weight decay on one tensor and not the other, a clipped
/// step and bf16-rounded gradients; close with bf16 moments (each rounds its own random
/// bits).
#[test]
fn fused_step_equals_the_composed_one() {
    let dev = candle_core::Device::Cpu;
    let params = params(0.01);
    let lr = 1e-3;
    let shapes = [(37, 29), (1, 5)];
    for dtype in [DType::F32, DType::BF16] {
        let shapes_: Vec<candle_core::Shape> = shapes.iter().map(|&s| s.into()).collect();
        let fresh = || dense(params, dtype, &shapes_);
        let (mut fused, mut composed) = (fresh(), fresh());
        let w0: Vec<Tensor> = shapes
            .iter()
            .map(|&s| Tensor::randn(0f32, 1.0, s, &dev).unwrap())
            .collect();
        let wf: Vec<Tensor> = w0.iter().map(|w| w.copy().unwrap()).collect();
        let wc: Vec<Tensor> = w0.iter().map(|w| w.copy().unwrap()).collect();
        for step in 1..=6 {
            let g: Vec<Tensor> = shapes
                .iter()
                .map(|&s| {
                    let g = Tensor::randn(0f32, 1.0, s, &dev).unwrap();
                    g.to_dtype(DType::BF16).unwrap().to_dtype(dtype).unwrap()
                })
                .collect();
            let max_norm = if step == 3 { 1.0 } else { 1e3 };
            fused.step += 1;
            composed.step += 1;
            let hyper = hyper(params, lr, fused.step as i32);
            let slots: Vec<_> = (0..2)
                .map(|i| adamw_step::Slot {
                    w: &wf[i],
                    m: fused.moments[i].dense().unwrap().0,
                    v: fused.moments[i].dense().unwrap().1,
                    g: &g[i],
                    decays: i == 0,
                    seeds: [step, step + 7, step + 9],
                })
                .collect();
            let norm = adamw_step::step(&slots, hyper, max_norm).unwrap();
            let scale = adamw_step::clip_coefficient(norm, max_norm);
            assert_eq!(scale < 1.0, step == 3, "step {step}: norm {norm}");
            for i in 0..2 {
                let decay = if i == 0 { hyper.decay } else { 1.0 };
                composed
                    .update_composed(
                        i,
                        &wc[i],
                        &g[i],
                        Update {
                            lr,
                            decay,
                            grad_scale: scale,
                        },
                    )
                    .unwrap();
            }
            let vals = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            for i in 0..2 {
                if dtype == DType::F32 {
                    assert_eq!(vals(&wf[i]), vals(&wc[i]), "weights {i}, step {step}");
                    let (fm, fv) = fused.moments[i].dense().unwrap();
                    let (cm, cv) = composed.moments[i].dense().unwrap();
                    assert_eq!(vals(fm), vals(cm), "m, step {step}");
                    assert_eq!(vals(fv), vals(cv), "v, step {step}");
                } else {
                    // Each step's update differs by at most lr times the moments' relative
                    // rounding (one bf16 spacing, 2^-7, stochastically, in m and half in √v).
                    let d = crate::test_util::max_abs_diff(&wf[i], &wc[i]);
                    let bound = step as f32 * lr as f32 * 2f32.powi(-6);
                    assert!(d < bound, "step {step}: {d} (bound {bound})");
                    assert!(i == 1 || d > 0.0, "bf16 moments draw their own bits");
                }
            }
        }
    }
}

/// `train.optim = "adamw_8bit"` against bitsandbytes' `AdamW8bit` on the CPU (the
/// fixture's 4 steps of one [32, 160] tensor with weight decay): the weights after step 1
/// (the update reads the moments before they are stored) and after step 4 (each step reads
/// the 8-bit moments of the one before), and the 8-bit state.
#[test]
fn eight_bit_adamw_follows_bitsandbytes() {
    use crate::train::quant8::tests::{f32s, fixture, fixture_grad, ramp};
    let fx = &fixture()["adamw"];
    let dev = candle_core::Device::Cpu;
    let shape: Vec<usize> = fx["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let n = shape[0] * shape[1];
    let scales = f32s(&fx["scales"]);
    let lr = fx["lr"].as_f64().unwrap();
    let params = AdamWParams {
        beta1: fx["betas"][0].as_f64().unwrap(),
        beta2: fx["betas"][1].as_f64().unwrap(),
        eps: fx["eps"].as_f64().unwrap(),
        weight_decay: fx["weight_decay"].as_f64().unwrap(),
    };
    let w0: Vec<f32> = (0..n).map(|i| ramp(i, 389, 17) / 1000.0).collect();
    let w = Tensor::new(w0.as_slice(), &dev)
        .unwrap()
        .reshape((shape[0], shape[1]))
        .unwrap();
    let mut opt = AdamW {
        params,
        dtype: DType::F32,
        moments: vec![Moments::zeros(w.shape(), true, DType::F32, &dev).unwrap()],
        maps: Maps::new(&dev).unwrap(),
        step: 0,
    };
    let after = fx["weights_after"].as_array().unwrap();
    let reference = &fixture()["reference"];
    let worst = |got: &Tensor, want: &[f32]| -> (f32, usize) {
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d: Vec<f32> = got.iter().zip(want).map(|(a, b)| (a - b).abs()).collect();
        let far = d.iter().filter(|&&x| x > 1e-6).count();
        (d.into_iter().fold(0f32, f32::max), far)
    };
    for t in 1..=4usize {
        let g = Tensor::new(fixture_grad(t, n, &scales).as_slice(), &dev)
            .unwrap()
            .reshape((shape[0], shape[1]))
            .unwrap();
        opt.step += 1;
        let Moments::Blockwise { m, v } = &opt.moments[0] else {
            panic!("8-bit moments expected")
        };
        let decay = 1.0 - lr * params.weight_decay;
        let up = Update {
            lr,
            decay,
            grad_scale: 1.0,
        };
        opt.update_8bit(m, v, &w, &g, up).unwrap();
        if t == 1 {
            // zero moments in, the update from the f32 moments: torch's AdamW to an ulp
            let (d, _) = worst(&w, &f32s(&after[0]));
            assert!(d <= 1.2e-7, "step 1: {d:e} from bitsandbytes");
        }
    }
    // bitsandbytes' update with its reference quantizer: the same codes, the same weights
    let (d, _) = worst(&w, &f32s(&reference["weights_after"]));
    assert!(d <= 1.2e-7, "step 4: {d:e} from bitsandbytes' reference");
    // its compiled quantizer: a few codes on a midpoint go the other way, and each moves
    // its weight's later updates by a fraction of a step (lr = 1e-2)
    let (d, far) = worst(&w, &f32s(&after[1]));
    assert!(
        d < 0.05 * lr as f32 && far < n / 50,
        "step 4: {d:e}, {far} weights off"
    );
    let Moments::Blockwise { m, v } = &opt.moments[0] else {
        unreachable!()
    };
    let codes = |v: &serde_json::Value| -> Vec<u8> { f32s(v).iter().map(|&c| c as u8).collect() };
    for (q, key) in [(m, "m"), (v, "v")] {
        let got = q.codes.to_vec1::<u8>().unwrap();
        assert_eq!(got, codes(&reference[format!("{key}_codes")]), "{key}");
        let compiled = codes(&fx[format!("{key}_codes")]);
        let flips: Vec<i32> = got
            .iter()
            .zip(&compiled)
            .map(|(&a, &b)| a as i32 - b as i32)
            .filter(|&d| d != 0)
            .collect();
        assert!(
            flips.len() < 32 && flips.iter().all(|d| d.abs() == 1),
            "{key}: {flips:?}"
        );
        let (d, _) = worst(&q.absmax, &f32s(&reference[format!("{key}_absmax")]));
        let top = q.absmax.max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= top * 2e-7, "{key} absmax: {d:e}");
    }
}

/// The CPU's 8-bit loops (adamw8) against the composed ops: the same bits with f32 weights,
/// step after step, with weight decay, a clipping coefficient and a short last block.
#[test]
fn eight_bit_loops_equal_the_composed_ops() {
    let dev = candle_core::Device::Cpu;
    let params = params(0.01);
    let (lr, grad_scale) = (1e-3, 0.7);
    let shape = (37, 300); // 11,100 values: 43 blocks and a short one
    let fresh = || AdamW {
        params,
        dtype: DType::F32,
        moments: vec![Moments::zeros(&shape.into(), true, DType::F32, &dev).unwrap()],
        maps: Maps::new(&dev).unwrap(),
        step: 0,
    };
    let (mut loops, mut composed) = (fresh(), fresh());
    let w0 = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
    let (wl, wc) = (w0.copy().unwrap(), w0.copy().unwrap());
    for t in 1..=5 {
        let g = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * 10f64.powi(-t)).unwrap();
        loops.step += 1;
        composed.step += 1;
        let (Moments::Blockwise { m, v }, Moments::Blockwise { m: mc, v: vc }) =
            (&loops.moments[0], &composed.moments[0])
        else {
            panic!("8-bit moments expected")
        };
        let h = hyper(params, lr, t);
        let one = adamw8::Step {
            w: &wl,
            g: &g,
            m,
            v,
            decays: true,
            seed: 1,
        };
        adamw8::step(&one, (&loops.maps.m, &loops.maps.v), h, grad_scale).unwrap();
        composed
            .update_8bit(
                mc,
                vc,
                &wc,
                &g,
                Update {
                    lr,
                    decay: h.decay,
                    grad_scale,
                },
            )
            .unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&wl), bits(&wc), "weights, step {t}");
        for (a, b, which) in [(m, mc, "m"), (v, vc, "v")] {
            let codes = |q: &Blockwise| q.codes.to_vec1::<u8>().unwrap();
            assert_eq!(codes(a), codes(b), "{which} codes, step {t}");
            assert_eq!(bits(&a.absmax), bits(&b.absmax), "{which} absmax, step {t}");
        }
    }
    assert!(crate::test_util::max_abs_diff(&wl, &w0) > 0.0);
}

/// transformers 5.24's `get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=10)`,
/// its learning rate at each step from base 1 (printed by `get_last_lr()` before each step):
/// `constant` never reads the warmup, the others ramp over it.
#[test]
fn schedules_are_transformers_own() {
    use crate::config::LrSchedule;
    let want: [(LrSchedule, [f64; 10]); 4] = [
        (LrSchedule::Constant, [1.0; 10]),
        (
            LrSchedule::ConstantWithWarmup,
            [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ),
        (
            LrSchedule::Linear,
            [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
        ),
        (
            LrSchedule::Cosine,
            [
                0.0,
                0.5,
                1.0,
                0.961939766256,
                0.853553390593,
                0.691341716183,
                0.5,
                0.308658283817,
                0.146446609407,
                0.038060233744,
            ],
        ),
    ];
    for (schedule, lrs) in want {
        for (step, lr) in lrs.iter().enumerate() {
            let got = learning_rate(schedule, 1.0, step, 10, 0.2);
            assert!(
                (got - lr).abs() < 1e-11,
                "{schedule:?} step {step}: {got} vs {lr}"
            );
        }
    }
}
