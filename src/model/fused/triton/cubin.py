"""Launches the committed cubins (kernels/, manifest.json) through the CUDA driver API, as
refdpo's Rust launcher does: module from the cubin's bytes, the manifest's entry point, its
parameters in order followed by Triton's two scratch pointers (null: compile.py refuses kernels
that need scratch), num_warps × 32 threads and the dynamic shared memory the manifest gives.

`host.forward(..., launch=Cubins())` then runs the very bytes refdpo embeds, on a GPU, and the
device check compares them with Triton's JIT build and with the composed ops.
"""

import ctypes
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DTYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64",
}


class Cubins:
    def __init__(self, arch=None):
        if arch is None:
            major, minor = torch.cuda.get_device_capability()
            arch = 10 * major + minor
        self.arch = arch
        with open(os.path.join(HERE, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.loaded = {}
        self.launches = 0

    def _check(self, rc, what):
        if rc != 0:
            msg = ctypes.c_char_p()
            self.cuda.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what}: CUDA error {rc} ({msg.value.decode() if msg.value else '?'})")

    def entry(self, kernel, consts, args):
        """The compiled kernel with these constexprs whose pointer parameters have the dtypes of
        these tensor arguments."""
        want = [("*" + DTYPES[a.dtype]) if isinstance(a, torch.Tensor) else None for a in args]
        for e in self.manifest["kernels"]:
            types = [p.split(":")[1] for p in e["params"]]
            if (
                (e["kernel"], e["arch"]) == (kernel, self.arch)
                and len(types) == len(want)
                and all(w is None or w == t for w, t in zip(want, types))
                and all(consts.get(k) == v for k, v in e["constexprs"].items())
            ):
                return e
        raise LookupError(f"no compiled {kernel} for sm_{self.arch}, {[w for w in want if w]}, {consts}")

    def function(self, e):
        if e["name"] not in self.loaded:
            torch.cuda.init()
            torch.empty(1, device="cuda")  # the primary context, current on this thread
            with open(os.path.join(HERE, "kernels", e["name"] + ".cubin"), "rb") as f:
                image = f.read()
            module, func = ctypes.c_void_p(), ctypes.c_void_p()
            self._check(self.cuda.cuModuleLoadData(ctypes.byref(module), image), f"load {e['name']}")
            self._check(
                self.cuda.cuModuleGetFunction(ctypes.byref(func), module, e["entry"].encode()),
                f"entry {e['entry']}",
            )
            if e["shared"] > 48 * 1024:
                self._check(
                    self.cuda.cuFuncSetAttribute(func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, e["shared"]),
                    "shared memory",
                )
            self.loaded[e["name"]] = (module, func, image)
        return self.loaded[e["name"]][1]

    def __call__(self, kernel, grid, args, consts):
        e = self.entry(kernel, consts, args)
        params = [p.split(":") for p in e["params"]]
        assert len(params) == len(args), (kernel, len(params), len(args))
        values = []
        for (name, ty), a in zip(params, args):
            if ty.startswith("*"):
                assert a.data_ptr() % 16 == 0, f"{name} is not 16-byte aligned"
                values.append(ctypes.c_uint64(a.data_ptr()))
            elif ty == "i32":
                assert -(2**31) <= a < 2**31, f"{name} = {a} exceeds 32 bits"
                assert name not in e["multiple_of_16"] or a % 16 == 0, f"{name} = {a}: compiled for multiples of 16"
                values.append(ctypes.c_int32(a))
            elif ty == "fp32":
                values.append(ctypes.c_float(a))
            elif ty == "fp64":
                values.append(ctypes.c_double(a))
            else:
                raise TypeError(f"{name}: {ty}")
        values += [ctypes.c_uint64(0)] * e["scratch_params"]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        func = self.function(e)
        self._check(
            self.cuda.cuLaunchKernel(
                func, grid[0], grid[1], grid[2], e["num_warps"] * 32, 1, 1, e["shared"], stream, argv, None
            ),
            f"launch {e['name']}",
        )
        self.launches += 1
