//! The trainable policy: master weights as candle `Var`s (f32, or bf16 with
//! `train.master_dtype`) and a block-wise backward. With LoRA the `Var`s are f32 adapters (PEFT
//! names) and the base stays frozen in the compute dtype: no master copy, gradient or moment of
//! it exists.
//!
//! Compute copies (in the compute dtype) exist for one block at a time, never for the whole
//! model. One training forward/backward, for a batch of 2B sequences:
//! 1. forward block by block, keeping each block's input (with `gradient_checkpointing`, and no
//!    graph; without it, each block's graph too);
//! 2. the final norm of the rows that predict completion tokens, and their log-probs in
//!    vocabulary chunks with no graph ([`logprobs::token_logps`]), summed per sequence;
//! 3. the loss's gradient with respect to those sums (small, on the host);
//! 4. the chunked softmax backward into the rows and `lm_head`
//!    ([`logprobs::token_logps_backward`]);
//! 5. backward through the final norm, then each block in reverse — recomputed from its stored
//!    input a sub-batch of sequences at a time when checkpointing ([`super::recompute`]) — then
//!    the embedding (a scatter-add).
//!
//! Peak activation memory is the block inputs plus one sub-batch's graph of one block, and
//! full-vocabulary logits never exist for more than one chunk of rows.

mod backward;

use super::grads::Grads;
use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::logprobs::{self, SeqBatch};
use crate::model::lora::{self, Adapter};
use crate::model::{Block, ContextCache};
use crate::model::{OpMode, ParamSource, Transformer, TransformerConfig};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use std::collections::HashMap;

/// Named trainable parameters as `Var`s: the model's (HF names; f32, or bf16 masters that are
/// their own compute copies when the compute dtype is bf16), or with LoRA the adapters' (PEFT
/// names, f32) over a frozen base.
pub struct Policy {
    pub cfg: TransformerConfig,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    index: HashMap<String, usize>,
    /// LoRA: the base model (HF names) in the compute dtype, never trained.
    frozen: HashMap<String, Tensor>,
    pub lora: Option<LoraConfig>,
    pub compute_dtype: DType,
    /// Sequences per recomputed sub-batch in the checkpointed backward; 0 = the attention chunk
    /// of the forward ([`SeqContext::attn_seqs`]).
    pub backward_seqs: usize,
    /// Seeds the LoRA dropout masks of the next training forward (set per micro-batch).
    pub dropout_seed: u64,
    /// RoPE tables and masks, kept across steps.
    contexts: ContextCache,
    /// The op sets of training and scoring forwards: the device's ([`OpMode::training`],
    /// [`OpMode::scoring`]), or the composed ones ([`Policy::use_composed_ops`]).
    train_mode: OpMode,
    score_mode: OpMode,
}

struct Tracked<'a>(&'a Policy);
struct Detached<'a>(&'a Policy);

impl ParamSource for Tracked<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.0.param(name, true)
    }

    fn adapter(&self, module: &str) -> Result<Option<Adapter>> {
        self.0.adapter(module, true)
    }
}

impl ParamSource for Detached<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.0.param(name, false)
    }

    fn adapter(&self, module: &str) -> Result<Option<Adapter>> {
        self.0.adapter(module, false)
    }
}

impl Policy {
    /// The first trained tensor holding a NaN or an Inf, by name.
    pub fn first_non_finite(&self) -> Result<Option<&str>> {
        for (name, var) in self.names.iter().zip(&self.vars) {
            if crate::model::weights::non_finite_at(var.as_tensor())?.is_some() {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Wraps tensors (HF names) as trainable variables stored in `master` (f32 or bf16).
    pub fn new(
        cfg: &TransformerConfig,
        tensors: HashMap<String, Tensor>,
        compute_dtype: DType,
        master: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        if cfg.tie_word_embeddings {
            names.retain(|n| n != "lm_head.weight");
        }
        Self::from_parts(
            cfg,
            tensors,
            names,
            HashMap::new(),
            None,
            (compute_dtype, master),
            device,
        )
    }

    /// LoRA: `adapters` (PEFT names, one A and B per targeted module of `cfg`, e.g. from
    /// [`lora::init_adapters`]) trained over `base` (HF names), which is kept frozen in the
    /// compute dtype.
    pub fn with_lora(
        cfg: &TransformerConfig,
        base: HashMap<String, Tensor>,
        lora: &LoraConfig,
        adapters: HashMap<String, Tensor>,
        compute_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let modules = lora::target_modules(cfg, &lora.target_modules);
        if modules.is_empty() {
            return Err(Error::Config(format!(
                "`train.lora.target_modules` matches no projection of this {:?} model",
                cfg.arch
            )));
        }
        let mut names = Vec::with_capacity(2 * modules.len());
        for (module, fan_in, fan_out) in &modules {
            let (a, b) = lora::peft_names(module);
            for (name, shape) in [(a, [lora.r, *fan_in]), (b, [*fan_out, lora.r])] {
                let t = adapters
                    .get(&name)
                    .ok_or_else(|| Error::Model(format!("the adapter has no `{name}`")))?;
                if t.dims() != shape {
                    return Err(Error::Model(format!(
                        "adapter tensor `{name}` has shape {:?}; this model and r = {} need {shape:?}",
                        t.dims(),
                        lora.r
                    )));
                }
                names.push(name);
            }
        }
        let frozen = base
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(compute_dtype)?.to_device(device)?)))
            .collect::<Result<_>>()?;
        Self::from_parts(
            cfg,
            adapters,
            names,
            frozen,
            Some(lora.clone()),
            (compute_dtype, DType::F32),
            device,
        )
    }

    /// Each of `tensors` named in `names` becomes a `Var` (a copy in `master` on `device`) and
    /// is dropped as it does, so the two copies of the whole model never coexist.
    fn from_parts(
        cfg: &TransformerConfig,
        mut tensors: HashMap<String, Tensor>,
        mut names: Vec<String>,
        frozen: HashMap<String, Tensor>,
        lora: Option<LoraConfig>,
        (compute_dtype, master): (DType, DType),
        device: &Device,
    ) -> Result<Self> {
        if !matches!(master, DType::F32 | DType::BF16) {
            return Err(Error::Train(format!(
                "master weights are kept in f32 or bf16, not {master:?}"
            )));
        }
        names.sort();
        let vars = names
            .iter()
            .map(|n| {
                let t = tensors
                    .remove(n)
                    .ok_or_else(|| Error::Model(format!("no tensor `{n}` to train")))?;
                Ok(Var::from_tensor(&t.to_dtype(master)?.to_device(device)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        drop(tensors);
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            names,
            vars,
            index,
            frozen,
            lora,
            compute_dtype,
            backward_seqs: 0,
            dropout_seed: 0,
            contexts: ContextCache::default(),
            train_mode: OpMode::training(device),
            score_mode: OpMode::scoring(device),
        })
    }

    /// A model tensor (HF name) in the compute dtype: frozen with LoRA, else from its variable.
    fn param(&self, name: &str, tracked: bool) -> Result<Tensor> {
        if self.lora.is_some() {
            return self.frozen.get(name).cloned().ok_or_else(|| {
                Error::Model(format!("tensor `{name}` is missing from the base weights"))
            });
        }
        let v = self.var(name)?.as_tensor();
        let v = if tracked { v.clone() } else { v.detach() };
        Ok(v.to_dtype(self.compute_dtype)?)
    }

    /// The adapter of `module` (f32, tracked or detached), with LoRA and where one targets it.
    fn adapter(&self, module: &str, tracked: bool) -> Result<Option<Adapter>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let (a, b) = lora::peft_names(module);
        let (Some(&ia), Some(&ib)) = (self.index.get(&a), self.index.get(&b)) else {
            return Ok(None);
        };
        let t = |i: usize| {
            let v = self.vars[i].as_tensor();
            if tracked {
                v.clone()
            } else {
                v.detach()
            }
        };
        Ok(Some(Adapter {
            a: t(ia),
            b: t(ib),
            scale: lora::scale(lora),
            dropout: lora.dropout,
        }))
    }

    /// Parameters of the frozen base (0 without LoRA).
    pub fn frozen_params(&self) -> usize {
        self.frozen.values().map(Tensor::elem_count).sum()
    }

    /// Bytes of the frozen base.
    pub fn frozen_bytes(&self) -> usize {
        self.frozen
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.index.get(name).map(|&i| &self.vars[i]).ok_or_else(|| {
            Error::Model(format!(
                "tensor `{name}` is missing from the policy weights"
            ))
        })
    }

    /// The whole model on the tracked variables (tests: plain autograd through everything).
    pub fn tracked(&self) -> Result<Transformer> {
        Transformer::new(&self.cfg, &Tracked(self))
    }

    /// Layer `i` in the compute dtype: tracked (gradients flow into the masters) or detached.
    fn block(&self, i: usize, tracked: bool) -> Result<Block> {
        if tracked {
            Block::load(&self.cfg, &Tracked(self), i)
        } else {
            Block::load(&self.cfg, &Detached(self), i)
        }
    }

    /// Embedding, final norm and `lm_head` in the compute dtype, detached.
    fn head(&self) -> Result<Transformer> {
        Transformer::shell(&self.cfg, &Detached(self))
    }

    /// The trained tensors (in the masters' dtype) under their names (HF, or PEFT's with LoRA),
    /// for checkpoints.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Bytes of the trained tensors (the masters, or with LoRA the adapters).
    pub fn bytes(&self) -> usize {
        self.vars
            .iter()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    /// Parameters (a tied embedding counted once).
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// The trained `lm_head` (none with LoRA).
    fn lm_head_index(&self) -> Option<usize> {
        let name = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.index.get(name).copied()
    }

    fn accumulate(&self, grads: &mut Grads, store: &GradStore) -> Result<()> {
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(g) = store.get(var.as_tensor()) {
                grads.add(i, g)?;
            }
        }
        Ok(())
    }

    /// An empty gradient store for this policy, kept in `dtype`.
    pub fn zero_grads(&self, dtype: DType) -> Grads {
        Grads::new(self.vars.len(), dtype)
    }

    fn training_mode(&self) -> OpMode {
        self.train_mode
    }

    /// Forwards with the composed ops whatever the device (the selftest's reference).
    pub fn use_composed_ops(&mut self) {
        (self.train_mode, self.score_mode) = (OpMode::Differentiable, OpMode::Fast);
    }

    /// Summed completion log-probs without gradients (evaluation, step-0 checks), one block's
    /// compute copy at a time, with the fused kernels no graph needs (the reference's forward).
    pub fn score(&self, batch: &SeqBatch) -> Result<Vec<f64>> {
        let mode = self.score_mode;
        let head = self.head()?;
        let ctx = batch.context(self.contexts.get(
            &head,
            batch.seq_len,
            batch.input_ids.device(),
        )?)?;
        let mut x = head.embed(&batch.input_ids)?; // [2B, T, H], or [1, Σ, H] packed
        for i in 0..self.cfg.num_layers {
            x = self.block(i, false)?.forward(&x, &ctx, mode)?;
        }
        let rows = head.final_norm(&batch.gather_rows(&x)?, mode)?; // [N, H]
        let cap = self.cfg.final_softcap;
        let lp = logprobs::token_logps(&rows, &head.lm_head, &batch.targets, cap, mode)?; // [N]
        batch.sequence_sums(&lp)
    }
}
