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
        match acc {
            CpuStorage::F32(v) => add_into(&mut v[a..b], g),
            CpuStorage::BF16(v) => add_into(&mut v[a..b], g),
            CpuStorage::F16(v) => add_into(&mut v[a..b], g),
            other => return Err(super::elem::unsupported(NAME, other.dtype())),
        }
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
}
