"""Compiles the Triton kernels (flash_attn.py, adamw.py, adamw8.py) ahead of time, with no GPU, to the
cubins refdpo embeds.

    python src/model/fused/triton/compile.py           # writes kernels/ and manifest.json
    python src/model/fused/triton/compile.py --check   # fails if they are stale (CI)

For every architecture in ARCHS and every variant (dtypes, head-dim tile, soft cap; AdamW's
state and gradient dtypes) it writes `kernels/<name>.cubin` and one `manifest.json` that says,
per kernel, what a launch needs: its entry name, its parameters in order with their types
(Triton appends scratch pointers after the kernel's own), threads (num_warps × 32), dynamic
shared memory and constexprs (tiles), with the SHA-256 of each source and of each cubin. `cargo test` checks those hashes against the files (`src/model/fused/flash.rs`), so
a kernel edited without recompiling fails the build's tests; `--check` recompiles and compares.

Cubins, not PTX: a cubin keeps CUDA's minor-version compatibility with an older driver, while
PTX of a newer ISA than the driver knows is refused.
"""

import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# No line tables in the cubins (half their size); FP fusion on, as Triton's JIT compiles.
os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import adamw  # noqa: E402
import adamw8  # noqa: E402
import flash_attn  # noqa: E402

ARCHS = (80, 90)
SOURCES = {"flash_attn.py": flash_attn, "adamw.py": adamw, "adamw8.py": adamw8}
OUT = os.path.join(HERE, "kernels")
MANIFEST = os.path.join(HERE, "manifest.json")


class Variant:
    """One kernel compiled for one architecture: its parameters' types, constexprs, options, and
    the integer parameters it is compiled to assume are multiples of 16."""

    def __init__(self, source, kernel, arch, types, consts, warps, stages, fusion, name, multiple_of_16=None):
        self.source, self.kernel, self.arch = source, kernel, arch
        self.consts, self.warps, self.stages, self.fusion = consts, warps, stages, fusion
        self.name = f"{kernel.__name__}_sm{arch}_{name}"
        self.sig = {n: ("constexpr" if n in consts else types(n)) for n in kernel.arg_names}
        self.multiple_of_16 = [n for n in kernel.arg_names
                               if multiple_of_16 and multiple_of_16(n) and self.sig[n] == "i32"]


def attention_multiples(name):
    """The attention's strides and head dim, compiled as multiples of 16 (what Triton's JIT
    assumes of such an argument when it is one). Without it a tile's rows cannot be proven
    aligned, nor its head mask uniform over 8 lanes: every bf16 element became its own 2-byte
    load and the loads were not pipelined (no cp.async). The launchers refuse other values."""
    return name == "head_dim" or (name.startswith("s") and name not in ("scale", "softcap"))


def attention_types(dtype):
    """Tensors of the input dtype, f32 statistics, i32 offsets and sizes, f32 scale and cap."""
    def types(name):
        if name in ("CU", "CU_Q"):
            return "*i32"
        if name in ("LSE", "DELTA"):
            return "*fp32"
        if name.isupper():
            return f"*{dtype}"
        return "fp32" if name in ("scale", "softcap") else "i32"
    return types


def adamw_types(name):
    """The optimizer's tables (int64 addresses, int32 chunks), f32 partial sums, the f64 norm and
    coefficient, the chunk count and f32 (f64: max_norm) scalars."""
    return {"PTRS": "*i64", "CHUNKS": "*i32", "PARTIALS": "*fp32", "OUT": "*fp64", "COEF": "*fp64",
            "MAPS": "*fp32", "BOUNDS": "*fp32", "n_chunks": "i32", "max_norm": "fp64"}.get(name, "fp32")


def variants():
    for arch in ARCHS:
        for dtype in ("bf16", "fp16"):
            for block_d, (bm, bn, warps, stages) in flash_attn.CONFIGS.items():
                types = attention_types(dtype)
                consts = {"BLOCK_D": block_d, "BLOCK_M": bm}
                yield Variant("flash_attn.py", flash_attn.flash_bwd_delta, arch, types, consts, 4, 1, True,
                              f"{dtype}_d{block_d}", attention_multiples)
                # Soft caps are Gemma 2's, whose heads are 128 and 256 wide.
                for softcap in (False, True) if block_d >= 128 else (False,):
                    consts = {"BLOCK_D": block_d, "BLOCK_M": bm, "BLOCK_N": bn, "SOFTCAP": softcap}
                    for kernel in (flash_attn.flash_fwd, flash_attn.flash_bwd_dkdv, flash_attn.flash_bwd_dq):
                        yield Variant("flash_attn.py", kernel, arch, types, consts, warps, stages, True,
                                      f"{dtype}_d{block_d}_cap{int(softcap)}", attention_multiples)
        # The optimizer without FP fusion: its f32 arithmetic equals the composed ops op by op.
        chunk = {"CHUNK": adamw.CHUNK, "BLOCK": adamw.BLOCK}
        yield Variant("adamw.py", adamw.clip_norm, arch, adamw_types, {"BLOCK": adamw.BLOCK}, 4, 1, False, "f64")
        for state in ("fp32", "bf16"):
            consts = {"BF16": state == "bf16", **chunk}
            yield Variant("adamw.py", adamw.grad_sumsq, arch, adamw_types, consts, 4, 1, False, state)
            # f32 or bf16 master weights (`train.master_dtype`)
            for weights in ("fp32", "bf16"):
                consts = {"BF16": state == "bf16", "W_BF16": weights == "bf16", **chunk}
                name = state if weights == "fp32" else f"{state}_wbf16"
                yield Variant("adamw.py", adamw.adamw_multi, arch, adamw_types, consts, 4, 1, False, name)
                # 8-bit moments (`train.optim = "adamw_8bit"`): the gradient in the state dtype
                consts = {"BF16": state == "bf16", "W_BF16": weights == "bf16", "CHUNK": adamw.CHUNK,
                          "QBLOCK": adamw8.QBLOCK, "ROWS": adamw8.ROWS}
                yield Variant("adamw8.py", adamw8.adamw8_multi, arch, adamw_types, consts, 4, 1, False, name)


def compile_one(v):
    kernel, sig = v.kernel, v.sig
    # Pointers 16-byte aligned (candle's allocations are) and the variant's integers multiples of
    # 16; the launchers check both.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or n in v.multiple_of_16}
    target = GPUTarget("cuda", v.arch, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": v.warps, "num_stages": v.stages, "enable_fp_fusion": v.fusion})
    src = ASTSource(fn=kernel, signature=sig, constexprs=v.consts, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise SystemExit(f"{v.name}: needs scratch memory, which the launcher does not give")
    # The compiled parameter list: the kernel's own non-constexpr ones, then Triton's scratch
    # pointers. Counted in the PTX, so a Triton that adds or drops one fails here, not on a GPU.
    params = [(n, sig[n]) for n in kernel.arg_names if sig[n] != "constexpr"]
    ptx = compiled.asm["ptx"]
    entry = ptx[ptx.index(".entry"):]
    entry = entry[: entry.index(")")]
    scratch = entry.count(".param") - len(params)
    if scratch != 2:
        raise SystemExit(f"{v.name}: {entry.count('.param')} PTX parameters, expected {len(params)} + 2")
    # A half-precision tile moved one element per instruction means the alignment hints above
    # were lost: refuse it here rather than find it slow on a GPU.
    scalar = [op for op in ("ld.global.b16", "st.global.b16") if op in ptx]
    if v.multiple_of_16 and scalar:
        raise SystemExit(f"{v.name}: {', '.join(scalar)} in the PTX: its tiles are not vectorized")
    return compiled.asm["cubin"], {
        "name": v.name,
        "source": v.source,
        "kernel": kernel.__name__,
        "entry": meta.name,
        "arch": v.arch,
        "constexprs": v.consts,
        "num_warps": meta.num_warps,
        "num_stages": v.stages,
        "fp_fusion": v.fusion,
        "shared": meta.shared,
        "params": [f"{n}:{t}" for n, t in params],
        # Integer parameters compiled as multiples of 16: a launch with another value is refused.
        "multiple_of_16": v.multiple_of_16,
        # Triton 3.9 appends two pointers after a kernel's own parameters (global and profile
        # scratch); both may be null when, as checked above, no scratch is needed.
        "scratch_params": scratch,
    }


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def build():
    sources = {}
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            sources[name] = sha256(f.read())
    entries, blobs = [], {}
    for v in variants():
        cubin, entry = compile_one(v)
        entry["sha256"] = sha256(cubin)
        entries.append(entry)
        blobs[v.name] = cubin
    manifest = {
        "sources": sources,
        "triton": triton.__version__,
        "kernels": entries,
    }
    return manifest, blobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="recompile and fail if anything committed differs")
    args = ap.parse_args()
    manifest, blobs = build()
    text = json.dumps(manifest, indent=1) + "\n"
    if args.check:
        stale = []
        with open(MANIFEST) as f:
            if f.read() != text:
                stale.append("manifest.json")
        for name, cubin in blobs.items():
            path = os.path.join(OUT, name + ".cubin")
            if not os.path.exists(path) or open(path, "rb").read() != cubin:
                stale.append(path)
        if stale:
            sys.exit("stale against the kernels' source (run compile.py): " + ", ".join(stale[:5]))
        print(f"{len(blobs)} kernels up to date")
        return
    os.makedirs(OUT, exist_ok=True)
    for old in os.listdir(OUT):
        if old.endswith(".cubin") and old[: -len(".cubin")] not in blobs:
            os.remove(os.path.join(OUT, old))
    for name, cubin in blobs.items():
        tmp = os.path.join(OUT, name + ".cubin.tmp")
        with open(tmp, "wb") as f:
            f.write(cubin)
        os.replace(tmp, os.path.join(OUT, name + ".cubin"))
    with open(MANIFEST + ".tmp", "w") as f:
        f.write(text)
    os.replace(MANIFEST + ".tmp", MANIFEST)
    size = sum(len(b) for b in blobs.values())
    print(f"{len(blobs)} kernels, {size / 1e6:.2f} MB of cubin, in {OUT}")


if __name__ == "__main__":
    main()
