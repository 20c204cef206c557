use super::*;
use crate::model::tables::additive_mask;

/// HF's eager attention in f64, one query at a time.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (nh, kv, t, hd): (usize, usize, usize, usize),
    s: Segment,
    window: usize,
    spec: Spec,
    out: &mut [f64],
) {
    for h in 0..nh {
        let kh = h / (nh / kv);
        for i in 0..s.len {
            let qi = &q[((s.row * nh + h) * t + s.start + i) * hd..][..hd];
            let lo = (i + 1).saturating_sub(window);
            let scores: Vec<f64> = (lo..=i)
                .map(|j| {
                    let kj = &k[((s.row * kv + kh) * t + s.start + j) * hd..][..hd];
                    let mut x = qi
                        .iter()
                        .zip(kj)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * spec.scale as f64;
                    if let Some(cap) = spec.softcap {
                        x = (x / cap as f64).tanh() * cap as f64;
                    }
                    x
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
            for d in 0..hd {
                out[((s.row * t + s.start + i) * nh + h) * hd + d] = (lo..=i)
                    .map(|j| {
                        (scores[j - lo] - max).exp() / sum
                            * v[((s.row * kv + kh) * t + s.start + j) * hd + d] as f64
                    })
                    .sum();
            }
        }
    }
}

#[test]
fn packed_windowed_capped_grouped_attention_equals_the_formula() {
    let (nh, kv, hd) = (6, 2, 16);
    let rnd = |n: usize, seed: u64| -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    };
    // one packed row of ragged sequences (a block boundary inside and at its edges), and a
    // padded batch of two rows
    for (b, t, segs) in [
        (
            1,
            64 + 150 + 1 + 64,
            vec![(0, 0, 64), (0, 64, 150), (0, 214, 1), (0, 215, 64)],
        ),
        (2, 131, vec![(0, 0, 131), (1, 0, 131)]),
    ] {
        let segs: Vec<Segment> = segs
            .into_iter()
            .map(|(row, start, len)| Segment::whole(row, start, len))
            .collect();
        for (window, softcap) in [(usize::MAX, None), (37, None), (37, Some(3.0f32))] {
            let spec = Spec {
                scale: 0.3,
                softcap,
            };
            let (qv, kv_, vv) = (
                rnd(b * nh * t * hd, 1),
                rnd(b * kv * t * hd, 2),
                rnd(b * kv * t * hd, 3),
            );
            let q = Tensor::from_vec(qv.clone(), (b, nh, t, hd), &Device::Cpu).unwrap();
            let k = Tensor::from_vec(kv_.clone(), (b, kv, t, hd), &Device::Cpu).unwrap();
            let v = Tensor::from_vec(vv.clone(), (b, kv, t, hd), &Device::Cpu).unwrap();
            // a prefix of a larger mask, as contexts narrow it: read through its stride
            let mask = additive_mask(t + 5, window, &Device::Cpu)
                .unwrap()
                .narrow(0, 0, t)
                .unwrap()
                .narrow(1, 0, t)
                .unwrap();
            assert!(!mask.is_contiguous());
            let got = attend(&q, &k, &v, &mask, &segs, spec).unwrap();
            assert_eq!(got.dims(), &[b, t, nh * hd]);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let mut want = vec![0f64; got.len()];
            for &s in &segs {
                reference(&qv, &kv_, &vv, (nh, kv, t, hd), s, window, spec, &mut want);
            }
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0f64, f64::max);
            assert!(
                worst < 2e-5,
                "b {b}, window {window}, cap {softcap:?}: {worst}"
            );
        }
    }
}

#[test]
fn queries_after_a_shared_prefix_equal_their_whole_sequence() {
    // two sequences that begin with the same 70 positions (a prompt): [S, C] and [S, R] laid
    // out whole for the keys, while the queries are S, C and R once each
    let (nh, kv, hd, s_len, c_len, r_len) = (4, 2, 16, 70, 30, 81);
    let rnd = |n: usize, seed: u64| -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
            .collect()
    };
    let whole = s_len + c_len + s_len + r_len;
    let packed = s_len + c_len + r_len;
    // the whole layout's rows: S, C, then S again, then R
    let rows: Vec<usize> = (0..s_len + c_len)
        .chain(0..s_len)
        .chain(s_len + c_len..packed)
        .collect();
    let spread = |x: &[f32], heads: usize| -> Vec<f32> {
        (0..heads)
            .flat_map(|h| {
                rows.iter()
                    .flat_map(move |&r| x[(h * packed + r) * hd..][..hd].to_vec())
            })
            .collect()
    };
    let (qv, kv_, vv) = (
        rnd(nh * packed * hd, 1),
        rnd(kv * packed * hd, 2),
        rnd(kv * packed * hd, 3),
    );
    let t = |v: Vec<f32>, heads: usize, n: usize| {
        Tensor::from_vec(v, (1, heads, n, hd), &Device::Cpu).unwrap()
    };
    let (k, v) = (
        t(spread(&kv_, kv), kv, whole),
        t(spread(&vv, kv), kv, whole),
    );
    for (window, softcap) in [(usize::MAX, None), (37, Some(3.0f32))] {
        let spec = Spec {
            scale: 0.3,
            softcap,
        };
        let mask = additive_mask(s_len + r_len, window, &Device::Cpu).unwrap();
        let want: Vec<f32> = attend(
            &t(spread(&qv, nh), nh, whole),
            &k,
            &v,
            &mask,
            &[
                Segment::whole(0, 0, s_len + c_len),
                Segment::whole(0, s_len + c_len, s_len + r_len),
            ],
            spec,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        let shared = [
            Segment::whole(0, 0, s_len + c_len),
            Segment {
                row: 0,
                start: s_len + c_len,
                keys: s_len + c_len,
                len: s_len + r_len,
                offset: s_len,
            },
        ];
        let got: Vec<f32> = attend(&t(qv.clone(), nh, packed), &k, &v, &mask, &shared, spec)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let width = nh * hd;
        assert_eq!(got.len(), packed * width);
        // packed row r is the whole layout's row: itself before R, past the repeated S after
        let worst = (0..packed)
            .flat_map(|r| {
                let w = if r < s_len + c_len { r } else { r + s_len };
                (0..width).map(move |d| (r * width + d, w * width + d))
            })
            .map(|(g, w)| (got[g] - want[w]).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "window {window}: {worst}");
    }
}

#[test]
fn cached_queries_under_a_per_row_mask_equal_the_formula() {
    // a decoding step's last tq queries of tk keys, rows left-padded by 0, 3 and 70 keys
    let (b, nh, kv, hd, tk) = (3, 4, 2, 8, 90);
    let rnd = |n: usize, seed: u64| -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
            .collect()
    };
    let pads = [0usize, 3, 70];
    for tq in [1, 5, 90] {
        let q_offset = tk - tq;
        let (qv, kv_, vv) = (
            rnd(b * nh * tq * hd, 1),
            rnd(b * kv * tk * hd, 2),
            rnd(b * kv * tk * hd, 3),
        );
        let mask: Vec<f32> = (0..b)
            .flat_map(|r| {
                (0..tq).flat_map(move |i| {
                    (0..tk).map(move |j| {
                        if j >= pads[r] && j <= q_offset + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
            })
            .collect();
        let t = |v: Vec<f32>, s: (usize, usize, usize, usize)| {
            Tensor::from_vec(v, s, &Device::Cpu).unwrap()
        };
        let q = t(qv.clone(), (b, nh, tq, hd));
        let k = t(kv_.clone(), (b, kv, tk, hd));
        let v = t(vv.clone(), (b, kv, tk, hd));
        let mask = t(mask, (b, 1, tq, tk));
        let rows: Vec<Segment> = (0..b)
            .map(|row| Segment {
                offset: q_offset,
                ..Segment::whole(row, 0, tk)
            })
            .collect();
        let spec = Spec {
            scale: 0.4,
            softcap: None,
        };
        let got: Vec<f32> = attend(&q, &k, &v, &mask, &rows, spec)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // k and v as a decoding cache holds them: views of larger buffers, read in place
        let view = |x: &Tensor| {
            let buf = Tensor::zeros((b, kv, tk + 7, hd), DType::F32, &Device::Cpu).unwrap();
            buf.slice_set(x, 2, 0).unwrap();
            buf.narrow(2, 0, tk).unwrap()
        };
        let (kw, vw) = (view(&k), view(&v));
        assert!(!kw.is_contiguous());
        let in_place: Vec<f32> = attend(&q, &kw, &vw, &mask, &rows, spec)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            in_place.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let mut worst = 0f64;
        for r in 0..b {
            for h in 0..nh {
                let kh = h / (nh / kv);
                for i in 0..tq {
                    if pads[r] > q_offset + i {
                        continue; // a padded query sees nothing (NaN, as the composed ops)
                    }
                    let qi = &qv[((r * nh + h) * tq + i) * hd..][..hd];
                    let keys = pads[r]..=q_offset + i;
                    let sc: Vec<f64> = keys
                        .clone()
                        .map(|j| {
                            let kj = &kv_[((r * kv + kh) * tk + j) * hd..][..hd];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * 0.4
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = keys
                            .clone()
                            .zip(&sc)
                            .map(|(j, x)| {
                                (x - m).exp() / z * vv[((r * kv + kh) * tk + j) * hd + d] as f64
                            })
                            .sum();
                        let g = got[((r * tq + i) * nh + h) * hd + d] as f64;
                        worst = worst.max((g - want).abs());
                    }
                }
            }
        }
        assert!(worst < 2e-5, "tq {tq}: {worst}");
    }
}

#[test]
fn segments_outside_the_batch_or_mask_are_errors() {
    let x = Tensor::zeros((1, 2, 8, 4), DType::F32, &Device::Cpu).unwrap();
    let mask = additive_mask(8, usize::MAX, &Device::Cpu).unwrap();
    let spec = Spec {
        scale: 1.0,
        softcap: None,
    };
    for s in [
        Segment::whole(1, 0, 8),
        Segment::whole(0, 4, 5),
        Segment {
            keys: 4,
            ..Segment::whole(0, 0, 5)
        },
        Segment {
            offset: 6,
            ..Segment::whole(0, 0, 5)
        },
    ] {
        let err = attend(&x, &x, &x, &mask, &[s], spec)
            .unwrap_err()
            .to_string();
        assert!(err.contains("segment"), "{err}");
    }
    let small = additive_mask(4, usize::MAX, &Device::Cpu).unwrap();
    let s = Segment::whole(0, 0, 8);
    assert!(attend(&x, &x, &x, &small, &[s], spec).is_err());
}
