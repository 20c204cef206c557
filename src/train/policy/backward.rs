//! The policy's forward and backward of one batch (steps 1–5 of the module's outline): block by
//! block, recomputed a sub-batch at a time when checkpointing, then the embedding.

use super::{Policy, Tracked};
use crate::error::{Error, Result};
use crate::logprobs::{self, SeqBatch};
use crate::model::lora::Dropout;
use crate::model::{Block, RmsNorm, SeqContext};
use crate::model::{ParamSource, Transformer};
use crate::profile::{self, Phase};
use crate::train::backprop::backprop;
use crate::train::grads::Grads;
use crate::train::recompute::{
    budget_setting, sub_batches, Limit, Sub, GRAPH_HIDDEN_ROWS, GRAPH_MLP_ROWS, RECOMPUTE_BYTES,
    RECOMPUTE_BYTES_CPU,
};
use candle_core::{backprop::GradStore, DType, Tensor, Var};

/// What the forward keeps of each block for the backward.
enum Saved {
    /// The block's input (checkpointing: the block is recomputed).
    Input(Tensor),
    /// The block's input variable and output, with the whole graph between them.
    Graph { input: Var, out: Tensor },
}

impl Policy {
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
