"""`../kernels.cu`, the fused CUDA kernels' own source, built for the CPU and launched from Python.

`build()` compiles `emulator.cpp` (which includes `../kernels.cu`) with the host's C++ compiler
against `include/cuda_emu.h`; `Emulator.launch` runs a kernel as `cuLaunchKernel` would: by name,
over a grid of blocks of threads, with a pointer to each argument. Tensors are torch CPU tensors
(contiguous; bf16 and f16 hold the GPU's bit patterns); scalars are typed with `U32` and `F32`, the
kernels' parameter types.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("emulator.cpp", "include/cuda_emu.h", "../kernels.cu")


class U32(ctypes.c_uint32):
    pass


class F32(ctypes.c_float):
    pass


def build(out_dir=None, sanitize=None):
    """The emulator's shared library, compiled once per source state (a few seconds); with
    `sanitize="thread"`, under ThreadSanitizer, which reports two threads of a block touching the
    same shared memory with no barrier between them (the process must preload libtsan)."""
    digest = hashlib.sha256(repr(sanitize).encode())
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    out_dir = out_dir or os.path.join(tempfile.gettempdir(), "refdpo-kernels-cu")
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"emulator-{digest.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}.tmp"
        cxx = os.environ.get("CXX", "g++")
        cmd = [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra",
               "-Werror", "-ffp-contract=off", "-I", os.path.join(HERE, "include"),
               os.path.join(HERE, "emulator.cpp"), "-o", tmp]
        if sanitize:
            cmd[3:3] = [f"-fsanitize={sanitize}", "-g"]
        subprocess.run(cmd, check=True)
        os.replace(tmp, lib)
    return lib


class Emulator:
    def __init__(self, lib=None):
        self.lib = ctypes.CDLL(lib or build(sanitize=os.environ.get("REFDPO_EMU_SANITIZE")))
        self.lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                        ctypes.POINTER(ctypes.c_void_p)]
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_kernel_name.restype = ctypes.c_char_p
        self.launched = set()

    def kernels(self):
        """Every kernel the emulator registers."""
        return {self.lib.emu_kernel_name(i).decode() for i in range(self.lib.emu_kernel_count())}

    def launch(self, name, grid, block, *args):
        """Runs kernel `name` over `grid` blocks of `block` threads on `args`."""
        held = []
        for a in args:
            if isinstance(a, torch.Tensor):
                assert a.device.type == "cpu" and a.is_contiguous(), name
                held.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, (U32, F32)):
                held.append(a)
            else:
                raise TypeError(f"{name}: type the scalar {a!r} as U32 or F32")
        ptrs = (ctypes.c_void_p * len(held))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p)
                                               for h in held])
        rc = self.lib.emu_launch(name.encode(), grid, block, ptrs)
        if rc != 0:
            raise ValueError(f"{name}: emu_launch returned {rc}")
        self.launched.add(name)
