use super::*;
use candle_core::Var;

#[test]
fn chunked_backward_matches_autograd() {
    let dev = Device::Cpu;
    let rows = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 5), &dev).unwrap()).unwrap();
    let targets = Tensor::new(&[0u32, 3, 10, 2, 2, 7, 1], &dev).unwrap();
    let g = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0], &dev).unwrap();
    let diff = crate::test_util::max_abs_diff;
    // without and with Gemma 2's final soft cap (small, so it bends the logits)
    for cap in [None, Some(1.5)] {
        let lp = token_logps(rows.as_tensor(), w.as_tensor(), &targets, cap, OpMode::Fast).unwrap();
        let grads = (&lp * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (_, lse) =
            token_logps_lse(rows.as_tensor(), w.as_tensor(), &targets, cap, OpMode::Fast).unwrap();
        // one vocabulary chunk, then chunks of 3 (the last one short: 11 = 3 + 3 + 3 + 2),
        // composed and fused (no fused kernel through the soft cap)
        for (step, fused) in [
            (usize::MAX, false),
            (3, false),
            (usize::MAX, true),
            (3, true),
        ] {
            if fused && cap.is_some() {
                continue;
            }
            if fused {
                let (lp_f, lse_f) = token_logps_lse(
                    rows.as_tensor(),
                    w.as_tensor(),
                    &targets,
                    cap,
                    OpMode::Fused,
                )
                .unwrap();
                assert!(diff(&lp_f, &lp) < 1e-5);
                assert!(diff(&lse_f, &lse) < 1e-5);
            }
            let chunks = VocabChunks { step, fused };
            // the head's gradient as the sink receives it, chunk by chunk
            let gw = Tensor::zeros((11, 5), DType::F32, &dev).unwrap();
            let mut seen = 0;
            let mut sink = |v0: usize, chunk: &Tensor| -> Result<()> {
                assert_eq!(v0, seen, "chunks in order, each once");
                seen += chunk.dim(0)?;
                Ok(gw.slice_set(&chunk.to_dtype(DType::F32)?, 0, v0)?)
            };
            let gr = backward_by_vocab_chunks(
                rows.as_tensor(),
                w.as_tensor(),
                &targets,
                &g,
                &lse,
                cap,
                chunks,
                Some(&mut sink),
            )
            .unwrap();
            assert_eq!(seen, 11);
            assert!(
                diff(grads.get(rows.as_tensor()).unwrap(), &gr) < 1e-5,
                "{cap:?}"
            );
            assert!(
                diff(grads.get(w.as_tensor()).unwrap(), &gw) < 1e-5,
                "{cap:?}"
            );
        }
    }
}

#[test]
fn batch_layout_and_sums() {
    let dev = Device::Cpu;
    let b = SeqBatch::new(&[(&[1, 2], &[3, 4, 5]), (&[6], &[7])], 0, &dev).unwrap();
    assert_eq!(b.seq_len, 5);
    assert_eq!(
        b.input_ids.to_vec2::<u32>().unwrap(),
        vec![vec![1, 2, 3, 4, 5], vec![6, 7, 0, 0, 0]]
    );
    assert_eq!(b.gather_idx.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 5]);
    assert_eq!(b.targets.to_vec1::<u32>().unwrap(), vec![3, 4, 5, 7]);
    let sums = b
        .sequence_sums(&Tensor::new(&[-1f32, -2.0, -3.0, -0.5], &dev).unwrap())
        .unwrap();
    assert_eq!(sums, vec![-6.0, -0.5]);
}

/// Tiny models of every family (sliding windows shorter than the longest sequence, Gemma 2's
/// soft caps, Gemma 3's local RoPE, query/key norms), named.
fn families() -> Vec<(&'static str, Transformer)> {
    [
        ("llama", ""),
        ("qwen2", r#","tie_word_embeddings":true"#),
        ("mistral", r#","sliding_window":6"#),
        ("qwen3", r#","head_dim":8"#),
        ("olmo2", ""),
        ("phi3", r#","sliding_window":6"#),
        (
            "gemma2",
            r#","sliding_window":6,"query_pre_attn_scalar":8,"attn_logit_softcapping":5.0,
            "final_logit_softcapping":3.0,"hidden_activation":"gelu_pytorch_tanh""#,
        ),
        (
            "gemma3_text",
            r#","sliding_window":6,"query_pre_attn_scalar":8,"rope_local_base_freq":1000.0,
            "layer_types":["sliding_attention","full_attention"],
            "hidden_activation":"gelu_pytorch_tanh""#,
        ),
    ]
    .into_iter()
    .map(|(arch, extra)| {
        let cfg = crate::model::TransformerConfig::from_json(&format!(
            r#"{{"model_type":"{arch}","vocab_size":61,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":10000.0{extra}}}"#
        ))
        .unwrap();
        let w = crate::model::init::init_weights(&cfg, 5, 0.2).unwrap();
        (arch, Transformer::new(&cfg, &w).unwrap())
    })
    .collect()
}

fn ids(n: u32, seed: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 7 + seed) % 61).collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{what}: {got:?} vs {want:?}"
        );
    }
}

/// Packed rows score as padded ones, within 1e-6 in f32, in every family and through each
/// op set.
#[test]
fn packed_rows_score_as_padded_ones() {
    let (p1, c1, r1) = (ids(5, 1), ids(9, 2), ids(4, 3));
    let (p2, c2, r2) = (ids(3, 4), ids(2, 5), ids(11, 6));
    let (p3, c3, r3) = (ids(7, 7), ids(1, 8), ids(6, 9));
    let pairs = [
        (&p1[..], &c1[..], &r1[..]),
        (&p2, &c2, &r2),
        (&p3, &c3, &r3),
    ];
    let dev = Device::Cpu;
    for (arch, model) in families() {
        let padded = SeqBatch::pairs(&pairs, 64, Truncation::KeepStart, Some(0), &dev).unwrap();
        let packed = SeqBatch::pairs(&pairs, 64, Truncation::KeepStart, None, &dev).unwrap();
        assert_eq!(
            packed.input_ids.dims(),
            [1, 5 + 9 + 3 + 2 + 7 + 1 + 5 + 4 + 3 + 11 + 7 + 6]
        );
        for mode in [OpMode::Fast, OpMode::Differentiable, OpMode::Fused] {
            let want = score(&model, &padded, mode).unwrap();
            let got = score(&model, &packed, mode).unwrap();
            assert_close(&got, &want, &format!("{arch} {mode:?}"));
        }
    }
}

/// Pairs whose rejected sequence takes its prompt's rows from the chosen one score as padded
/// sequences, within 1e-6 in f32, in every family and through each op set: prompts alike,
/// answers that begin alike, a rejected answer that is a prefix of the chosen one or the
/// same, and prompts that keep_end truncation cut apart (nothing shared).
#[test]
fn shared_prompts_score_as_padded_ones() {
    let (p1, c1, r1) = (ids(5, 1), ids(9, 2), ids(4, 3));
    let (p2, c2) = (ids(3, 4), ids(7, 5));
    let r2: Vec<u32> = c2[..3].iter().copied().chain(ids(8, 6)).collect();
    let (p3, c3) = (ids(7, 7), ids(6, 8));
    let r3 = c3[..2].to_vec();
    let (p4, c4) = (ids(2, 9), ids(3, 10));
    let (p5, c5, r5) = (ids(9, 11), ids(2, 12), ids(12, 13));
    let pairs = [
        (&p1[..], &c1[..], &r1[..]),
        (&p2, &c2, &r2),
        (&p3, &c3, &r3),
        (&p4, &c4, &c4),
        (&p5, &c5, &r5),
    ];
    let dev = Device::Cpu;
    for (trunc, max_length) in [(Truncation::KeepStart, 64), (Truncation::KeepEnd, 14)] {
        let shared = SeqBatch::pairs_shared(&pairs, max_length, trunc, &dev).unwrap();
        let pieces = &shared.shared.as_ref().unwrap().pieces;
        let spared: Vec<usize> = pieces.iter().skip(1).step_by(2).map(|p| p.shared).collect();
        let want_spared = match trunc {
            // each prompt; + 3 answer tokens alike; the rejected sequence (a prefix) but
            // its last position; the same answer but its last position
            Truncation::KeepStart => [5, 3 + 3, 7 + 1, 2 + 3 - 1, 9],
            // as above but pair 5: its rejected sequence keeps the last 2 of its prompt's 9
            // tokens, so it begins unlike its chosen one
            Truncation::KeepEnd => [5, 3 + 3, 7 + 1, 2 + 3 - 1, 0],
        };
        assert_eq!(spared, want_spared, "{trunc:?}");
        for (arch, model) in families() {
            let padded = SeqBatch::pairs(&pairs, max_length, trunc, Some(0), &dev).unwrap();
            for mode in [OpMode::Fast, OpMode::Differentiable, OpMode::Fused] {
                let want = score(&model, &padded, mode).unwrap();
                let got = score(&model, &shared, mode).unwrap();
                assert_close(&got, &want, &format!("{arch} {mode:?} {trunc:?}"));
            }
        }
    }
}

/// Edge cases of the shared layout: an empty answer on either side or both (the rejected
/// sequence keeps one row of its own, the prompt's last), a one-token prompt, and a sequence
/// with no token at all refused, as the other layouts refuse it.
#[test]
fn shared_layouts_of_empty_answers_and_short_prompts_score_as_padded_ones() {
    let (p1, c1, r1) = (ids(4, 1), Vec::new(), ids(3, 2));
    let (p2, c2, r2) = (ids(1, 3), ids(5, 4), Vec::new());
    let (p3, c3, r3) = (ids(6, 5), Vec::new(), Vec::new());
    let pairs = [
        (&p1[..], &c1[..], &r1[..]),
        (&p2, &c2, &r2),
        (&p3, &c3, &r3),
    ];
    let dev = Device::Cpu;
    let shared = SeqBatch::pairs_shared(&pairs, 64, Truncation::KeepStart, &dev).unwrap();
    let pieces = &shared.shared.as_ref().unwrap().pieces;
    let spared: Vec<usize> = pieces.iter().skip(1).step_by(2).map(|p| p.shared).collect();
    assert_eq!(spared, [4, 0, 5]);
    assert_eq!(shared.counts, [0, 5, 0, 3, 0, 0]);
    let (_, model) = families().remove(0);
    let padded = SeqBatch::pairs(&pairs, 64, Truncation::KeepStart, Some(0), &dev).unwrap();
    for mode in [OpMode::Fast, OpMode::Differentiable, OpMode::Fused] {
        let want = score(&model, &padded, mode).unwrap();
        let got = score(&model, &shared, mode).unwrap();
        assert_close(&got, &want, &format!("{mode:?}"));
    }
    // nothing at all on the chosen side: no position predicts anything
    let empty: [PairIds<'_>; 1] = [(&[], &[], &r1)];
    let err = SeqBatch::pairs_shared(&empty, 64, Truncation::KeepStart, &dev).unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
}
