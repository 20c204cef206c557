"""Compiles flash_attn.py ahead of time, with no GPU, to the cubins refdpo embeds.

    python src/model/fused/triton/compile.py           # writes kernels/ and manifest.json
    python src/model/fused/triton/compile.py --check   # fails if they are stale (CI)

For every architecture in ARCHS, input dtype, head-dim tile and soft-cap choice it writes
`kernels/<name>.cubin` and one `manifest.json` that says, per kernel, what a launch needs: its
entry name, its parameters in order (Triton appends scratch pointers after the kernel's own),
threads (num_warps × 32), dynamic shared memory and tiles, with the SHA-256 of the source and of
each cubin. `cargo test` checks those hashes against the files (`src/model/fused/flash.rs`), so
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

import flash_attn  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16")
BLOCK_DS = tuple(flash_attn.CONFIGS)
SOURCE = os.path.join(HERE, "flash_attn.py")
OUT = os.path.join(HERE, "kernels")
MANIFEST = os.path.join(HERE, "manifest.json")


def signature(kernel, dtype):
    """Each parameter's Triton type: tensors of the input dtype, f32 statistics, i32 offsets."""
    f32 = {"LSE", "DELTA"}
    sig = {}
    for name in kernel.arg_names:
        if name in ("BLOCK_D", "BLOCK_M", "BLOCK_N", "SOFTCAP"):
            sig[name] = "constexpr"
        elif name == "CU":
            sig[name] = "*i32"
        elif name in f32:
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name in ("scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants():
    for arch in ARCHS:
        for dtype in DTYPES:
            for block_d in BLOCK_DS:
                bm, bn, warps, stages = flash_attn.CONFIGS[block_d]
                yield arch, flash_attn.flash_bwd_delta, dtype, block_d, None, (bm, bn, 4, 1)
                # Soft caps are Gemma 2's, whose heads are 128 and 256 wide.
                for softcap in (False, True) if block_d >= 128 else (False,):
                    for kernel in (flash_attn.flash_fwd, flash_attn.flash_bwd_dkdv, flash_attn.flash_bwd_dq):
                        yield arch, kernel, dtype, block_d, softcap, (bm, bn, warps, stages)


def compile_one(arch, kernel, dtype, block_d, softcap, cfg):
    bm, bn, warps, stages = cfg
    sig = signature(kernel, dtype)
    consts = {"BLOCK_D": block_d, "BLOCK_M": bm}
    if "BLOCK_N" in sig:
        consts["BLOCK_N"] = bn
    if "SOFTCAP" in sig:
        consts["SOFTCAP"] = softcap
    # Pointers 16-byte aligned (candle's allocations are); the Rust launcher checks it.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if sig[n].startswith("*")}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": warps, "num_stages": stages})
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise SystemExit(f"{kernel.__name__}: needs scratch memory, which the launcher does not give")
    # The compiled parameter list: the kernel's own non-constexpr ones, then Triton's scratch
    # pointers. Counted in the PTX, so a Triton that adds or drops one fails here, not on a GPU.
    params = [(n, sig[n]) for n in kernel.arg_names if sig[n] != "constexpr"]
    ptx = compiled.asm["ptx"]
    entry = ptx[ptx.index(".entry"):]
    entry = entry[: entry.index(")")]
    scratch = entry.count(".param") - len(params)
    if scratch != 2:
        raise SystemExit(f"{kernel.__name__}: {entry.count('.param')} PTX parameters, expected {len(params)} + 2")
    name = f"{kernel.__name__}_sm{arch}_{dtype}_d{block_d}" + ("" if softcap is None else f"_cap{int(softcap)}")
    return name, compiled.asm["cubin"], {
        "name": name,
        "kernel": kernel.__name__,
        "entry": meta.name,
        "arch": arch,
        "dtype": dtype,
        "block_d": block_d,
        "block_m": bm,
        "block_n": bn,
        "softcap": softcap,
        "num_warps": meta.num_warps,
        "num_stages": stages,
        "shared": meta.shared,
        "params": [f"{n}:{t}" for n, t in params],
        # Triton 3.9 appends two pointers after a kernel's own parameters (global and profile
        # scratch); both may be null when, as checked above, no scratch is needed.
        "scratch_params": scratch,
    }


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def build():
    with open(SOURCE, "rb") as f:
        source = f.read()
    entries, blobs = [], {}
    for v in variants():
        name, cubin, entry = compile_one(*v)
        entry["sha256"] = sha256(cubin)
        entries.append(entry)
        blobs[name] = cubin
    manifest = {
        "source": "flash_attn.py",
        "source_sha256": sha256(source),
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
            sys.exit("stale against flash_attn.py (run compile.py): " + ", ".join(stale[:5]))
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
