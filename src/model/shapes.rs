//! Every tensor a config implies, with its shape: the one list the decoder's loading follows, so
//! a model folder is checked whole — each tensor present, each shape the config's — before any
//! work, and a mismatch names the tensor, both shapes and the config keys behind them.

use super::config::{QkNorm, TransformerConfig};
use super::weights::Header;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// (HF tensor name, shape) of every tensor `cfg`'s decoder reads, in load order.
pub fn expected(cfg: &TransformerConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (nq, nkv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    out.push(("model.norm.weight".into(), vec![h]));
    for layer in 0..cfg.num_layers {
        let pre = format!("model.layers.{layer}");
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{pre}.{name}"), shape));
        let norms: &[&str] = if cfg.gemma {
            &[
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ]
        } else if cfg.post_norms {
            &["post_attention_layernorm", "post_feedforward_layernorm"]
        } else {
            &["input_layernorm", "post_attention_layernorm"]
        };
        for n in norms {
            add(&format!("{n}.weight"), vec![h]);
        }
        if cfg.fused_projections {
            add("self_attn.qkv_proj.weight", vec![nq + 2 * nkv, h]);
            add("mlp.gate_up_proj.weight", vec![2 * i, h]);
        } else {
            for (n, rows) in [("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)] {
                add(&format!("self_attn.{n}.weight"), vec![rows, h]);
                if cfg.qkv_bias {
                    add(&format!("self_attn.{n}.bias"), vec![rows]);
                }
            }
            for n in ["gate_proj", "up_proj"] {
                add(&format!("mlp.{n}.weight"), vec![i, h]);
                if cfg.mlp_bias {
                    add(&format!("mlp.{n}.bias"), vec![i]);
                }
            }
        }
        add("self_attn.o_proj.weight", vec![h, nq]);
        if cfg.o_bias {
            add("self_attn.o_proj.bias", vec![h]);
        }
        add("mlp.down_proj.weight", vec![h, i]);
        if cfg.mlp_bias {
            add("mlp.down_proj.bias", vec![h]);
        }
        match cfg.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                add("self_attn.q_norm.weight", vec![cfg.head_dim]);
                add("self_attn.k_norm.weight", vec![cfg.head_dim]);
            }
            QkNorm::Whole => {
                add("self_attn.q_norm.weight", vec![nq]);
                add("self_attn.k_norm.weight", vec![nkv]);
            }
        }
    }
    out
}

/// The config sizes a tensor's shape follows from, for the error that names it.
fn sizes_behind(name: &str, cfg: &TransformerConfig) -> String {
    let c = cfg;
    if name.contains("embed_tokens") || name.starts_with("lm_head") {
        format!("vocab_size {}, hidden_size {}", c.vocab_size, c.hidden_size)
    } else if name.contains("self_attn") {
        format!(
            "hidden_size {}, num_attention_heads {}, num_key_value_heads {}, head_dim {}",
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        )
    } else if name.contains("mlp") {
        format!(
            "hidden_size {}, intermediate_size {}",
            c.hidden_size, c.intermediate_size
        )
    } else {
        format!("hidden_size {}", c.hidden_size)
    }
}

/// Checks the tensors `headers` list (every weight file's header) against `cfg`: each expected
/// tensor present with its shape and a float dtype. `dir` is the model folder, named in errors.
pub fn check(cfg: &TransformerConfig, headers: &[Header], dir: &Path) -> Result<()> {
    let found: HashMap<&str, (&Header, usize)> = headers
        .iter()
        .flat_map(|h| {
            h.tensors
                .iter()
                .enumerate()
                .map(move |(k, t)| (t.name.as_str(), (h, k)))
        })
        .collect();
    for (name, shape) in expected(cfg) {
        let Some((header, k)) = found.get(name.as_str()) else {
            return Err(Error::Model(format!(
                "`{}`: tensor `{name}` is missing from the weights ({}), and config.json implies \
                 it: the weights and config.json do not belong to one model",
                dir.display(),
                headers
                    .iter()
                    .map(|h| h.path.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let t = &header.tensors[*k];
        if t.shape != shape {
            return Err(Error::Model(format!(
                "`{}`: tensor `{name}` has shape {:?}, but config.json implies {shape:?} ({}): \
                 the weights and config.json do not belong to one model",
                header.path.display(),
                t.shape,
                sizes_behind(&name, cfg)
            )));
        }
        if !matches!(t.dtype.as_str(), "F32" | "BF16" | "F16" | "F64") {
            return Err(Error::Model(format!(
                "`{}`: tensor `{name}` is stored as {}: refdpo reads float weights (F32, BF16, \
                 F16, F64); dequantize the checkpoint first",
                header.path.display(),
                t.dtype
            )));
        }
    }
    Ok(())
}

/// [`check`] over the headers of a model folder's weight files, after settling the one thing the
/// files decide, as transformers 5 loads them: a stored `lm_head.weight` is the head even where
/// config.json ties it to the embedding (transformers ties only a head the files lack).
pub fn check_files(cfg: &mut TransformerConfig, files: &[PathBuf], dir: &Path) -> Result<()> {
    let headers = files
        .iter()
        .map(|f| super::weights::read_header(f))
        .collect::<Result<Vec<_>>>()?;
    let stored_head = headers
        .iter()
        .any(|h| h.tensors.iter().any(|t| t.name == "lm_head.weight"));
    if cfg.tie_word_embeddings && stored_head {
        cfg.tie_word_embeddings = false;
    }
    check(cfg, &headers, dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init, ParamSource, Transformer};
    use candle_core::Tensor;
    use std::cell::RefCell;

    /// Records every tensor the decoder's loading asks for, with the shape it got.
    struct Recording(HashMap<String, Tensor>, RefCell<Vec<(String, Vec<usize>)>>);

    impl ParamSource for Recording {
        fn get(&self, name: &str) -> Result<Tensor> {
            let t = ParamSource::get(&self.0, name)?;
            self.1
                .borrow_mut()
                .push((name.to_string(), t.dims().to_vec()));
            Ok(t)
        }
    }

    fn family(model_type: &str, extra: &str) -> TransformerConfig {
        TransformerConfig::from_json(&format!(
            r#"{{"model_type":"{model_type}","vocab_size":11,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn the_list_is_what_the_decoder_loads_for_every_family() {
        for cfg in [
            family("llama", ""),
            family("llama", r#","attention_bias":true,"mlp_bias":true"#),
            family("mistral", r#","sliding_window":4"#),
            family("qwen2", r#","tie_word_embeddings":true"#),
            family("qwen3", r#","head_dim":6"#),
            family("olmo2", ""),
            family("phi3", ""),
            family("gemma2", r#","sliding_window":4,"query_pre_attn_scalar":4"#),
            family("gemma3_text", r#","sliding_window":4"#),
        ] {
            let listed = expected(&cfg);
            let p = Recording(
                init::init_weights(&cfg, 1, 0.1).unwrap(),
                RefCell::default(),
            );
            Transformer::new(&cfg, &p).unwrap();
            let mut asked = p.1.into_inner();
            let mut listed_sorted = listed.clone();
            asked.sort();
            listed_sorted.sort();
            assert_eq!(asked, listed_sorted, "{:?}", cfg.arch);
        }
    }
}
