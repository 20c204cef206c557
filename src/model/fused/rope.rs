//! RoPE in transformers' rotate-half form as one kernel; its backward is the same kernel with
//! −sin (the rotation's inverse).

use super::elem::{round, slice, with_float, Elem};
use super::tiled::Order;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

const NAME: &str = "rope";

/// x [b, heads, t, d] ([`Order::Bhtd`]) or [b, t, heads, d] ([`Order::Bthd`]), cos and sin
/// [t, d/2] (the activations' dtype) → x rotated by `sign`·θ.
#[derive(Debug, Clone, Copy)]
pub struct RopeOp {
    pub sign: f32,
    pub order: Order,
}

/// x's positions, rows per position and half its head dim.
#[derive(Debug, Clone, Copy)]
struct Rows {
    t: usize,
    inner: usize,
    half: usize,
}

impl RopeOp {
    /// The rotation by +θ of x [b, heads, t, d].
    #[cfg(test)]
    const FORWARD: Self = Self {
        sign: 1.0,
        order: Order::Bhtd,
    };

    fn forward<T: Elem>(&self, x: &[T], cos: &[T], sin: &[T], n: Rows) -> Vec<T> {
        let (t, half) = (n.t, n.half);
        let mut y = vec![T::zero(); x.len()];
        for (row, (xr, yr)) in x.chunks(2 * half).zip(y.chunks_mut(2 * half)).enumerate() {
            let tab = (row / n.inner % t) * half;
            for k in 0..half {
                let (x1, x2) = (xr[k].f(), xr[half + k].f());
                let (c, s) = (cos[tab + k].f(), self.sign * sin[tab + k].f());
                yr[k] = T::of(round::<T>(x1 * c) - round::<T>(x2 * s));
                yr[half + k] = T::of(round::<T>(x2 * c) + round::<T>(x1 * s));
            }
        }
        y
    }
}

impl RopeOp {
    /// The rows of x's layout ([.., t, d] or [b, t, heads, d]).
    fn rows(&self, layout: &Layout) -> Result<Rows> {
        let d = layout.dims();
        let bad = || {
            candle_core::Error::Msg(format!(
                "fused {NAME}: expected {}, got {d:?}",
                match self.order {
                    Order::Bhtd => "[.., t, even head_dim]",
                    Order::Bthd => "[b, t, heads, even head_dim]",
                }
            ))
        };
        let rank = d.len();
        if rank < 2 || !d[rank - 1].is_multiple_of(2) {
            return Err(bad());
        }
        let (t, inner) = match self.order {
            Order::Bhtd => (d[rank - 2], 1),
            Order::Bthd if rank == 4 => (d[1], d[2]),
            Order::Bthd => return Err(bad()),
        };
        Ok(Rows {
            t: t.max(1),
            inner: inner.max(1),
            half: d[rank - 1] / 2,
        })
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "refdpo-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = self.rows(xl)?;
        with_float!(x.dtype(), NAME, T => {
            let y = self.forward(
                slice::<T>(NAME, x, xl)?,
                slice::<T>(NAME, cos, cl)?,
                slice::<T>(NAME, sin, sl)?,
                rows,
            );
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, elementwise, launch, view};
        let n = xl.shape().elem_count();
        count(NAME, n)?;
        let r = self.rows(xl)?;
        let (pairs, tu, iu, hu) = ((n / 2) as u32, r.t as u32, r.inner as u32, r.half as u32);
        let dev = &x.device;
        let kernel = format!("rope_{}", x.dtype().as_str());
        with_float!(x.dtype(), NAME, T => {
            let (xv, cv, sv) = (
                view::<T>(NAME, x, xl)?,
                view::<T>(NAME, cos, cl)?,
                view::<T>(NAME, sin, sl)?,
            );
            let y = launch!(dev, kernel, elementwise(n / 2), y: T = n;
                &xv, &cv, &sv, &y, &pairs, &tu, &iu, &hu, &self.sign);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = RopeOp {
            sign: -self.sign,
            ..*self
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device, Var};

    /// The op in `order` on x of `shape` equals candle's `rope_slow` (on x made [b, heads, t, d]),
    /// forward and backward, with θ over `t` positions.
    fn equals_rope_slow(order: Order, shape: (usize, usize, usize, usize), t: usize) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let theta = Tensor::randn(0f32, 2.0, (t, shape.3 / 2), &dev).unwrap();
        let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
        let up = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let swap = |x: &Tensor| match order {
            Order::Bhtd => x.clone(),
            Order::Bthd => x.transpose(1, 2).unwrap().contiguous().unwrap(),
        };
        let want = candle_nn::rotary_emb::rope_slow(&swap(x.as_tensor()), &cos, &sin).unwrap();
        let want = swap(&want);
        let op = RopeOp { sign: 1.0, order };
        let got = x.as_tensor().apply_op3(&cos, &sin, op).unwrap();
        assert!(max_abs_diff(&want, &got) < 1e-6, "{order:?}");
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(
            gw.get(x.as_tensor()).unwrap(),
            gg.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "{order:?}: {d}");
    }

    #[test]
    fn forward_and_backward_equal_the_composed_ops() {
        equals_rope_slow(Order::Bhtd, (2, 3, 5, 8), 5);
    }

    #[test]
    fn bf16_equals_the_composed_ops_exactly() {
        // transformers rounds each product and sum in bf16, as the composed ops do
        let dev = Device::Cpu;
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = bf(Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev).unwrap());
        let theta = Tensor::randn(0f32, 2.0, (6, 4), &dev).unwrap();
        let (cos, sin) = (bf(theta.cos().unwrap()), bf(theta.sin().unwrap()));
        let want = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap();
        let got = x.apply_op3(&cos, &sin, RopeOp::FORWARD).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&f32(&want), &f32(&got)), 0.0);
    }

    #[test]
    fn positions_before_heads_rotate_each_head_at_its_position() {
        // [b, t, heads, d] rotated, forward and backward, is [b, heads, t, d] rotated, transposed
        equals_rope_slow(Order::Bthd, (2, 5, 3, 8), 5);
        // a rank that is not [b, t, heads, d] is named
        let dev = Device::Cpu;
        let (cos, sin) = (
            Tensor::ones((5, 4), DType::F32, &dev).unwrap(),
            Tensor::zeros((5, 4), DType::F32, &dev).unwrap(),
        );
        let op = RopeOp {
            sign: 1.0,
            order: Order::Bthd,
        };
        let flat = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
        let e = flat.apply_op3(&cos, &sin, op).unwrap_err().to_string();
        assert!(e.contains("[b, t, heads, even head_dim]"), "{e}");
    }
}
