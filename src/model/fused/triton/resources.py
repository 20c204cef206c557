"""What the compiled attention kernels hold, read off their machine code with no GPU: registers,
stack (spills), shared memory, and their global loads and stores by width, with the `cuobjdump`
Triton ships. BENCHMARKS.md's tables come from here.

    python src/model/fused/triton/resources.py          # the committed sm_90 bf16 cubins
    python src/model/fused/triton/resources.py --tune   # device_check.py's TUNE, compiled here

A `LDG.E.U16` is one bf16 element per load; `LDG.E.128` and `LDGSTS` (cp.async) move 16 bytes.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compile as C  # noqa: E402
import flash_attn  # noqa: E402

BIN = os.path.join(os.path.dirname(C.triton.__file__), "backends", "nvidia", "bin")
COUNTS = {"LDG.E.U16": r"LDG\.E\.U16", "LDG.E.128": r"LDG\.E\.128", "LDGSTS": r"LDGSTS",
          "STG.E.U16": r"STG\.E\.U16", "STG.E.128": r"STG\.E\.128"}


def usage(cubin):
    """(registers, stack bytes, {instruction: count}, SASS instructions) of a cubin's bytes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    counts = {k: len(re.findall(p, sass)) for k, p in COUNTS.items()}
    return int(m.group(1)), int(m.group(2)), counts, len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))


def attention(v):
    return v.arch == 90 and v.source == "flash_attn.py" and "_bf16_" in v.name and "cap1" not in v.name


def committed():
    print("kernel | registers | stack | shared | " + " | ".join(COUNTS) + " | SASS instructions")
    with open(C.MANIFEST) as f:
        shared = {k["name"]: k["shared"] for k in json.load(f)["kernels"]}
    for v in C.variants():
        if not attention(v):
            continue
        with open(os.path.join(C.OUT, v.name + ".cubin"), "rb") as f:
            regs, stack, counts, insts = usage(f.read())
        print(f"{v.name} | {regs} | {stack} | {shared[v.name]} | " + " | ".join(str(c) for c in counts.values())
              + f" | {insts}")


def tune():
    from device_check import TUNE

    print("(BLOCK_M, BLOCK_N, warps, stages) | kernel/head tile: registers / stack / KB shared")
    for cfg in TUNE:
        flash_attn.CONFIGS = {64: cfg, 128: cfg}
        cells = []
        for v in C.variants():
            if attention(v) and "delta" not in v.name and v.consts["BLOCK_D"] in (64, 128):
                cubin, entry = C.compile_one(v)
                regs, stack, _, _ = usage(cubin)
                cells.append(f"{v.kernel.__name__}/{v.consts['BLOCK_D']}: {regs} / {stack} / {entry['shared'] // 1024}")
        print(cfg, "|", " | ".join(cells), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true", help="compile and read device_check.py's TUNE configurations")
    tune() if ap.parse_args().tune else committed()
