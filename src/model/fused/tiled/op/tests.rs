use super::*;
use crate::test_util::max_abs_diff;
use candle_core::{DType, Var};

fn composed(q: &Tensor, k: &Tensor, v: &Tensor, p: Params) -> Tensor {
    composed_attention(q, k, v, p).unwrap()
}

#[test]
fn forward_and_every_gradient_equal_the_composed_ops() {
    let dev = Device::Cpu;
    let cases = [
        (2, 4, 2, 9, 8, 0, None),
        (1, 4, 1, 13, 16, 5, None),
        (2, 2, 2, 11, 8, 0, Some(3.0)),
        (1, 6, 3, 10, 4, 4, Some(2.0)),
    ];
    for (b, hq, hkv, t, d, window, softcap) in cases {
        let p = Params {
            scale: (d as f32).powf(-0.5),
            window,
            softcap,
        };
        let var =
            |h| Var::from_tensor(&Tensor::randn(0f32, 1.5, (b, h, t, d), &dev).unwrap()).unwrap();
        let (q, k, v) = (var(hq), var(hkv), var(hkv));
        let up = Tensor::randn(0f32, 1.0, (b, hq, t, d), &dev).unwrap();
        let want = composed(&q, &k, &v, p);
        let got = tiled_attention(&q, &k, &v, p).unwrap();
        let what = format!("{b}x{hq}/{hkv}x{t}x{d} window {window} cap {softcap:?}");
        assert!(max_abs_diff(&want, &got) < 1e-5, "{what}");
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_abs_diff(gw.get(x).unwrap(), gg.get(x).unwrap());
            assert!(diff < 1e-5, "d{name} {what}: {diff}");
        }
    }
}

#[test]
fn packed_sequences_equal_each_sequence_alone_forward_and_gradients() {
    let dev = Device::Cpu;
    let lens = [5usize, 1, 12, 7];
    let t: usize = lens.iter().sum();
    for (hq, hkv, window, softcap) in [(4, 2, 0, None), (6, 3, 4, Some(2.0)), (2, 1, 3, None)] {
        let p = Params {
            scale: 0.35,
            window,
            softcap,
        };
        let var =
            |h| Var::from_tensor(&Tensor::randn(0f32, 1.5, (1, h, t, 8), &dev).unwrap()).unwrap();
        let (q, k, v) = (var(hq), var(hkv), var(hkv));
        let up = Tensor::randn(0f32, 1.0, (1, hq, t, 8), &dev).unwrap();
        let packed = tiled_attention_packed(&q, &k, &v, p, Some(lens.into()), Order::Bhtd).unwrap();
        // each sequence alone through the composed ops, stitched back together
        let mut at = 0;
        let mut alone = Vec::new();
        for len in lens {
            let part = |x: &Tensor| x.narrow(2, at, len).unwrap();
            alone.push(composed(&part(&q), &part(&k), &part(&v), p));
            at += len;
        }
        let alone = Tensor::cat(&alone, 2).unwrap();
        let what = format!("{hq}/{hkv} window {window} cap {softcap:?}");
        assert!(max_abs_diff(&alone, &packed) < 1e-5, "{what}");
        let gw = (alone * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gg = (packed * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_abs_diff(gw.get(x).unwrap(), gg.get(x).unwrap());
            assert!(diff < 1e-5, "d{name} {what}: {diff}");
        }
    }
    // lengths that are not the row are refused
    let x = Tensor::zeros((1, 2, 6, 8), DType::F32, &dev).unwrap();
    let p = Params {
        scale: 1.0,
        window: 0,
        softcap: None,
    };
    let e = tiled_attention_packed(&x, &x, &x, p, Some([2usize, 3].into()), Order::Bhtd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("summing to 5"), "{e}");
}

#[test]
fn positions_before_heads_equal_heads_before_positions_forward_and_gradients() {
    // [B, T, H, D] in and out is [B, H, T, D] transposed: f32 (the gemm blocks) and bf16
    // (the loops), padded rows and packed sequences, GQA with a window and a cap
    let dev = Device::Cpu;
    let swap = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    // (batch, positions, packed lengths, window, cap)
    type Case = (usize, usize, Option<Vec<usize>>, usize, Option<f32>);
    let cases: [Case; 3] = [
        (2, 70, None, 0, None),
        (1, 83, Some(vec![5, 66, 12]), 7, None),
        (2, 40, None, 0, Some(2.0)),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (b, t, lens, window, softcap) in &cases {
            let p = Params {
                scale: 0.3,
                window: *window,
                softcap: *softcap,
            };
            let lens: Option<Arc<[usize]>> = lens.as_ref().map(|l| l.as_slice().into());
            let var = |h| {
                let x = Tensor::randn(0f32, 1.0, (*b, h, *t, 16), &dev).unwrap();
                Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
            };
            let (q, k, v) = (var(6), var(2), var(2));
            let up = Tensor::randn(0f32, 1.0, (*b, 6, *t, 16), &dev).unwrap();
            let up = up.to_dtype(dtype).unwrap();
            let heads = tiled_attention_packed(&q, &k, &v, p, lens.clone(), Order::Bhtd);
            let heads = heads.unwrap();
            let (qt, kt, vt) = (
                Var::from_tensor(&swap(&q)).unwrap(),
                Var::from_tensor(&swap(&k)).unwrap(),
                Var::from_tensor(&swap(&v)).unwrap(),
            );
            let tokens = tiled_attention_packed(&qt, &kt, &vt, p, lens, Order::Bthd).unwrap();
            let what = format!("{dtype:?} {b}x{t} window {window} cap {softcap:?}");
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            assert_eq!(
                max_abs_diff(&f32(&heads), &f32(&swap(&tokens))),
                0.0,
                "{what}"
            );
            let gh = (heads * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gt = (tokens * swap(&up)).unwrap().sum_all().unwrap();
            let gt = gt.backward().unwrap();
            for (name, a, b) in [("q", &q, &qt), ("k", &k, &kt), ("v", &v, &vt)] {
                let (a, b) = (gh.get(a).unwrap(), gt.get(b).unwrap());
                let diff = max_abs_diff(&f32(a), &f32(&swap(b)));
                assert!(diff < 1e-5, "d{name} {what}: {diff}");
            }
        }
    }
    // a tensor that is not 4-D is named with the order it was not in
    let x = Tensor::zeros((2, 6, 8), DType::F32, &dev).unwrap();
    let p = Params {
        scale: 1.0,
        window: 0,
        softcap: None,
    };
    let e = tiled_attention_packed(&x, &x, &x, p, None, Order::Bthd);
    let e = e.unwrap_err().to_string();
    assert!(e.contains("not Bthd"), "{e}");
}

#[test]
fn fewer_queries_equal_the_whole_sequences_rows_forward_and_gradients() {
    // a shared prompt: sequences of 9, 14 and 6 keys whose last 9, 5 and 1 positions are
    // queries; against every position a query and only those rows' outputs taken
    let dev = Device::Cpu;
    let (lens, queries) = ([9usize, 14, 6], [9usize, 5, 1]);
    let t: usize = lens.iter().sum();
    let at = query_positions(Some(&lens), Some(&queries)).unwrap();
    let rows = Tensor::from_vec(at.iter().map(|&p| p as u32).collect(), at.len(), &dev);
    let rows = rows.unwrap();
    for (dtype, window, softcap) in [
        (DType::F32, 0, None),
        (DType::F32, 4, Some(2.0)),
        (DType::BF16, 0, None),
    ] {
        let p = Params {
            scale: 0.3,
            window,
            softcap,
        };
        let var = |h, t| {
            let x = Tensor::randn(0f32, 1.0, (1, t, h, 16), &dev).unwrap();
            Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
        };
        let (q, k, v) = (var(4, t), var(2, t), var(2, t));
        let own = |x: &Tensor| x.index_select(&rows, 1).unwrap();
        let qo = Var::from_tensor(&own(&q)).unwrap();
        let up = Tensor::randn(0f32, 1.0, (1, at.len(), 4, 16), &dev).unwrap();
        let up = up.to_dtype(dtype).unwrap();
        let whole = Some(Arc::from(lens.as_slice()));
        let want = tiled_attention_packed(&q, &k, &v, p, whole, Order::Bthd).unwrap();
        let want = own(&want);
        let packing = (Arc::from(lens.as_slice()), Arc::from(queries.as_slice()));
        let got = tiled_attention_shared(&qo, &k, &v, p, packing, Order::Bthd).unwrap();
        let what = format!("{dtype:?} window {window} cap {softcap:?}");
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&f32(&want), &f32(&got)) < 1e-6, "{what}");
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let dq = max_abs_diff(&f32(&own(gw.get(&q).unwrap())), &f32(gg.get(&qo).unwrap()));
        assert!(dq < 1e-6, "dq {what}: {dq}");
        for (name, x) in [("k", &k), ("v", &v)] {
            let d = max_abs_diff(&f32(gw.get(x).unwrap()), &f32(gg.get(x).unwrap()));
            assert!(d < 1e-5, "d{name} {what}: {d}");
        }
    }
    // more queries than keys, or lengths that are not the rows, are named
    let x = Tensor::zeros((1, 6, 2, 16), DType::F32, &dev).unwrap();
    let p = Params {
        scale: 1.0,
        window: 0,
        softcap: None,
    };
    let bad = (Arc::from(&[2usize, 4][..]), Arc::from(&[3usize, 3][..]));
    let e = tiled_attention_shared(&x, &x, &x, p, bad, Order::Bthd);
    assert!(e.unwrap_err().to_string().contains("not at most"));
    let bad = (Arc::from(&[2usize, 4][..]), Arc::from(&[2usize, 2][..]));
    let e = tiled_attention_shared(&x, &x, &x, p, bad, Order::Bthd);
    assert!(e.unwrap_err().to_string().contains("q [1, .., 6, ..]"));
}

#[test]
fn bf16_stays_within_bf16_rounding() {
    let dev = Device::Cpu;
    let p = Params {
        scale: 0.25,
        window: 0,
        softcap: None,
    };
    let r = |h| Tensor::randn(0f32, 1.0, (1, h, 12, 16), &dev).unwrap();
    let (q, k, v) = (r(4), r(2), r(2));
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let want = composed(&f32(&bf(&q)), &f32(&bf(&k)), &f32(&bf(&v)), p);
    let got = f32(&tiled_attention(&bf(&q), &bf(&k), &bf(&v), p).unwrap());
    assert!(max_abs_diff(&want, &got) < 1e-2);
}

#[test]
fn mismatched_shapes_are_named() {
    let dev = Device::Cpu;
    let p = Params {
        scale: 1.0,
        window: 0,
        softcap: None,
    };
    let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
    let e = tiled_attention(&q, &k, &k, p).unwrap_err().to_string();
    assert!(
        e.contains("tiled attention") && e.contains("do not fit"),
        "{e}"
    );
}
