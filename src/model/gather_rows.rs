//! Rows of a tensor gathered along one dim by a fixed map, as one graph node whose backward is
//! gathers too. candle's `index_select` backward is `index_add`, whose CUDA kernel walks every
//! index in sequence within each thread: one pass over all 16,384 rows of a micro-batch per
//! (head, dim) element, a slow launch per layer. Where each source row is gathered at most a few
//! times, the gradient is the sum of a few gathers instead ([`RowMap::back`]), each one thread
//! per element.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Which source row each gathered row reads (`rows`, [M] u32), and its transpose as gathers:
/// each of `back` ([N] u32, N the source's rows) picks, for every source row, one of the M
/// gathered rows that read it, or [`NO_ROW`] (a row of zeros: candle's `index_select` writes
/// zeros for `u32::MAX`, on the CPU and in its CUDA kernel) where it has no more readers. A
/// source row's gradient is the sum over `back` of the picked rows' gradients.
#[derive(Debug, Clone)]
pub struct RowMap {
    pub rows: Tensor,
    pub back: Vec<Tensor>,
}

/// A row of zeros in a gather: candle's `index_select` sentinel.
pub const NO_ROW: u32 = u32::MAX;

impl RowMap {
    /// The map gathering `rows` (each < `sources`), with its transpose.
    pub fn new(rows: &[u32], sources: usize, device: &candle_core::Device) -> Result<Self> {
        let mut back: Vec<Vec<u32>> = Vec::new();
        let mut readers = vec![0usize; sources];
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            if r >= sources {
                candle_core::bail!("row map: row {r} of {sources} sources")
            }
            if readers[r] == back.len() {
                back.push(vec![NO_ROW; sources]);
            }
            back[readers[r]][r] = i as u32;
            readers[r] += 1;
        }
        Ok(Self {
            rows: Tensor::from_slice(rows, rows.len(), device)?,
            back: back
                .into_iter()
                .map(|b| Tensor::from_vec(b, sources, device))
                .collect::<Result<_>>()?,
        })
    }
}

/// x's rows along `dim` as `map` gathers them; differentiable with the map's transposed gathers
/// when x is tracked.
pub fn gather_rows(x: &Tensor, map: &RowMap, dim: usize) -> Result<Tensor> {
    if !x.track_op() {
        return x.index_select(&map.rows, dim);
    }
    x.contiguous()?.apply_op2(
        &map.rows,
        Gather {
            dim,
            back: map.back.clone(),
        },
    )
}

struct Gather {
    dim: usize,
    back: Vec<Tensor>,
}

impl Gather {
    fn fwd<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        ids: &S,
        il: &Layout,
    ) -> Result<(S, Shape)> {
        let mut dims = xl.dims().to_vec();
        dims[self.dim] = il.dims()[0];
        Ok((x.index_select(ids, xl, il, self.dim)?, Shape::from(dims)))
    }
}

impl CustomOp2 for Gather {
    fn name(&self) -> &'static str {
        "refdpo-gather-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(x, xl, ids, il)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(x, xl, ids, il)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _ids: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // index_select reads contiguous sources only
        let g = g.contiguous()?;
        let mut sum: Option<Tensor> = None;
        for back in &self.back {
            let part = g.index_select(back, self.dim)?;
            sum = Some(match sum {
                Some(s) => (s + part)?,
                None => part,
            });
        }
        Ok((sum, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The gathers' gradient equals candle's index_select backward (index_add), rows read
    /// twice, once and not at all.
    #[test]
    fn the_gradient_equals_index_add() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap()).unwrap();
        let rows = [0u32, 1, 2, 0, 1, 4];
        let map = RowMap::new(&rows, 5, &dev).unwrap();
        assert_eq!(map.back.len(), 2);
        let w = Tensor::randn(0f32, 1.0, (2, 6, 3), &dev).unwrap();
        let got = gather_rows(x.as_tensor(), &map, 1).unwrap();
        let want = x.as_tensor().index_select(&map.rows, 1).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let grad = |y: Tensor| {
            let store = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = store.get(x.as_tensor()).unwrap().clone();
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (grad(got), grad(want));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "{worst}");
        // row 3 is read by none: its gradient is zero
        assert!(a[9..12].iter().all(|&v| v == 0.0));
        assert!(RowMap::new(&[5], 5, &dev).is_err());
    }
}
