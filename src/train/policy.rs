//! The trainable policy: f32 master weights as candle `Var`s and a block-wise backward.
//!
//! One training forward/backward, for a batch of 2B sequences:
//! 1. forward block by block, keeping each block's input (with `gradient_checkpointing`, and no
//!    graph; without it, each block's graph too);
//! 2. completion log-probs from the final hidden rows in vocabulary chunks, with no graph
//!    ([`logprobs::token_logps`]), summed per sequence;
//! 3. the loss's gradient with respect to those sums (small, on the host);
//! 4. the chunked softmax backward into the hidden rows and `lm_head`
//!    ([`logprobs::token_logps_backward`]);
//! 5. backward through the final norm, then each block in reverse (recomputed from its stored
//!    input when checkpointing), then the embedding.
//!
//! Peak activation memory is one block's graph plus the block inputs, and full-vocabulary logits
//! never exist for more than one chunk of rows.

use crate::error::{Error, Result};
use crate::logprobs::{self, SeqBatch};
use crate::model::{OpMode, ParamSource, Transformer, TransformerConfig};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use std::collections::HashMap;

/// Named parameters (HF names) as f32 `Var`s.
pub struct Policy {
    pub cfg: TransformerConfig,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    index: HashMap<String, usize>,
    pub compute_dtype: DType,
}

/// Per-parameter gradients (f32), accumulated over micro-batches.
pub type Grads = Vec<Option<Tensor>>;

struct Tracked<'a>(&'a Policy);
struct Detached<'a>(&'a Policy);

impl ParamSource for Tracked<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        let v = self.0.var(name)?;
        Ok(v.as_tensor().to_dtype(self.0.compute_dtype)?)
    }
}

impl ParamSource for Detached<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        let v = self.0.var(name)?;
        Ok(v.as_tensor().detach().to_dtype(self.0.compute_dtype)?)
    }
}

impl Policy {
    /// Wraps f32 tensors (HF names) as trainable variables.
    pub fn new(
        cfg: &TransformerConfig,
        tensors: HashMap<String, Tensor>,
        compute_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        if cfg.tie_word_embeddings {
            names.retain(|n| n != "lm_head.weight");
        }
        let vars = names
            .iter()
            .map(|n| {
                Ok(Var::from_tensor(
                    &tensors[n].to_dtype(DType::F32)?.to_device(device)?,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
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
            compute_dtype,
        })
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.index.get(name).map(|&i| &self.vars[i]).ok_or_else(|| {
            Error::Model(format!(
                "tensor `{name}` is missing from the policy weights"
            ))
        })
    }

    /// The model on the tracked variables (gradients flow into the f32 masters).
    pub fn tracked(&self) -> Result<Transformer> {
        Transformer::new(&self.cfg, &Tracked(self))
    }

    /// The model on detached copies: no graph is built.
    pub fn detached(&self) -> Result<Transformer> {
        Transformer::new(&self.cfg, &Detached(self))
    }

    /// The current weights (f32) under their HF names, for checkpoints.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    fn lm_head_index(&self) -> usize {
        let name = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.index[name]
    }

    fn accumulate(&self, grads: &mut Grads, store: &GradStore) -> Result<()> {
        for (slot, var) in grads.iter_mut().zip(&self.vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                add_into(slot, g)?;
            }
        }
        Ok(())
    }

    pub fn zero_grads(&self) -> Grads {
        vec![None; self.vars.len()]
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
        let tracked = self.tracked()?;
        let detached = self.detached()?;
        let mode = OpMode::Differentiable;
        let ctx = detached.context(batch.seq_len, batch.input_ids.device())?;
        // 1. forward, block by block: x [2B, T, H]
        let mut x = detached.embed(&batch.input_ids)?;
        let mut saved: Vec<(Var, Option<Tensor>)> = Vec::with_capacity(tracked.blocks.len());
        for (i, block) in tracked.blocks.iter().enumerate() {
            let input = Var::from_tensor(&x)?;
            if checkpointing {
                x = detached.blocks[i].forward(&x, &ctx, mode)?;
                saved.push((input, None));
            } else {
                let out = block.forward(input.as_tensor(), &ctx, mode)?;
                x = out.detach();
                saved.push((input, Some(out)));
            }
        }
        // 2. final norm (tracked), rows that predict completion tokens: [N, H]
        let last = Var::from_tensor(&x)?;
        let rows = batch.gather_rows(&tracked.final_norm(last.as_tensor(), mode)?)?;
        let rows_d = rows.detach();
        let lm_head = detached.lm_head.clone();
        let tok = logprobs::token_logps(&rows_d, &lm_head, &batch.targets)?;
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
        // 4. chunked softmax backward
        let (g_rows, g_lm) =
            logprobs::token_logps_backward(&rows_d, &lm_head, &batch.targets, &g_tok)?;
        add_into(
            &mut grads[self.lm_head_index()],
            &g_lm.to_dtype(DType::F32)?,
        )?;
        // 5. back through the final norm, the blocks in reverse, the embedding
        let store = (rows * g_rows)?.sum_all()?.backward()?;
        self.accumulate(grads, &store)?;
        let mut g = grad_of(&store, &last)?;
        for (i, (input, out)) in saved.iter().enumerate().rev() {
            let out = match out {
                Some(out) => out.clone(),
                None => tracked.blocks[i].forward(input.as_tensor(), &ctx, mode)?,
            };
            let store = (out * &g)?.sum_all()?.backward()?;
            self.accumulate(grads, &store)?;
            g = grad_of(&store, input)?;
        }
        if let Some(pad) = self.cfg.pad_token_id {
            // nn.Embedding(padding_idx = pad_token_id): no gradient into that row from the lookup.
            let keep = batch.input_ids.ne(pad)?.to_dtype(g.dtype())?.unsqueeze(2)?; // [2B, T, 1]
            g = g.broadcast_mul(&keep)?;
        }
        let store = (tracked.embed(&batch.input_ids)? * &g)?
            .sum_all()?
            .backward()?;
        self.accumulate(grads, &store)?;
        Ok(sums)
    }

    /// Summed completion log-probs without gradients (evaluation, step-0 checks).
    pub fn score(&self, batch: &SeqBatch) -> Result<Vec<f64>> {
        logprobs::score(&self.detached()?, batch, OpMode::Differentiable)
    }
}

fn grad_of(store: &GradStore, var: &Var) -> Result<Tensor> {
    store.get(var.as_tensor()).cloned().ok_or_else(|| {
        Error::Train("no gradient reached a block input: the forward is not differentiable".into())
    })
}

fn add_into(slot: &mut Option<Tensor>, g: &Tensor) -> Result<()> {
    let g = g.to_dtype(DType::F32)?;
    *slot = Some(match slot.take() {
        Some(acc) => (acc + g)?,
        None => g,
    });
    Ok(())
}
