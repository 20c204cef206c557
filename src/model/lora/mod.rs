//! LoRA adapters as PEFT has them: a projection y = W·x + s·B·A·dropout(x) with A [r, in] and
//! B [out, r] (s = alpha / r, or alpha / √r with rsLoRA), the adapter computed in f32 on top of a
//! base in any dtype; PEFT's tensor names and `adapter_config.json` in and out; and the merge
//! W + s·B·A into a full checkpoint.

use super::config::TransformerConfig;
use super::linear_op::linear;
use super::row_ops;
use super::{cpu, init};
use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use std::collections::HashMap;

pub use crate::config::PROJECTIONS;

mod files;

pub use files::{is_adapter, named_base, read, write, NamedBase, SavedAdapter};
pub use files::{CONFIG_FILE, WEIGHTS_FILE};

/// PEFT's saved names of a module's A and B (e.g. `model.layers.0.self_attn.q_proj`).
pub fn peft_names(module: &str) -> (String, String) {
    (
        format!("base_model.model.{module}.lora_A.weight"),
        format!("base_model.model.{module}.lora_B.weight"),
    )
}

/// PEFT's scaling of B·A.
pub fn scale(lora: &LoraConfig) -> f64 {
    if lora.use_rslora {
        lora.alpha / (lora.r as f64).sqrt()
    } else {
        lora.alpha / lora.r as f64
    }
}

/// The adapted modules of a model: (HF module name, in features, out features), in name order.
pub fn target_modules(
    cfg: &TransformerConfig,
    targets: &TargetModules,
) -> Vec<(String, usize, usize)> {
    let mut out: Vec<_> = super::shapes::expected(cfg)
        .into_iter()
        .filter_map(|(name, shape)| {
            let module = name.strip_suffix(".weight")?;
            let proj = module.rsplit('.').next()?;
            (module.starts_with("model.layers.")
                && PROJECTIONS.contains(&proj)
                && targets.includes(proj))
            .then(|| (module.to_string(), shape[1], shape[0]))
        })
        .collect();
    out.sort();
    out
}

/// Every projection named in `train.lora.target_modules` exists in this family (PEFT passes
/// over a name that matches nothing while another matches: Phi-3's fused `qkv_proj` leaves
/// `q_proj` out, without a word). All-linear always holds.
pub fn check_targets_exist(cfg: &TransformerConfig, targets: &TargetModules) -> Result<()> {
    let TargetModules::Names(names) = targets else {
        return Ok(());
    };
    let here: Vec<String> = target_modules(cfg, &TargetModules::AllLinear)
        .iter()
        .filter_map(|(m, _, _)| m.rsplit('.').next().map(String::from))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    match names.iter().find(|n| !here.contains(n)) {
        None => Ok(()),
        Some(n) => Err(Error::Config(format!(
            "`train.lora.target_modules` names {n:?}, which this model ({:?}) does not have: its \
             projections are {}",
            cfg.arch,
            here.join(", ")
        ))),
    }
}

/// Fresh adapters as PEFT initializes them: A Kaiming-uniform (torch's `nn.Linear` default,
/// bound 1/√in, from a seeded stream), B zero, so the adapted model starts as the base.
pub fn init_adapters(
    modules: &[(String, usize, usize)],
    r: usize,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    // B·A has rank at most min(in, out): a larger r only adds memory (and a damaged r, a
    // failed allocation). Refused before any adapter is made.
    let most = modules
        .iter()
        .map(|(_, i, o)| (*i).min(*o))
        .max()
        .unwrap_or(0);
    if r > most {
        return Err(Error::Config(format!(
            "`train.lora.r` = {r} is above the rank any adapted projection can have (at most \
             {most}, min(in, out) of the largest): set train.lora.r to {most} or less"
        )));
    }
    let mut out = HashMap::new();
    for (module, fan_in, fan_out) in modules {
        let (a, b) = peft_names(module);
        let bound = 1.0 / (*fan_in as f64).sqrt();
        let key = init::fnv1a64(&a) ^ seed;
        let values: Vec<f32> = (1..=(r * fan_in) as u64)
            .map(|i| (bound * init::uniform(key, i)) as f32)
            .collect();
        out.insert(a, Tensor::from_vec(values, (r, *fan_in), &Device::Cpu)?);
        out.insert(b, Tensor::zeros((*fan_out, r), DType::F32, &Device::Cpu)?);
    }
    Ok(out)
}

/// Dropout of one forward: the mask of sequence s is drawn from (`seed`, module, `first_seq` + s),
/// so a block recomputed a few sequences at a time in the backward sees the forward's masks. A
/// sequence's mask over its positions is the same padded or packed (`segments`: the lengths of
/// the sequences laid end to end in one row).
#[derive(Debug, Clone)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
    pub first_seq: usize,
    pub segments: Option<std::sync::Arc<[usize]>>,
}

impl Dropout {
    /// Keep-mask × 1/(1 − p) for x [B, T, n] (or [1, Σ, n] packed) of the module with hash
    /// `module`, in f32.
    fn mask(&self, x: &Tensor, module: u64) -> Result<Tensor> {
        let (b, t, n) = x.dims3()?;
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let lens: Vec<usize> = match &self.segments {
            Some(lens) => lens.to_vec(),
            None => vec![t; b],
        };
        let mut values = Vec::with_capacity(b * t * n);
        for (s, len) in lens.iter().enumerate() {
            let key = self.seed ^ module ^ ((self.first_seq + s) as u64).wrapping_mul(0x9E37_79B9);
            values.extend((1..=(len * n) as u64).map(|i| {
                if (init::uniform(key, i) + 1.0) / 2.0 >= self.p {
                    keep
                } else {
                    0.0
                }
            }));
        }
        if values.len() != b * t * n {
            return Err(crate::error::Error::Model(format!(
                "dropout: packed lengths {lens:?} do not lay out [{b}, {t}, {n}]"
            )));
        }
        Ok(Tensor::from_vec(values, (b, t, n), x.device())?)
    }
}

/// A low-rank update of one projection: A [r, in], B [out, r] (f32, tracked or not) and its scale.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout probability on the adapter's input (0: none).
    pub dropout: f64,
}

impl Adapter {
    /// The update of rows `start..start + len` of the output (a part of a fused projection).
    pub fn narrow_out(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            b: self.b.narrow(0, start, len)?,
            ..self.clone()
        })
    }
}

/// A projection: the base `Linear`, plus an adapter where one targets it.
#[derive(Debug, Clone)]
pub struct Proj {
    base: Linear,
    adapter: Option<Adapter>,
    /// Hash of the module's name: keys its dropout masks.
    id: u64,
}

impl Proj {
    pub fn new(base: Linear, adapter: Option<Adapter>, module: &str) -> Self {
        Self {
            base,
            adapter,
            id: init::fnv1a64(module),
        }
    }

    /// x [B, T, in] → [B, T, out]. The adapter runs in f32 on x cast to f32 and is added to the
    /// base output in f32 before the cast back, as PEFT does with its f32 adapter weights.
    pub fn forward(&self, x: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        let w = self.base.weight();
        let product = if x.track_op() || w.track_op() {
            // in a backward: one graph node, and no weight gradient for a frozen base
            Some(linear(x, w)?)
        } else if cpu::skinny::covers(x, w) {
            // a decoding step's few rows: each weight read once, unpacked
            Some(cpu::skinny::linear(x, w)?)
        } else {
            None
        };
        let y = match (product, self.base.bias()) {
            // in a backward, the bias's gradient summed over the rows in f32
            (Some(y), Some(b)) if y.track_op() || b.track_op() => row_ops::bias_add(&y, b)?,
            (Some(y), Some(b)) => y.broadcast_add(b)?,
            (Some(y), None) => y,
            (None, _) => self.base.forward(x)?,
        };
        let Some(ad) = &self.adapter else {
            return Ok(y);
        };
        let mut xf = x.to_dtype(DType::F32)?;
        if let Some(d) = dropout.filter(|_| ad.dropout > 0.0) {
            xf = (xf * d.mask(x, self.id)?)?;
        }
        let delta = (linear(&linear(&xf, &ad.a)?, &ad.b)? * ad.scale)?;
        Ok((y.to_dtype(DType::F32)? + delta)?.to_dtype(x.dtype())?)
    }
}

/// The adapter of `module` from `tensors` (PEFT names), if it has one.
pub fn adapter_of(
    tensors: &HashMap<String, Tensor>,
    lora: &LoraConfig,
    module: &str,
) -> Option<Adapter> {
    let (a, b) = peft_names(module);
    Some(Adapter {
        a: tensors.get(&a)?.clone(),
        b: tensors.get(&b)?.clone(),
        scale: scale(lora),
        dropout: lora.dropout,
    })
}

/// Adds s·B·A into the base weights (HF names, f32) for every adapted module of `cfg`. Every
/// adapter tensor must find its module, and every targeted module its adapter.
pub fn merge(
    base: &mut HashMap<String, Tensor>,
    cfg: &TransformerConfig,
    saved: &SavedAdapter,
) -> Result<()> {
    let modules = target_modules(cfg, &saved.lora.target_modules);
    let mut used = 0;
    for (module, fan_in, fan_out) in &modules {
        let ad = adapter_of(&saved.tensors, &saved.lora, module).ok_or_else(|| {
            let (a, b) = peft_names(module);
            let missing = if saved.tensors.contains_key(&a) { b } else { a };
            Error::Model(format!(
                "the adapter holds no `{missing}`, but refdpo adapts `{module}`: its \
                 `target_modules` name a projection in every layer, so an adapter of only some \
                 layers (`layers_to_transform`, full module names of one layer) is not read; or \
                 the file is damaged"
            ))
        })?;
        let r = saved.lora.r;
        let (a, b) = peft_names(module);
        for (name, t, want) in [(a, &ad.a, [r, *fan_in]), (b, &ad.b, [*fan_out, r])] {
            if t.dims() != want {
                return Err(Error::Model(format!(
                    "adapter tensor `{name}` has shape {:?}, but r = {r} and the base's \
                     `{module}` imply {want:?}: is it the adapter of another base?",
                    t.dims()
                )));
            }
        }
        let name = format!("{module}.weight");
        let w = base
            .get(&name)
            .ok_or_else(|| Error::Model(format!("the base model has no `{name}`")))?;
        let delta = (ad.b.matmul(&ad.a)? * ad.scale)?.to_dtype(w.dtype())?;
        let merged = (w + delta.to_device(w.device())?)?;
        // never a model of NaN or Inf weights (PEFT's `safe_merge` refuses them too)
        if let Some(at) = crate::model::weights::non_finite_at(&merged)? {
            return Err(Error::Model(format!(
                "merging the adapter into `{name}` gives a NaN or Inf weight (element {at}): its \
                 lora_A/lora_B of `{module}` or `lora_alpha` ({}) overflow; the adapter is damaged",
                saved.lora.alpha
            )));
        }
        base.insert(name, merged);
        used += 2;
    }
    if used != saved.tensors.len() {
        let known: std::collections::HashSet<String> = modules
            .iter()
            .flat_map(|(m, _, _)| {
                let (a, b) = peft_names(m);
                [a, b]
            })
            .collect();
        let stray = saved
            .tensors
            .keys()
            .find(|k| !known.contains(*k))
            .cloned()
            .unwrap_or_default();
        return Err(Error::Model(format!(
            "adapter tensor `{stray}` matches no targeted module of this model: refdpo adapts \
             the decoder layers' linear projections ({}) with plain LoRA A and B only; is it \
             another kind of adapter, or the adapter of another base?",
            PROJECTIONS.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_above_every_projections_is_refused_before_allocating() {
        let modules = [("a".to_string(), 64, 128), ("b".to_string(), 256, 32)];
        assert_eq!(init_adapters(&modules, 64, 1).unwrap().len(), 4);
        for r in [65, 1_000_000_000] {
            let e = init_adapters(&modules, r, 1).unwrap_err().to_string();
            assert!(
                e.contains("`train.lora.r`") && e.contains("at most 64"),
                "{e}"
            );
        }
    }

    #[test]
    fn dropout_masks_depend_on_the_sequence_not_the_chunk() {
        let x = Tensor::ones((4, 3, 5), DType::F32, &Device::Cpu).unwrap();
        let d = Dropout {
            p: 0.5,
            seed: 9,
            first_seq: 0,
            segments: None,
        };
        let whole = d.mask(&x, 1).unwrap();
        let tail = Dropout {
            first_seq: 2,
            ..d.clone()
        }
        .mask(&x.narrow(0, 2, 2).unwrap(), 1)
        .unwrap();
        // packed: sequences of 2 and 3 positions of the 4 rows' first two sequences
        let packed = Dropout {
            segments: Some([2usize, 3].into()),
            ..d.clone()
        }
        .mask(
            &Tensor::ones((1, 5, 5), DType::F32, &Device::Cpu).unwrap(),
            1,
        )
        .unwrap();
        let rows = |m: &Tensor, r: usize, len: usize| -> Vec<f32> {
            m.narrow(1, 0, len)
                .unwrap()
                .narrow(0, r, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let packed_rows: Vec<f32> = packed.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(packed_rows[..10], rows(&whole, 0, 2)[..]);
        assert_eq!(packed_rows[10..], rows(&whole, 1, 3)[..]);
        let diff = (whole.narrow(0, 2, 2).unwrap() - tail)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        let v: Vec<f32> = whole.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&m| m == 0.0 || m == 2.0));
        let kept = v.iter().filter(|&&m| m > 0.0).count();
        assert!((20..=40).contains(&kept), "{kept} of 60 kept at p = 0.5");
        let other = d.mask(&x, 2).unwrap();
        assert_ne!(
            other.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v,
            "modules draw their own masks"
        );
    }
}
