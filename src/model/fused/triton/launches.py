"""The launches host.py makes for a few shapes of the tiled attention (forward and backward),
recorded without running them: each kernel, its grid, and its arguments in order (buffers by
role as strings, sizes and strides as integers, the scale and cap as floats). Written to launches.json, which the Rust launcher's
plan is compared with (`src/model/fused/tiled/plan.rs`), so the strides, offsets and grids Rust
passes on a GPU are those of the launches the interpreter tests run. `test_launches.py` fails
when launches.json is stale against host.py.

    python src/model/fused/triton/launches.py   # rewrites launches.json
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import flash_attn  # noqa: E402
import host  # noqa: E402

OUT = os.path.join(HERE, "launches.json")

# name: (layout, B, T keys, Tq queries, Hq, Hkv, D, keys per sequence (None: a padded batch),
#        queries per sequence (None: every position), window, softcap)
CASES = {
    "padded_bhtd": ("bhtd", 2, 37, 37, 4, 2, 64, None, None, 0, 0.0),
    "packed_bthd_window": ("bthd", 1, 92, 92, 4, 2, 64, [17, 70, 5], None, 7, 0.0),
    "shared_bthd_capped": ("bthd", 1, 92, 49, 4, 2, 128, [17, 70, 5], [17, 30, 2], 0, 5.0),
    "shared_bhtd_gqa": ("bhtd", 1, 60, 35, 6, 2, 64, [40, 20], [20, 15], 3, 0.0),
}
SCALE = 0.125


def offsets(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def record(case):
    layout, b, t, tq, hq, hkv, d, lens, queries, window, softcap = case
    keys = lens if lens is not None else [t] * b
    cu = offsets(keys)
    cu_q = offsets(queries) if queries is not None else None

    def shape(tokens, heads):
        return (b, tokens, heads, d) if layout == "bthd" else (b, heads, tokens, d)

    q, do = torch.zeros(shape(tq, hq)), torch.zeros(shape(tq, hq))
    k, v = torch.zeros(shape(t, hkv)), torch.zeros(shape(t, hkv))
    launches = []

    def launch(kernel, grid, args, consts):
        values = []
        for name, a in zip(getattr(flash_attn, kernel).arg_names, args):
            if isinstance(a, torch.Tensor):
                role = name
                if cu_q is not None and a is cu_q:
                    role = "CU_Q"
                elif a is cu:
                    role = "CU"
                values.append(role)
            else:
                values.append(float(a) if isinstance(a, float) else int(a))
        launches.append({"kernel": kernel, "grid": list(grid), "args": values,
                         "tiles": {n: consts[n] for n in ("BLOCK_M", "BLOCK_N") if n in consts}})

    o, lse = host.forward(q, k, v, cu, layout, window, SCALE, softcap, False, launch, cu_q)
    host.backward(q, k, v, o, lse, do, cu, layout, window, SCALE, softcap, False, launch, cu_q)
    return {"layout": layout, "b": b, "t": t, "tq": tq, "hq": hq, "hkv": hkv, "d": d, "keys": keys,
            "queries": queries if queries is not None else keys, "window": window, "scale": SCALE,
            "softcap": softcap, "launches": launches}


def build():
    return {name: record(case) for name, case in CASES.items()}


def text():
    """One line per case's shape and per launch."""
    lines = ["{"]
    cases = build()
    for i, (name, case) in enumerate(cases.items()):
        shape = {k: v for k, v in case.items() if k != "launches"}
        lines.append(f" {json.dumps(name)}: {{\"shape\": {json.dumps(shape)}, \"launches\": [")
        launches = case["launches"]
        for j, launch in enumerate(launches):
            lines.append("  " + json.dumps(launch) + ("," if j + 1 < len(launches) else ""))
        lines.append(" ]}" + ("," if i + 1 < len(cases) else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(OUT + ".tmp", "w") as f:
        f.write(text())
    os.replace(OUT + ".tmp", OUT)
    print(f"{len(CASES)} cases in {OUT}")
