"""Test setup: this folder on the import path, and two fixes to Triton 3.9's interpreter, where
its bf16 emulation differs from what the GPU computes (triton/runtime/interpreter.py):

- it keeps bf16 tensors as their raw uint16 bits, and `tl.dot` (`create_dot`) multiplies those
  bits as integers, so any bf16 dot is garbage. Fixed by converting bf16 operands to f32 before
  the matmul: bf16 products are exact in f32, which is what the GPU's bf16 MMA with f32
  accumulation computes;
- `x.to(tl.bfloat16)` from f32 truncates (`cast_impl` passes no rounding mode), where the GPU
  rounds to nearest even (`cvt.rn.bf16.f32`); truncation biases every sum of rounded terms
  toward zero. Fixed by rounding through torch, which rounds to nearest even.

Only the emulator is patched; the kernels' source is the one compiled for the GPU.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    from triton.runtime import interpreter

    _dot = interpreter.InterpreterBuilder.create_dot

    def _f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)
            return interpreter.TensorHandle(data.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _dot(self, _f32(a), _f32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot

    _cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            import torch

            f32 = torch.from_numpy(np.ascontiguousarray(src.data).view(np.float32))
            bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return _cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
