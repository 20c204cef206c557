//! 8-bit AdamW moments as bitsandbytes stores them (`AdamW8bit`, transformers' `optim =
//! "adamw_8bit"`): each block of 256 consecutive values as one f32 absmax and 256 one-byte
//! indices into a fixed 256-value map (`create_dynamic_map`: signed for the first moment,
//! unsigned for the second), each value the map entry nearest to value / absmax.
//!
//! Composed candle ops only, so the CPU runs the very code a GPU runs. The nearest entry is found
//! by a binary search over the midpoints between entries, as bitsandbytes' `bucketize` does: a
//! value on a midpoint takes the lower entry.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Values per absmax (bitsandbytes' `blocksize` for its 8-bit optimizers).
pub const BLOCK: usize = 256;

/// Tensors below this many elements keep moments in the state dtype (bitsandbytes'
/// `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' `create_dynamic_map(signed)` (7 exponent bits, 8 bits in all), ascending: for
/// each decade 10^-6 … 10^0, the midpoints of an f32 `linspace(0.1, 1, k)` scaled by it (twice as
/// many per decade without a sign), then 0 and 1.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let k = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let edges = linspace(0.1, 1.0, k);
        // Python's 10 ** (i − 6), rounded to f32 as torch's scalar product does
        let scale = format!("1e{}", i - 6).parse::<f64>().unwrap_or(1.0) as f32;
        for w in edges.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch's f32 `linspace` on the CPU: the first half counted up from `start`, the rest down from
/// `end`, each value one fused multiply-add (as torch's compiled kernel computes it; separate
/// roundings differ in the last bit for 9 values or more).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// One map on a device: its values (for dequantizing) and the midpoints between them, padded with
/// +∞ to 256 (for the binary search).
pub struct Map {
    values: Tensor,
    bounds: Tensor,
    host: [f32; 256],
    host_bounds: Vec<f32>,
}

impl Map {
    pub fn new(signed: bool, device: &Device) -> Result<Self> {
        let map = dynamic_map(signed);
        let mut bounds: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        bounds.push(f32::INFINITY);
        Ok(Self {
            values: Tensor::new(&map[..], device)?,
            bounds: Tensor::new(bounds.as_slice(), device)?,
            host: map,
            host_bounds: bounds,
        })
    }

    /// The map's values [256] f32, on its device.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// The midpoints between neighbouring values, then +∞: [256] f32, on the map's device.
    pub fn bounds(&self) -> &Tensor {
        &self.bounds
    }

    /// The map's values, on the host.
    pub fn host(&self) -> &[f32; 256] {
        &self.host
    }

    /// The index of the entry nearest to `x` (in [−1, 1]), on the host: what [`Map::nearest`]
    /// computes, the number of midpoints below `x`.
    pub fn nearest_host(&self, x: f32) -> u8 {
        self.host_bounds[..255].partition_point(|&b| b < x) as u8
    }

    /// The index of the entry nearest to each of `x` (f32, in [−1, 1]): the number of midpoints
    /// below it, found in 8 halvings.
    fn nearest(&self, x: &Tensor) -> Result<Tensor> {
        let mut idx = x.zeros_like()?;
        for half in [128u32, 64, 32, 16, 8, 4, 2, 1] {
            let probe = (&idx + f64::from(half - 1))?.to_dtype(DType::U32)?;
            let below = self.bounds.index_select(&probe, 0)?.lt(x)?;
            idx = (idx + (below.to_dtype(DType::F32)? * f64::from(half))?)?;
        }
        Ok(idx.to_dtype(DType::U8)?)
    }
}

/// Values stored blockwise in 8 bits: `codes` [n] (u8) and `absmax` [ceil(n / 256)] (f32).
#[derive(Clone)]
pub struct Blockwise {
    pub codes: Tensor,
    pub absmax: Tensor,
}

/// Blocks covering `n` values.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

impl Blockwise {
    /// `n` zeros (bitsandbytes' initial state: code 0, absmax 0).
    pub fn zeros(n: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            codes: Tensor::zeros(n, DType::U8, device)?,
            absmax: Tensor::zeros(blocks(n), DType::F32, device)?,
        })
    }

    pub fn len(&self) -> usize {
        self.codes.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.absmax.elem_count()
    }

    /// Values `start .. start + len` (`start` a multiple of [`BLOCK`]), stored as they come.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let b0 = start / BLOCK;
        Ok(Self {
            codes: self.codes.narrow(0, start, len)?,
            absmax: self.absmax.narrow(0, b0, blocks(len))?,
        })
    }

    /// Writes `part` over values `start ..` (`start` a multiple of [`BLOCK`]) in place.
    pub fn write(&self, part: &Blockwise, start: usize) -> Result<()> {
        self.codes.slice_set(&part.codes, 0, start)?;
        self.absmax.slice_set(&part.absmax, 0, start / BLOCK)?;
        Ok(())
    }

    /// The values in f32: map[code] · absmax of its block.
    pub fn dequantize(&self, map: &Map) -> Result<Tensor> {
        let n = self.len();
        let padded = blocks(n) * BLOCK;
        let codes = pad(&self.codes.to_dtype(DType::U32)?, padded)?;
        let values = map
            .values
            .index_select(&codes, 0)?
            .reshape((blocks(n), BLOCK))?;
        let values = values.broadcast_mul(&self.absmax.unsqueeze(1)?)?;
        Ok(values.flatten_all()?.narrow(0, 0, n)?)
    }

    /// `x` (f32, [n]) stored blockwise: each block's absmax, and each value's nearest map entry
    /// to value · (1 / absmax), clamped to [−1, 1] (bitsandbytes' `quantize_blockwise`).
    pub fn quantize(x: &Tensor, map: &Map) -> Result<Self> {
        let n = x.elem_count();
        let x = pad(x, blocks(n) * BLOCK)?.reshape((blocks(n), BLOCK))?;
        let absmax = x.abs()?.max_keepdim(1)?;
        let inv = absmax.maximum(1e-38)?.recip()?;
        let scaled = x.broadcast_mul(&inv)?.clamp(-1f32, 1f32)?.flatten_all()?;
        let codes = map.nearest(&scaled)?.narrow(0, 0, n)?;
        Ok(Self {
            codes,
            absmax: absmax.flatten_all()?,
        })
    }
}

/// `x` [n] followed by zeros up to `len`.
fn pad(x: &Tensor, len: usize) -> Result<Tensor> {
    let n = x.elem_count();
    if n == len {
        return Ok(x.clone());
    }
    let zeros = Tensor::zeros(len - n, x.dtype(), x.device())?;
    Ok(Tensor::cat(&[x, &zeros], 0)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// tests/fixtures/adamw8bit/bnb.json (made by tests/fixtures/gen_adamw8bit_fixtures.py).
    pub(crate) fn fixture() -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/adamw8bit/bnb.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    pub(crate) fn f32s(v: &serde_json::Value) -> Vec<f32> {
        let a = v.as_array().unwrap();
        a.iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    /// The fixture's exact-in-f32 ramp: ((i·mult + add) mod 2001 − 1000) / 1000.
    pub(crate) fn ramp(i: usize, mult: usize, add: usize) -> f32 {
        ((i * mult + add) % 2001) as f32 - 1000.0
    }

    /// The fixture's gradient of step `t` over `n` values (its `grad`).
    pub(crate) fn fixture_grad(t: usize, n: usize, scales: &[f32]) -> Vec<f32> {
        (0..n)
            .map(|i| ramp(i, 7919, 104_729 * t) / 1000.0 * scales[(i / BLOCK) % scales.len()])
            .collect()
    }

    /// Both maps equal bitsandbytes' `create_dynamic_map` bit for bit.
    #[test]
    fn the_maps_are_bitsandbytes() {
        let fx = fixture();
        for (signed, key) in [(true, "signed"), (false, "unsigned")] {
            assert_eq!(
                dynamic_map(signed).to_vec(),
                f32s(&fx["maps"][key]),
                "{key}"
            );
        }
    }

    /// Values of four scales (one block of zeros' neighbour scales, a short last block): the
    /// codes and absmax of bitsandbytes' reference `quantize_blockwise`, exactly.
    #[test]
    fn quantizing_equals_bitsandbytes() {
        let fx = &fixture()["quantize"];
        let n = fx["n"].as_u64().unwrap() as usize;
        let t = fx["step"].as_u64().unwrap() as usize;
        let scales = f32s(&fixture()["adamw"]["scales"]);
        let x = Tensor::new(fixture_grad(t, n, &scales).as_slice(), &Device::Cpu).unwrap();
        let q = Blockwise::quantize(&x, &Map::new(true, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(q.absmax.to_vec1::<f32>().unwrap(), f32s(&fx["absmax"]));
        let want: Vec<u8> = f32s(&fx["codes"]).iter().map(|&c| c as u8).collect();
        assert_eq!(q.codes.to_vec1::<u8>().unwrap(), want);
    }

    #[test]
    fn the_maps_hold_256_ascending_values_with_0_and_1() {
        for signed in [true, false] {
            let m = dynamic_map(signed);
            assert!(m.windows(2).all(|w| w[0] <= w[1]), "{signed}");
            assert_eq!(m[255], 1.0);
            assert!(m.contains(&0.0));
            if signed {
                assert!(m[0] < -0.99 && m[0] > -1.0, "{}", m[0]);
            } else {
                assert_eq!(m[0], 0.0);
            }
        }
    }

    /// Every map entry, scaled by a block's absmax, comes back as itself; values between two
    /// entries take the nearer one; a midpoint takes the lower.
    #[test]
    fn quantizing_picks_the_nearest_entry() {
        let dev = Device::Cpu;
        let map = Map::new(true, &dev).unwrap();
        let m = dynamic_map(true);
        // one block of the entries themselves (the block's absmax is 1)
        let x = Tensor::new(&m[..], &dev).unwrap();
        let q = Blockwise::quantize(&x, &map).unwrap();
        let codes = q.codes.to_vec1::<u8>().unwrap();
        for (i, &c) in codes.iter().enumerate() {
            assert_eq!(m[c as usize], m[i], "entry {i}");
        }
        // between entries 200 and 201: a quarter of the way goes down, three quarters up, the
        // midpoint down; the block's absmax is held at 1 by a last value of 1
        let (a, b) = (m[200], m[201]);
        let mid = (a + b) / 2.0;
        let x = Tensor::new(
            &[a + (b - a) / 4.0, a + 3.0 * (b - a) / 4.0, mid, 1.0],
            &dev,
        )
        .unwrap();
        let q = Blockwise::quantize(&x, &map).unwrap();
        assert_eq!(q.codes.to_vec1::<u8>().unwrap(), vec![200, 201, 200, 255]);
        let back = q.dequantize(&map).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, vec![a, b, a, 1.0]);
    }

    /// A length off the block size, blocks of their own scale, and the zeros a block of zeros
    /// stores; the round trip is within half the largest gap between entries of each absmax.
    #[test]
    fn blockwise_round_trip_keeps_each_blocks_scale() {
        let dev = Device::Cpu;
        let map = Map::new(true, &dev).unwrap();
        let n = 3 * BLOCK + 17;
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                let scale = [1e-6f32, 3.0, 0.0, 1e-2][i / BLOCK];
                scale * ((i * 7919 % 1000) as f32 / 500.0 - 1.0)
            })
            .collect();
        let x = Tensor::new(vals.as_slice(), &dev).unwrap();
        let q = Blockwise::quantize(&x, &map).unwrap();
        assert_eq!(q.absmax.dims(), &[4]);
        let absmax = q.absmax.to_vec1::<f32>().unwrap();
        assert_eq!(absmax[2], 0.0);
        let back = q.dequantize(&map).unwrap().to_vec1::<f32>().unwrap();
        let gap = dynamic_map(true)
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max);
        for (i, (&v, &b)) in vals.iter().zip(&back).enumerate() {
            let tol = absmax[i / BLOCK] * gap / 2.0 * 1.0001;
            assert!((v - b).abs() <= tol, "{i}: {v} → {b} (tolerance {tol})");
        }
        // a slice written back in place
        let part = q.narrow(BLOCK, BLOCK).unwrap();
        let z = Blockwise::zeros(n, &dev).unwrap();
        z.write(&part, BLOCK).unwrap();
        assert_eq!(
            z.codes
                .narrow(0, BLOCK, BLOCK)
                .unwrap()
                .to_vec1::<u8>()
                .unwrap(),
            q.codes
                .narrow(0, BLOCK, BLOCK)
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
        );
        assert_eq!(z.absmax.to_vec1::<f32>().unwrap()[1], absmax[1]);
    }
}
