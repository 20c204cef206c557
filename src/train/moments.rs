//! AdamW's moments for one trained tensor, as they are kept and checkpointed: dense in the state
//! dtype (torch's `exp_avg` / `exp_avg_sq`), or blockwise 8-bit (bitsandbytes' `AdamW8bit`,
//! `train.optim = "adamw_8bit"`).

use super::quant8::{self, Blockwise, Map};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The first and second moments of one tensor.
pub enum Moments {
    Dense { m: Tensor, v: Tensor },
    Blockwise { m: Blockwise, v: Blockwise },
}

/// The two 8-bit maps: signed for the first moment, unsigned for the second (bitsandbytes'
/// `dynamic` and `udynamic`).
pub struct Maps {
    pub m: Map,
    pub v: Map,
    /// Both maps' values and midpoints as the fused step reads them: [2, 256] f32 each.
    tables: (Tensor, Tensor),
}

impl Maps {
    pub fn new(device: &Device) -> Result<Self> {
        let (m, v) = (Map::new(true, device)?, Map::new(false, device)?);
        let tables = (
            Tensor::stack(&[m.values(), v.values()], 0)?,
            Tensor::stack(&[m.bounds(), v.bounds()], 0)?,
        );
        Ok(Self { m, v, tables })
    }

    /// (values, midpoints padded with +∞): [2, 256] f32 each, the signed map's first.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.tables.0, &self.tables.1)
    }
}

/// Which storage a tensor's moments take under `eight_bit` (transformers with bitsandbytes keeps
/// the embedding's and tensors under 4,096 elements in 32 bits).
pub fn takes_8bit(eight_bit: bool, name: &str, elems: usize) -> bool {
    eight_bit && elems >= quant8::MIN_8BIT_SIZE && name != "model.embed_tokens.weight"
}

impl Moments {
    /// Zero moments for a tensor of `shape`: 8-bit, or dense in `dtype`.
    pub fn zeros(
        shape: &candle_core::Shape,
        eight_bit: bool,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Ok(if eight_bit {
            let n = shape.elem_count();
            Moments::Blockwise {
                m: Blockwise::zeros(n, dev)?,
                v: Blockwise::zeros(n, dev)?,
            }
        } else {
            Moments::Dense {
                m: Tensor::zeros(shape, dtype, dev)?,
                v: Tensor::zeros(shape, dtype, dev)?,
            }
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            Moments::Dense { m, v } => {
                (m.elem_count() + v.elem_count()) * m.dtype().size_in_bytes()
            }
            Moments::Blockwise { m, v } => m.bytes() + v.bytes(),
        }
    }

    /// The dense moments, if these are.
    pub fn dense(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Moments::Dense { m, v } => Some((m, v)),
            Moments::Blockwise { .. } => None,
        }
    }
}

/// Writes every tensor's moments and the step as safetensors: dense moments as `m.<name>` and
/// `v.<name>` in their dtype; 8-bit ones as the codes (u8, the weight's shape) under the same
/// names, with `m_absmax.<name>` and `v_absmax.<name>` (f32, one per block of 256).
pub fn save(
    moments: &[Moments],
    names: &[String],
    shapes: &[&[usize]],
    step: u64,
    path: &Path,
) -> Result<()> {
    let mut t = HashMap::new();
    for ((mo, name), shape) in moments.iter().zip(names).zip(shapes) {
        match mo {
            Moments::Dense { m, v } => {
                t.insert(format!("m.{name}"), m.clone());
                t.insert(format!("v.{name}"), v.clone());
            }
            Moments::Blockwise { m, v } => {
                for (which, q) in [("m", m), ("v", v)] {
                    t.insert(format!("{which}.{name}"), q.codes.reshape(*shape)?);
                    t.insert(format!("{which}_absmax.{name}"), q.absmax.clone());
                }
            }
        }
    }
    t.insert("step".into(), Tensor::new(&[step as f64], &Device::Cpu)?);
    crate::model::weights::save(&t, path)
}

/// Reads what [`save`] wrote into `moments` (whose kinds say how each is kept: a checkpoint of the
/// other kind is converted, as after a change of `train.optim`), and returns the step.
pub fn load(
    moments: &mut [Moments],
    maps: &Maps,
    names: &[String],
    shapes: &[&[usize]],
    path: &Path,
) -> Result<u64> {
    let dev = match moments.first() {
        Some(Moments::Dense { m, .. }) => m.device().clone(),
        Some(Moments::Blockwise { m, .. }) => m.codes.device().clone(),
        None => Device::Cpu,
    };
    let t = crate::model::weights::load(&[path.to_path_buf()], DType::F32, &dev)?;
    // the stored dtypes (the tensors above are all read as f32): codes are u8, moments floats
    let header = crate::model::weights::read_header(path)?;
    let is_u8 = |k: &str| {
        header
            .tensors
            .iter()
            .any(|t| t.name == k && t.dtype == "U8")
    };
    let damaged = |what: String| {
        Error::Train(format!(
            "optimizer state `{}` {what}: the checkpoint is damaged or from another model",
            path.display()
        ))
    };
    let get = |k: &str| {
        t.get(k).cloned().ok_or_else(|| {
            Error::Train(format!("optimizer state `{}` lacks `{k}`", path.display()))
        })
    };
    for ((slot, name), shape) in moments.iter_mut().zip(names).zip(shapes) {
        let n: usize = shape.iter().product();
        let read = |which: &str| -> Result<Stored> {
            let key = format!("{which}.{name}");
            let values = get(&key)?;
            if values.dims() != *shape {
                return Err(damaged(format!(
                    "holds `{key}` of shape {:?} for weights of shape {shape:?}",
                    values.dims()
                )));
            }
            let absmax_key = format!("{which}_absmax.{name}");
            let absmax = match (t.get(&absmax_key), is_u8(&key)) {
                (None, false) => {
                    let min = values.flatten_all()?.min(0)?.to_scalar::<f32>()?;
                    if which == "v" && min < 0.0 {
                        return Err(damaged(format!(
                            "holds `{key}` with a negative value ({min}), where a second moment \
                             is a mean of squares"
                        )));
                    }
                    return Ok(Stored::Dense(values));
                }
                (Some(absmax), true) => absmax,
                (None, true) => {
                    return Err(damaged(format!(
                        "holds 8-bit codes `{key}` without `{absmax_key}`"
                    )))
                }
                (Some(_), false) => {
                    return Err(damaged(format!(
                        "holds `{absmax_key}` beside `{key}`, which is not 8-bit codes"
                    )))
                }
            };
            if absmax.dims() != [quant8::blocks(n)] {
                return Err(damaged(format!(
                    "holds `{which}_absmax.{name}` of shape {:?}, not [{}] (one per 256 values)",
                    absmax.dims(),
                    quant8::blocks(n)
                )));
            }
            let codes = values.flatten_all()?;
            let off_grid = (&codes - codes.round()?)?
                .abs()?
                .max(0)?
                .to_scalar::<f32>()?;
            let (lo, hi) = (
                codes.min(0)?.to_scalar::<f32>()?,
                codes.max(0)?.to_scalar::<f32>()?,
            );
            let amin = absmax.min(0)?.to_scalar::<f32>()?;
            // u8 codes are in range; the check guards the f32 reading of them
            if off_grid != 0.0 || lo < 0.0 || hi > 255.0 || amin < 0.0 {
                return Err(damaged(format!(
                    "holds 8-bit `{key}` with codes in [{lo}, {hi}] (not all whole numbers in \
                     0..=255) or a negative absmax ({amin})"
                )));
            }
            Ok(Stored::Blockwise(Blockwise {
                codes: codes.to_dtype(DType::U8)?,
                absmax: absmax.clone(),
            }))
        };
        let (m, v) = (read("m")?, read("v")?);
        *slot = match slot {
            Moments::Dense { m: m0, .. } => Moments::Dense {
                m: m.dense(&maps.m, shape, m0.dtype())?,
                v: v.dense(&maps.v, shape, m0.dtype())?,
            },
            Moments::Blockwise { .. } => Moments::Blockwise {
                m: m.blockwise(&maps.m)?,
                v: v.blockwise(&maps.v)?,
            },
        };
    }
    let step = get("step")?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    match step[..] {
        // an integer below 2^53, as written
        [s] if s >= 0.0 && s.fract() == 0.0 && s < 9.007e15 => Ok(s as u64),
        _ => Err(Error::Train(format!(
            "optimizer state `{}`: `step` is {step:?}, not one count of steps: the checkpoint is \
             damaged",
            path.display()
        ))),
    }
}

/// A moment as read from a checkpoint, before it takes the kind the run keeps.
enum Stored {
    Dense(Tensor),
    Blockwise(Blockwise),
}

impl Stored {
    fn dense(self, map: &Map, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = match self {
            Stored::Dense(t) => t,
            Stored::Blockwise(q) => q.dequantize(map)?.reshape(shape)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn blockwise(self, map: &Map) -> Result<Blockwise> {
        match self {
            Stored::Blockwise(q) => Ok(q),
            Stored::Dense(t) => Blockwise::quantize(&t.flatten_all()?, map),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8-bit and dense moments come back as saved, each converted when the run keeps the other
    /// kind; damaged 8-bit state is refused by key.
    #[test]
    fn moments_round_trip_convert_and_refuse_damage() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let maps = Maps::new(&dev).unwrap();
        let names = vec!["a".to_string(), "b".to_string()];
        let shapes: Vec<&[usize]> = vec![&[20, 300], &[3]];
        let x = Tensor::arange(0f32, 6000.0, &dev).unwrap();
        let x = ((x / 6000.0).unwrap() - 0.3).unwrap();
        let saved = vec![
            Moments::Blockwise {
                m: Blockwise::quantize(&x, &maps.m).unwrap(),
                v: Blockwise::quantize(&x.abs().unwrap(), &maps.v).unwrap(),
            },
            Moments::zeros(&3usize.into(), false, DType::F32, &dev).unwrap(),
        ];
        save(&saved, &names, &shapes, 7, &path).unwrap();
        let fresh = |eight_bit: bool| -> Vec<Moments> {
            shapes
                .iter()
                .map(|s| {
                    let s: candle_core::Shape = s.to_vec().into();
                    let q8 = eight_bit && s.elem_count() >= 4096;
                    Moments::zeros(&s, q8, DType::F32, &dev).unwrap()
                })
                .collect()
        };
        let mut back = fresh(true);
        assert_eq!(load(&mut back, &maps, &names, &shapes, &path).unwrap(), 7);
        let (Moments::Blockwise { m, .. }, Moments::Blockwise { m: m0, .. }) =
            (&back[0], &saved[0])
        else {
            panic!("8-bit expected")
        };
        assert_eq!(
            m.codes.to_vec1::<u8>().unwrap(),
            m0.codes.to_vec1::<u8>().unwrap()
        );
        // a run with dense moments reads the 8-bit ones as their values
        let mut dense = fresh(false);
        load(&mut dense, &maps, &names, &shapes, &path).unwrap();
        let (m, _) = dense[0].dense().unwrap();
        let want = m0.dequantize(&maps.m).unwrap().reshape((20, 300)).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(m, &want), 0.0);

        // damage: codes without their absmax, float codes, a negative absmax, an absmax of the
        // wrong length (the file read back as f32, its codes stored as u8 again)
        let mut t =
            crate::model::weights::load(std::slice::from_ref(&path), DType::F32, &dev).unwrap();
        for k in ["m.a", "v.a"] {
            let codes = t[k].to_dtype(DType::U8).unwrap();
            t.insert(k.to_string(), codes);
        }
        let mut lacking = t.clone();
        lacking.remove("v_absmax.a");
        let damaged = dir.path().join("lacking.safetensors");
        crate::model::weights::save(&lacking, &damaged).unwrap();
        let err = load(&mut fresh(true), &maps, &names, &shapes, &damaged)
            .map(|_| ())
            .expect_err("codes without their absmax refused")
            .to_string();
        assert!(err.contains("without `v_absmax.a`"), "{err}");
        for (key, bad, want) in [
            (
                "m.a",
                Tensor::full(2.5f32, (20, 300), &dev).unwrap(),
                "not 8-bit codes",
            ),
            (
                "v_absmax.a",
                Tensor::full(-1f32, 24, &dev).unwrap(),
                "negative absmax",
            ),
            (
                "m_absmax.a",
                Tensor::zeros(5, DType::F32, &dev).unwrap(),
                "not [24]",
            ),
        ] {
            let mut t = t.clone();
            t.insert(key.to_string(), bad);
            let damaged = dir.path().join("damaged.safetensors");
            crate::model::weights::save(&t, &damaged).unwrap();
            let err = load(&mut fresh(true), &maps, &names, &shapes, &damaged)
                .map(|_| ())
                .expect_err("damage refused")
                .to_string();
            assert!(
                err.contains(want) && err.contains("damaged"),
                "{key}: {err}"
            );
        }
    }
}
