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

use super::backprop::backprop;
use super::grads::Grads;
use super::recompute::{
    budget_setting, sub_batches, Limit, Sub, GRAPH_HIDDEN_ROWS, GRAPH_MLP_ROWS, RECOMPUTE_BYTES,
    RECOMPUTE_BYTES_CPU,
};
use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::logprobs::{self, SeqBatch};
use crate::model::lora::{self, Adapter, Dropout};
use crate::model::{Block, ContextCache, RmsNorm, SeqContext};
use crate::model::{OpMode, ParamSource, Transformer, TransformerConfig};
use crate::profile::{self, Phase};
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

/// What the forward keeps of each block for the backward.
enum Saved {
    /// The block's input (checkpointing: the block is recomputed).
    Input(Tensor),
    /// The block's input variable and output, with the whole graph between them.
    Graph { input: Var, out: Tensor },
}

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

    /// Forward + backward of one batch. `loss_grad` maps the per-sequence summed log-probs to
    /// d loss / d sums (its own bookkeeping — loss value, metrics — stays with the caller).
    /// Returns the per-sequence sums; gradients are added into `grads`.
    pub fn forward_backward(
        &self,
        batch: &SeqBatch,
        checkpointing: bool,
        grads: &mut Grads,
        loss_grad: &mut dyn FnMut(&[f64]) -> Result<Vec<f64>>,
    ) -> Result<Vec<f64>> {
        let mode = self.training_mode();
        let head = self.head()?;
        let full = self
            .contexts
            .get(&head, batch.seq_len, batch.input_ids.device())?;
        let mut ctx = batch.context(full.clone())?;
        let dropout = self.lora.as_ref().filter(|l| l.dropout > 0.0);
        if dropout.is_some() && batch.shared.is_some() {
            return Err(Error::Train(
                "LoRA dropout draws its masks per whole sequence: a batch with shared prompts \
                 cannot take it (lay the batch out with SeqBatch::pairs)"
                    .into(),
            ));
        }
        ctx.dropout = dropout.map(|l| Dropout {
            p: l.dropout,
            seed: self.dropout_seed,
            first_seq: 0,
            segments: ctx.segments.clone(),
        });
        // 1. forward, one block's compute copy at a time: x [2B, T, H]
        let mut x = head.embed(&batch.input_ids)?;
        let mut saved = Vec::with_capacity(self.cfg.num_layers);
        for i in 0..self.cfg.num_layers {
            if checkpointing {
                let next = self.block(i, false)?.forward(&x, &ctx, mode)?;
                saved.push(Saved::Input(x));
                x = next;
            } else {
                let input = Var::from_tensor(&x)?;
                let out = self
                    .block(i, true)?
                    .forward(input.as_tensor(), &ctx, mode)?;
                x = out.detach();
                saved.push(Saved::Graph { input, out });
            }
        }
        // 2. the rows that predict completion tokens, final-normed (tracked): [N, H]
        let last = Var::from_tensor(&x)?;
        drop(x);
        let norm = RmsNorm::for_family(&self.cfg, Tracked(self).get("model.norm.weight")?)?;
        let rows = norm.forward(&batch.gather_rows(last.as_tensor())?, mode)?;
        let rows_d = rows.detach();
        let (tok, lse) = logprobs::token_logps_lse(
            &rows_d,
            &head.lm_head,
            &batch.targets,
            self.cfg.final_softcap,
            mode,
        )?;
        let sums = batch.sequence_sums(&tok)?;
        // 3. d loss / d sums → per token [N]
        let g_seq = loss_grad(&sums)?;
        let g_tok: Vec<f32> = batch
            .counts
            .iter()
            .zip(&g_seq)
            .flat_map(|(&c, &g)| std::iter::repeat_n(g as f32, c))
            .collect();
        let n = g_tok.len();
        let g_tok = Tensor::from_vec(g_tok, n, rows.device())?;
        // 4. chunked softmax backward: d rows [N, H]; d lm_head, when it trains, added into
        // its gradient one vocabulary chunk at a time
        let head_shape = head.lm_head.dims2()?;
        let lm_head = self.lm_head_index();
        let mut add_chunk = |v0: usize, chunk: &Tensor| match lm_head {
            Some(i) => grads.add_rows(i, v0, chunk, head_shape),
            None => Ok(()),
        };
        let sink: Option<logprobs::HeadGradSink<'_>> = lm_head.map(|_| &mut add_chunk as _);
        let g_rows = logprobs::token_logps_backward(
            &rows_d,
            &head.lm_head,
            &batch.targets,
            &g_tok,
            &lse,
            self.cfg.final_softcap,
            sink,
            mode,
        )?;
        drop(head);
        // 5. back through the final norm, the blocks in reverse, the embedding
        let store = backprop(&rows, &g_rows)?;
        self.accumulate(grads, &store)?;
        let mut g = grad_of(&store, &last)?; // [2B, T, H]
        drop((store, last));
        let mut subs = None;
        while let Some(s) = saved.pop() {
            let i = saved.len();
            g = match s {
                Saved::Input(input) => {
                    self.block_backward(i, (&input, &g), (&ctx, &full), &mut subs, grads)?
                }
                Saved::Graph { input, out } => {
                    let store = backprop(&out, &g)?;
                    self.accumulate(grads, &store)?;
                    grad_of(&store, &input)?
                }
            };
        }
        if self.index.contains_key("model.embed_tokens.weight") {
            self.embedding_backward(&batch.host_ids, &g, grads)?;
        }
        Ok(sums)
    }

    /// Recomputes block `i` from its input x [2B, T, H] (or [1, Σ, H] packed) a sub-batch of
    /// sequences at a time and backpropagates the upstream gradient g of x's shape; returns
    /// d input. `ctx` is the forward's context, `full` the unpacked tables it was made from.
    /// `cached` keeps the last block's sub-batches, taken again while the limit is the same
    /// (it is in every layer of a uniform model): their contexts are built once per
    /// micro-batch, not once per layer.
    fn block_backward(
        &self,
        i: usize,
        (x, g): (&Tensor, &Tensor),
        (ctx, full): (&SeqContext, &SeqContext),
        cached: &mut Option<(Limit, usize, Vec<Sub>)>,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let block = self.block(i, true)?;
        let limit = self.recompute_limit(&block, x, full)?;
        let (dim, subs) = match cached {
            Some((l, dim, subs)) if *l == limit => (*dim, subs.clone()),
            _ => {
                let (dim, subs) = sub_batches(limit, x, (ctx, full))?;
                *cached = Some((limit, dim, subs.clone()));
                (dim, subs)
            }
        };
        // Over several sub-batches, this block's gradients are summed in f32 and stored once;
        // one sub-batch's go straight into `grads` (the same numbers, without an f32 copy of
        // each weight's gradient and its cast back).
        let several = subs.len() > 1;
        let mut local = self.zero_grads(DType::F32);
        let mut g_in = Vec::with_capacity(subs.len());
        for Sub {
            first_seq,
            start,
            len,
            ctx: mut sub,
        } in subs
        {
            let input = Var::from_tensor(&x.narrow(dim, start, len)?)?;
            // this sub-batch's own dropout masks: those of its sequences in the forward
            sub.dropout = ctx.dropout.clone().map(|d| Dropout {
                first_seq,
                segments: sub.segments.clone(),
                ..d
            });
            let out = block.forward(input.as_tensor(), &sub, self.training_mode())?;
            let store = backprop(&out, &g.narrow(dim, start, len)?)?;
            self.accumulate(if several { &mut local } else { grads }, &store)?;
            g_in.push(grad_of(&store, &input)?);
        }
        if several {
            grads.merge(local)?;
        }
        Ok(Tensor::cat(&g_in, dim)?)
    }

    /// How many sequences block `i`'s checkpointed backward recomputes at once, for input x:
    /// `backward_seqs` when set; else, where the attention keeps no [T, T] scores (the tiled
    /// op), as many as fit [`RECOMPUTE_BYTES`] (CPU: [`RECOMPUTE_BYTES_CPU`]) of the block's
    /// graph, so that the recompute's products are large (one launch per op for the whole
    /// micro-batch on a GPU, not one per sequence or two); else the padded layout's attention
    /// chunk, which bounds the scores.
    fn recompute_limit(&self, block: &Block, x: &Tensor, full: &SeqContext) -> Result<Limit> {
        if self.backward_seqs > 0 {
            return Ok(Limit::Seqs(self.backward_seqs));
        }
        let tokens = x.dims()[..2].iter().product();
        let device = x.device();
        if !block.scores_free(device, x.dtype(), tokens, self.training_mode()) {
            return Ok(Limit::Seqs(full.attn_seqs));
        }
        let budget = match budget_setting()? {
            Some(bytes) => bytes,
            None if device.is_cpu() => RECOMPUTE_BYTES_CPU,
            None => RECOMPUTE_BYTES,
        };
        let (h, m) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let per_token = (GRAPH_HIDDEN_ROWS * h + GRAPH_MLP_ROWS * m) * x.dtype().size_in_bytes();
        Ok(Limit::Tokens((budget / per_token.max(1)).max(1)))
    }

    /// The embedding's gradient as a scatter-add of g [2B, T, H] into the rows of its ids (on
    /// the host, in the order of g's rows), in place. As HF's `nn.Embedding(padding_idx =
    /// pad_token_id)`, the pad row gets nothing from the lookup.
    fn embedding_backward(&self, ids: &[u32], g: &Tensor, grads: &mut Grads) -> Result<()> {
        let _phase = profile::scope(Phase::Embedding);
        let (b, t, h) = g.dims3()?;
        let mut g = g.reshape((b * t, h))?;
        if let Some(scale) = Transformer::embed_scale(&self.cfg, self.compute_dtype, g.device())? {
            // the lookup was scaled (by Gemma's √hidden, rounded to the compute dtype)
            g = g
                .to_dtype(DType::F32)?
                .broadcast_mul(&scale.to_dtype(DType::F32)?)?;
        }
        let i = self.index["model.embed_tokens.weight"];
        let rows = self.vars[i].dim(0)?;
        grads.index_add(i, ids, self.cfg.pad_token_id, &g, (rows, h))
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

/// The gradient reaching a block input, detached: candle leaves a variable's gradient attached
/// to the graph that produced it, which would chain every block's activations together.
fn grad_of(store: &GradStore, var: &Var) -> Result<Tensor> {
    store
        .get(var.as_tensor())
        .map(Tensor::detach)
        .ok_or_else(|| {
            Error::Train(
                "no gradient reached a block input: the forward is not differentiable".into(),
            )
        })
}
