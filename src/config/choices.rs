//! The closed choices of a config, as enums: serde reads each once, and an unknown value is an
//! error naming the key, the value and the allowed ones.

use crate::dpo::LossKind;
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// Compute dtype of the forward passes (`model.dtype`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    #[default]
    Bf16,
    F16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    pub fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }
}

/// Storage dtype of a part of the training state: the gradients and AdamW moments
/// (`train.state_dtype`) or the master weights (`train.master_dtype`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    /// torch's AdamW.
    #[default]
    F32,
    /// Half the memory; moments and weights rounded stochastically.
    Bf16,
}

impl StateDtype {
    pub fn candle(self) -> DType {
        match self {
            StateDtype::F32 => DType::F32,
            StateDtype::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StateDtype::F32 => "f32",
            StateDtype::Bf16 => "bf16",
        }
    }
}

/// The optimizer (`train.optim`), by transformers' names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Optim {
    /// torch's AdamW (`adamw_torch_fused` computes the same).
    #[default]
    #[serde(rename = "adamw_torch", alias = "adamw_torch_fused")]
    AdamwTorch,
    /// bitsandbytes' `AdamW8bit` (transformers' `adamw_bnb_8bit`): the moments of tensors of
    /// 4,096 elements or more, the embedding's aside, blockwise in 8 bits.
    #[serde(rename = "adamw_8bit", alias = "adamw_bnb_8bit")]
    Adamw8bit,
}

/// Where training logs go besides `metrics.jsonl` (`train.report_to`, TRL's name).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// Event files under `<train.out>/runs/`.
    Tensorboard,
}

/// The learning-rate schedule (`train.lr_schedule`), transformers' by name: each after a linear
/// warmup over `warmup_ratio` of the steps, except `constant`, which (as transformers') has none.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    #[serde(rename = "constant_with_warmup")]
    ConstantWithWarmup,
    Linear,
    #[default]
    Cosine,
}

/// Where the reference log-probs come from (`train.ref`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RefMode {
    /// The stage-one cache (memory-mapped): no reference model in memory.
    #[default]
    Cached,
    /// Load the reference model and run it every step (the baseline for comparisons).
    Live,
}

/// How prompt + completion are cut to `max_length`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the start of prompt + completion: cut completion tokens from the end.
    #[default]
    KeepStart,
    /// Keep the end: cut prompt tokens from the start.
    KeepEnd,
}

impl Truncation {
    pub fn as_str(self) -> &'static str {
        match self {
            Truncation::KeepStart => "keep_start",
            Truncation::KeepEnd => "keep_end",
        }
    }
}

/// A chat role a source role maps to (`dataset.roles`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    System,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Tool => "tool",
        }
    }
}

/// `train.loss`: one TRL `loss_type`, or a list of them mixed with `train.loss_weights`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Losses(pub Vec<LossKind>);

impl Default for Losses {
    fn default() -> Self {
        Self(vec![LossKind::default()])
    }
}

impl Losses {
    /// The first (or only) loss: it names the rewards.
    pub fn first(&self) -> LossKind {
        self.0.first().copied().unwrap_or_default()
    }
}

impl Serialize for Losses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Losses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = Losses;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a loss type or a list of loss types")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Losses, E> {
                let kind = LossKind::deserialize(serde::de::value::StrDeserializer::<E>::new(v))?;
                Ok(Losses(vec![kind]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Losses, A::Error> {
                let mut kinds = Vec::new();
                while let Some(k) = seq.next_element::<LossKind>()? {
                    kinds.push(k);
                }
                Ok(Losses(kinds))
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

/// The projections an adapter can target, under their HF names (Phi-3's fused ones included).
pub const PROJECTIONS: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
];

/// `train.lora.target_modules`: PEFT's `"all-linear"` (every projection of the decoder layers,
/// not `lm_head`) or a list of projection names (`q_proj`, `gate_up_proj`, …).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TargetModules {
    #[default]
    AllLinear,
    Names(Vec<String>),
}

impl TargetModules {
    /// Whether the projection `name` (e.g. `q_proj`) is adapted.
    pub fn includes(&self, name: &str) -> bool {
        match self {
            TargetModules::AllLinear => true,
            TargetModules::Names(names) => names.iter().any(|n| n == name),
        }
    }
}

impl Serialize for TargetModules {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::AllLinear => s.serialize_str("all-linear"),
            TargetModules::Names(names) => names.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d)? {
            // PEFT compares the shorthand without case
            Raw::One(s) if s.eq_ignore_ascii_case("all-linear") => Ok(TargetModules::AllLinear),
            // PEFT reads any other string as a regular expression that must match a module's
            // whole name (`model.layers.0.self_attn.q_proj`), which refdpo does not take
            Raw::One(s) => Err(serde::de::Error::custom(format!(
                "{s:?} is a string other than \"all-linear\", which PEFT reads as a regular \
                 expression over whole module names (\"q_proj\" alone matches none of them); \
                 refdpo takes a list of projections instead: write [\"q_proj\", …], or \
                 \"all-linear\""
            ))),
            Raw::Many(names) => Ok(TargetModules::Names(names)),
        }
    }
}

/// `precompute.shard = "i/n"`: this process scores shard i (0-based) of n, a contiguous range of
/// each split's rows; "0/1" (the default) is the whole split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Shard {
    pub fn is_whole(self) -> bool {
        self.count == 1
    }

    /// This shard's part `start..end` of `n` items (stage one's scoring chunks): shard i holds
    /// ⌊i·n/count⌋ up to ⌊(i+1)·n/count⌋.
    pub fn range(self, n: usize) -> std::ops::Range<usize> {
        // in u128: i·n overflows usize for a shard count near usize::MAX
        let at = |i: usize| (i as u128 * n as u128 / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }

    /// The most shards a split may be scored in: far more than any cluster's jobs, and few enough
    /// that a reader listing a split's shards stays small.
    pub const MAX_COUNT: usize = 65_536;

    /// Parses "i/n" with 0 <= i < n <= [`Self::MAX_COUNT`].
    pub fn parse(s: &str) -> Result<Self, String> {
        let parsed = s.split_once('/').and_then(|(i, n)| {
            Some(Self {
                index: i.trim().parse().ok()?,
                count: n.trim().parse().ok()?,
            })
        });
        match parsed {
            Some(sh) if sh.count > Self::MAX_COUNT => Err(format!(
                "shard `{s}` is one of {} shards, more than {}: score the split in fewer",
                sh.count,
                Self::MAX_COUNT
            )),
            Some(sh) if sh.count >= 1 && sh.index < sh.count => Ok(sh),
            _ => Err(format!(
                "shard `{s}` is not \"i/n\" with 0 <= i < n (e.g. \"0/4\" for the first of four)"
            )),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Serialize for Shard {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Shard {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Shard::parse(&s).map_err(serde::de::Error::custom)
    }
}
