//! In-place accumulation of a gradient: acc += g, the sum taken in f32 and stored in the
//! accumulator's dtype (f32, or bf16 for `state_dtype = "bf16"`), with no new tensor.

#[cfg(feature = "cuda")]
use super::elem::with_float;
use super::elem::{slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result};

const NAME: &str = "accumulate";

/// acc (any float dtype) += g (f32), in place.
#[derive(Debug, Clone, Copy)]
pub struct Accumulate;

fn check(acc: &Layout, g: &Layout, g_dtype: DType) -> Result<()> {
    if g_dtype != DType::F32 || acc.shape() != g.shape() {
        return Err(candle_core::Error::Msg(format!(
            "fused {NAME}: expected an f32 addend of the accumulator's shape {:?}, got {g_dtype:?} {:?}",
            acc.dims(),
            g.dims()
        )));
    }
    Ok(())
}

/// Calls `$f` (a closure, generic in the element type) on elements `$range` of the CPU storage
/// `$acc`, a slice of its float type.
macro_rules! on_floats {
    ($acc:expr, $range:expr, $name:expr, $f:expr) => {
        match $acc {
            CpuStorage::F32(v) => $f(&mut v[$range]),
            CpuStorage::BF16(v) => $f(&mut v[$range]),
            CpuStorage::F16(v) => $f(&mut v[$range]),
            other => return Err(super::elem::unsupported($name, other.dtype())),
        }
    };
}

fn add_into<T: Elem>(acc: &mut [T], g: &[f32]) {
    for (a, g) in acc.iter_mut().zip(g) {
        *a = T::of(a.f() + g);
    }
}

impl InplaceOp2 for Accumulate {
    fn name(&self) -> &'static str {
        "refdpo-accumulate"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        al: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        check(al, gl, g.dtype())?;
        let (a, b) = super::elem::offsets(NAME, al)?;
        let g = slice::<f32>(NAME, g, gl)?;
        on_floats!(acc, a..b, NAME, |v| add_into(v, g));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        use super::launch::{count, elementwise, launch_in_place, view};
        check(al, gl, g.dtype())?;
        let n = al.shape().elem_count();
        let nu = count(NAME, n)?;
        let (a, b) = super::elem::offsets(NAME, al)?;
        let dev = acc.device.clone();
        let kernel = format!("accumulate_{}", acc.dtype().as_str());
        let gv = view::<f32>(NAME, g, gl)?;
        with_float!(acc.dtype(), NAME, T => {
            let mut av = acc.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
            launch_in_place!(&dev, kernel, elementwise(n); &mut av, &gv, &nu);
            Ok(())
        })
    }
}

/// An embedding's gradient added into its table in place: the rows of g [n, h] (f32) of each
/// distinct token summed in f32 (in row order) and added into that token's table row, rounded
/// once to the table's dtype (`kernels.cu`'s `embed_grad`, one block per token).
#[derive(Debug, Clone)]
pub struct EmbedGrad {
    /// g's rows grouped by token, each group in row order.
    pub order: Vec<u32>,
    /// Where each token's rows begin in `order` (one more entry than tokens).
    pub starts: Vec<u32>,
    /// The table row of each token.
    pub tokens: Vec<u32>,
}

const EMBED: &str = "embedding gradient";

impl EmbedGrad {
    /// The grouping of rows `ids` (a row whose id is `skip` adds nothing), tokens ascending.
    pub fn of(ids: &[u32], skip: Option<u32>) -> Self {
        let mut order: Vec<u32> = (0..ids.len() as u32)
            .filter(|&r| Some(ids[r as usize]) != skip)
            .collect();
        order.sort_by_key(|&r| ids[r as usize]); // stable: row order within a token
        let (mut starts, mut tokens) = (Vec::new(), Vec::new());
        for (at, &r) in order.iter().enumerate() {
            let id = ids[r as usize];
            if tokens.last() != Some(&id) {
                tokens.push(id);
                starts.push(at as u32);
            }
        }
        starts.push(order.len() as u32);
        Self {
            order,
            starts,
            tokens,
        }
    }

    /// Refuses rows or tokens outside the tensors (the kernel would read or write past them).
    fn check(&self, table: &Layout, g: &Layout, g_dtype: DType) -> Result<usize> {
        let (v, n, h) = match (table.dims(), g.dims()) {
            (&[v, h], &[n, hg]) if h == hg && g_dtype == DType::F32 => (v, n, h),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "fused {EMBED}: table {:?} and f32 rows of its width expected, got {g_dtype:?} {:?}",
                    table.dims(),
                    g.dims()
                )))
            }
        };
        let bad = self.tokens.iter().any(|&t| t as usize >= v)
            || self.order.iter().any(|&r| r as usize >= n)
            || self.starts.len() != self.tokens.len() + 1;
        // each token once (its row is written by one block), each group within `order`
        let malformed = self.tokens.windows(2).any(|w| w[0] >= w[1])
            || self.starts.windows(2).any(|w| w[0] > w[1])
            || self
                .starts
                .last()
                .is_some_and(|&e| e as usize > self.order.len());
        if bad || malformed {
            return Err(candle_core::Error::Msg(format!(
                "fused {EMBED}: a token or row outside the table's {v} rows or g's {n}, or \
                 tokens not distinct and ascending"
            )));
        }
        Ok(h)
    }
}

fn embed_into<T: Elem + Send>(table: &mut [T], g: &[f32], op: &EmbedGrad, h: usize) {
    use rayon::prelude::*;
    // each token's row of the table is its own: the tokens ascend (checked), so each row is
    // carved off the rest of the table in turn, with nothing allocated per table row
    let mut mine: Vec<(usize, &mut [T])> = Vec::with_capacity(op.tokens.len());
    let (mut rest, mut at) = (table, 0);
    for (u, &t) in op.tokens.iter().enumerate() {
        let (_, from) = rest.split_at_mut((t as usize - at) * h);
        let (row, after) = from.split_at_mut(h);
        mine.push((u, row));
        (rest, at) = (after, t as usize + 1);
    }
    mine.into_par_iter().for_each(|(u, row)| {
        let group = &op.order[op.starts[u] as usize..op.starts[u + 1] as usize];
        for (j, a) in row.iter_mut().enumerate() {
            let mut sum = 0f32;
            for &r in group {
                sum += g[r as usize * h + j];
            }
            *a = T::of(a.f() + sum);
        }
    });
}

impl InplaceOp2 for EmbedGrad {
    fn name(&self) -> &'static str {
        "refdpo-embed-grad"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        al: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let h = self.check(al, gl, g.dtype())?;
        let (a, b) = super::elem::offsets(EMBED, al)?;
        let g = slice::<f32>(EMBED, g, gl)?;
        on_floats!(acc, a..b, EMBED, |v| embed_into(v, g, self, h));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        use super::launch::{launch_in_place, per_row, view};
        let h = self.check(al, gl, g.dtype())?;
        if self.tokens.is_empty() {
            return Ok(());
        }
        // the kernel indexes rows in 64 bits: a table past 2^31 elements is fine; h is u32
        let hu = u32::try_from(h)
            .map_err(|_| candle_core::Error::Msg(format!("fused {EMBED}: rows of {h}")))?;
        let (a, b) = super::elem::offsets(EMBED, al)?;
        let dev = acc.device.clone();
        let kernel = format!("embed_grad_{}", acc.dtype().as_str());
        let gv = view::<f32>(EMBED, g, gl)?;
        let order = dev.clone_htod(&self.order)?;
        let starts = dev.clone_htod(&self.starts)?;
        let tokens = dev.clone_htod(&self.tokens)?;
        let cfg = per_row(self.tokens.len(), h);
        with_float!(acc.dtype(), EMBED, T => {
            let mut av = acc.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
            launch_in_place!(&dev, kernel, cfg; &mut av, &gv, &order, &starts, &tokens, &hu);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn adds_in_place_in_f32_and_rounds_once() {
        let dev = Device::Cpu;
        let acc = Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
        let g = Tensor::new(&[0.5f32, -2.0, 1e-3], &dev).unwrap();
        acc.inplace_op2(&g, &Accumulate).unwrap();
        assert_eq!(acc.to_vec1::<f32>().unwrap(), vec![1.5, 0.0, 3.001]);
        // bf16: 256 + 1 is not representable, 256 + 2 is; the sum is rounded once
        let acc = Tensor::new(&[256f32, 256.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let g = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        acc.inplace_op2(&g, &Accumulate).unwrap();
        let got = acc.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![256.0, 258.0]);
    }

    /// Each token's rows summed in row order in f32 and added once; skipped ids and untouched
    /// rows left alone; rows or tokens outside the tensors refused.
    #[test]
    fn the_embedding_gradient_sums_each_tokens_rows() {
        let dev = Device::Cpu;
        let ids = [3u32, 0, 3, 9, 0, 3];
        let op = EmbedGrad::of(&ids, Some(9));
        assert_eq!(op.tokens, [0, 3]);
        assert_eq!(op.order, [1, 4, 0, 2, 5]);
        assert_eq!(op.starts, [0, 2, 5]);
        let table = Tensor::ones((5, 2), DType::F32, &dev).unwrap();
        let g = Tensor::new(
            &[
                [1f32, 2.],
                [10., 20.],
                [100., 200.],
                [1e3, 2e3],
                [1e4, 2e4],
                [1e5, 2e5],
            ],
            &dev,
        )
        .unwrap();
        table.inplace_op2(&g, &op).unwrap();
        let got = table.to_vec2::<f32>().unwrap();
        assert_eq!(got[0], [1. + 10. + 1e4, 1. + 20. + 2e4]);
        assert_eq!(got[3], [1. + 1. + 100. + 1e5, 1. + 2. + 200. + 2e5]);
        for row in [1, 2, 4] {
            assert_eq!(got[row], [1., 1.]);
        }
        let outside = EmbedGrad::of(&[7], None);
        assert!(table
            .inplace_op2(&g.narrow(0, 0, 1).unwrap(), &outside)
            .is_err());
        let twice = EmbedGrad {
            order: vec![0, 1],
            starts: vec![0, 1, 2],
            tokens: vec![2, 2],
        };
        assert!(table
            .inplace_op2(&g.narrow(0, 0, 2).unwrap(), &twice)
            .is_err());
    }
}
