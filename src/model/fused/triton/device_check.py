"""On a GPU host: are the committed cubins correct there, and how fast against PyTorch's SDPA?

    python3 src/model/fused/triton/device_check.py --out DIR

1. the interpreter's tests (test_flash_attn.py, test_adamw.py, test_adamw8.py), run by Triton's JIT on the GPU,
   each case called here (the host need not have pytest);
2. the committed cubins (what refdpo embeds), launched through the driver as refdpo does, against
   the composed ops in float64 and against the JIT build, forward and every input's gradient,
   for every compiled head tile, dtype and soft cap, GQA, a window and packed sequences;
   and the optimizer's cubins (norm, clipping, AdamW over many tensors) against the composed
   ops' f32 arithmetic, bit for bit;
3. forward and forward+backward time of the cubins against torch's
   `scaled_dot_product_attention` (its flash backend, causal, GQA), at the shapes of the
   benchmark's models, as TFLOP/s (causal: half the square); and one optimizer step over 32M
   values (dense and 8-bit moments) against torch's fused AdamW.

Writes `flash_check.json` and prints a table. Needs torch with CUDA (it brings triton).
`--tune` instead times the tile configurations in TUNE through the JIT (`flash_tune.json`).
"""

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# f32 dots as IEEE f32, as the interpreter computes them and the tests' f32 tolerances assume
# (Triton's JIT makes them TF32 by default on NVIDIA); bf16/f16 kernels and the cubins unchanged
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import pytest  # noqa: F401
except ImportError:  # the GPU host may lack it: its decorators, as no-ops, are all the tests use
    import types

    _stub = types.ModuleType("pytest")
    _stub.mark = types.SimpleNamespace(parametrize=lambda *a, **k: (lambda f: f))
    sys.modules["pytest"] = _stub

import host  # noqa: E402
from cubin import Cubins  # noqa: E402
import test_adamw  # noqa: E402
import test_adamw8  # noqa: E402
import test_flash_attn as tests  # noqa: E402
from test_flash_attn import make, offsets, reference, rel  # noqa: E402


class _Patch:
    """pytest's monkeypatch, for the one test that takes it."""

    def __init__(self):
        self.undo = []

    def setattr(self, obj, name, value):
        self.undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self):
        for obj, name, value in reversed(self.undo):
            setattr(obj, name, value)


def no_fusion(kernel, grid, args, consts):
    """The optimizer's JIT launch without fused multiply-adds, as compile.py builds its cubins
    (their f32 update equals the composed ops' bit for bit only so)."""
    module = test_adamw8.adamw8 if kernel == "adamw8_multi" else test_adamw.adamw
    getattr(module, kernel)[grid](*args, **consts, enable_fp_fusion=False)


def older_triton():
    """Whether the host's Triton is older than the one that built the cubins (manifest.json):
    Triton 3.6 types adamw8.py's literal 1e-38 as fp64 and cannot compile it."""
    import triton

    with open(os.path.join(HERE, "manifest.json")) as f:
        built = json.load(f)["triton"]
    key = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:3])  # noqa: E731
    return key(triton.__version__) < key(built)


def jit_tests():
    """Every case of test_flash_attn.py through Triton's JIT: (passed, failures, skipped)."""
    calls = [
        (f"{name}-{dtype}", tests.test_forward_and_gradients_equal_the_composed_ops, (name, dtype))
        for name in sorted(tests.CASES)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ]
    calls += [
        ("unseen_row", tests.test_an_unseen_row_of_a_window_is_not_nan, ()),
        ("packing", tests.test_packing_equals_the_padded_batch, ()),
    ]
    calls += [(f"compiled_tiles-cap{c}", tests.test_the_compiled_tiles, (None, c)) for c in (0.0, 4.0)]
    # the optimizer's cases that take a launch: without fused multiply-adds, as the cubins
    fused_free = dict(launch=no_fusion)
    calls += [
        ("adamw_f32", test_adamw.test_f32_state_equals_the_composed_ops_and_torch_adamw, fused_free),
        ("adamw_bf16_rounding", test_adamw.test_bf16_moments_round_stochastically, ()),
        ("adamw_bf16_weights", test_adamw.test_bf16_weights_round_stochastically, fused_free),
        ("adamw_non_finite", test_adamw.test_a_non_finite_norm_changes_nothing, fused_free),
        ("adamw_no_clipping", test_adamw.test_no_clipping_without_max_norm, ()),
    ]
    eight = [
        ("adamw8_bitsandbytes", test_adamw8.test_follows_bitsandbytes_adamw8bit, fused_free),
        ("adamw8_cpu_loops", test_adamw8.test_equals_the_cpu_loops_beside_a_dense_tensor, fused_free),
        ("adamw8_bf16_non_finite", test_adamw8.test_bf16_weights_round_stochastically_and_a_non_finite_norm_changes_nothing,
         fused_free),
    ]
    skipped = []
    if older_triton():
        skipped = [f"{name}: this Triton cannot compile adamw8.py (the cubins' check covers it)" for name, _, _ in eight]
    else:
        calls += eight
    passed, failures = 0, []
    for name, fn, args in calls:
        patch = _Patch()
        kwargs = args if isinstance(args, dict) else {}
        args = () if isinstance(args, dict) else args
        if args and args[0] is None:
            args = (patch, *args[1:])
        try:
            fn(*args, **kwargs)
            passed += 1
        except Exception:  # noqa: BLE001 - every failure is reported, none stops the check
            failures.append(f"{name}: {traceback.format_exc(limit=2)[-600:]}")
        finally:
            patch.restore()
    return passed, failures, skipped


def run(q, k, v, do, cu, window, softcap, launch, cu_q=None):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = host.flash_attention(q, k, v, cu, "bthd", window, q.shape[-1] ** -0.5, softcap, False, launch, cu_q)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


CORRECTNESS = [
    # (head dim, Hq, Hkv, lengths, window, softcap, queries per sequence (None: every position))
    (64, 14, 2, [300, 77, 500, 147], 0, 0.0, None),
    (64, 8, 8, [1024], 0, 0.0, None),
    (128, 12, 2, [513, 511], 0, 0.0, None),
    (128, 8, 4, [700, 324], 4096 // 16, 0.0, None),
    (128, 8, 4, [640, 384], 0, 50.0, None),
    (256, 8, 4, [333, 691], 200, 50.0, None),
    (96, 32, 32, [257, 255], 0, 0.0, None),
    # shared prompts: each rejected sequence's queries its own last positions
    (64, 14, 2, [300, 280, 500, 470], 0, 0.0, [300, 90, 500, 131]),
    (128, 8, 4, [640, 384], 0, 50.0, [640, 100]),
]


def correctness(cubins, device="cuda"):
    rows = []
    for d, hq, hkv, lengths, window, softcap, queries in CORRECTNESS:
        for dtype in (torch.bfloat16, torch.float16):
            t = sum(lengths)
            q, k, v, do = make(1, t, hq, hkv, d, "bthd", dtype, 3.0 if softcap else 1.0)
            cu = offsets(1, t, lengths).to(device)
            cu_q, own = None, (lambda x: x)
            if queries is not None:
                rows_q = tests.query_rows(lengths, queries).to(device)
                cu_q = offsets(1, sum(queries), queries).to(device)
                own = lambda x, rows_q=rows_q: x.index_select(1, rows_q)  # noqa: E731
            qo, doo = own(q), own(do)
            # the output gradient of every position that is not a query: zero
            do = torch.zeros_like(do).index_copy(1, rows_q, doo) if queries is not None else do
            got = run(qo, k, v, doo, cu, window, softcap, cubins, cu_q)
            jit = run(qo, k, v, doo, cu, window, softcap, host.jit, cu_q)
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            ref = reference(q64, k64, v64, cu.cpu(), "bthd", window, d ** -0.5, softcap)
            rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), do.double())
            want = (own(ref), own(rq), rk, rv)
            qc, kc, vc = (x.detach().requires_grad_() for x in (q, k, v))
            comp = reference(qc, kc, vc, cu.cpu(), "bthd", window, d ** -0.5, softcap, dtype)
            cq, ck, cv = torch.autograd.grad(comp, (qc, kc, vc), do)
            eager = (own(comp), own(cq), ck, cv)
            row = {
                "head_dim": d, "heads": [hq, hkv], "lengths": lengths, "queries": queries,
                "window": window, "softcap": softcap, "dtype": str(dtype).split(".")[1],
                "cubin_vs_f64": [rel(a, b) for a, b in zip(got, want)],
                "eager_vs_f64": [rel(a, b) for a, b in zip(eager, want)],
                "cubin_vs_jit": [rel(a, b) for a, b in zip(got, jit)],
            }
            row["ok"] = all(c <= 3 * e + 1e-6 for c, e in zip(row["cubin_vs_f64"], row["eager_vs_f64"]))
            rows.append(row)
            print(
                f"d{d} {hq}/{hkv} {dtype} window {window} cap {softcap}: cubin {max(row['cubin_vs_f64']):.1e}"
                f" eager {max(row['eager_vs_f64']):.1e} vs jit {max(row['cubin_vs_jit']):.1e}"
                f" {'ok' if row['ok'] else 'FAIL'}",
                flush=True,
            )
    return rows


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


SHAPES = [
    # name, B, T, Hq, Hkv, D
    ("qwen2-0.5b", 8, 1024, 14, 2, 64),
    ("qwen2-1.5b", 8, 1024, 12, 2, 128),
    ("smollm2-1.7b", 8, 1024, 32, 32, 64),
]

# Tile configurations `--tune` times: (BLOCK_M, BLOCK_N, num_warps, num_stages).
TUNE = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
        (64, 128, 4, 2)]


def speed(cubins):
    rows = []
    for name, b, t, hq, hkv, d in SHAPES:
        q, k, v, do = make(b, t, hq, hkv, d, "bthd", torch.bfloat16)
        cu = offsets(b, t, None).cuda()
        flops = 4 * b * hq * t * t * d / 2  # causal forward: QK^T and PV over half the square
        ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))

        def ours_fwd():
            with torch.no_grad():
                host.forward(q, k, v, cu, "bthd", launch=cubins)

        def ours_step():
            o = host.flash_attention(ql, kl, vl, cu, "bthd", 0, None, 0.0, False, cubins)
            torch.autograd.grad(o, (ql, kl, vl), do)

        qs, ks, vs, dos = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
        qsl, ksl, vsl = (x.detach().requires_grad_() for x in (qs, ks, vs))

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=hq != hkv)

        def sdpa_step():
            o = F.scaled_dot_product_attention(qsl, ksl, vsl, is_causal=True, enable_gqa=hq != hkv)
            torch.autograd.grad(o, (qsl, ksl, vsl), dos)

        r = {"shape": name, "B": b, "T": t, "heads": [hq, hkv], "head_dim": d}
        for key, fn, mult in (("fwd", ours_fwd, 1), ("step", ours_step, 3.5), ("sdpa_fwd", sdpa_fwd, 1), ("sdpa_step", sdpa_step, 3.5)):
            s = timed(fn)
            r[key + "_ms"] = s * 1e3
            r[key + "_tflops"] = flops * mult / s / 1e12
        r["fwd_vs_sdpa"] = r["sdpa_fwd_ms"] / r["fwd_ms"]
        r["step_vs_sdpa"] = r["sdpa_step_ms"] / r["step_ms"]
        rows.append(r)
        print(
            f"{name}: fwd {r['fwd_ms']:.2f} ms ({r['fwd_tflops']:.0f} TFLOP/s) vs sdpa {r['sdpa_fwd_ms']:.2f} ms"
            f" = {r['fwd_vs_sdpa']:.2f}x; fwd+bwd {r['step_ms']:.2f} ms vs {r['sdpa_step_ms']:.2f} ms"
            f" = {r['step_vs_sdpa']:.2f}x",
            flush=True,
        )
    return rows


def optimizer_speed(cubins, n=1 << 25):
    """One optimizer step over n values (one tensor, bf16 weights, gradients and dense
    moments): the committed cubins' dense step and 8-bit step (each with its norm and clipping
    launches) against torch's fused AdamW, in ms and in GB/s of the bytes each must move."""

    s = test_adamw.scalars(1e-5, 0.9, 0.999, 1e-8, 0.0, 3)
    w = torch.randn(n, device="cuda").to(torch.bfloat16)
    g = torch.randn(n, device="cuda").to(torch.bfloat16) * 1e-3

    class Dense:
        def __init__(self):
            self.w, self.decays = w.clone(), True
            self.m, self.v = torch.zeros_like(w), torch.zeros_like(w)

    # the tables built once: only the launches are timed, as refdpo's step uploads its tables
    # without waiting. The tables hold raw addresses: the tensors stay referenced here.
    held = (Dense(), test_adamw8.Eight(w.clone()))
    dense = test_adamw8.tables([held[0]], [], [g], [])
    eight = test_adamw8.tables([], [held[1]], [], [g])
    r = {"values": n}
    for key, t in (("dense_ms", dense), ("8bit_ms", eight)):
        r[key] = 1e3 * timed(lambda t=t: test_adamw8.launch_step(*t, s, 1.0, True, True, cubins), reps=10)
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    opt = torch.optim.AdamW([p], lr=1e-5, fused=True)
    r["torch_fused_ms"] = 1e3 * timed(opt.step, reps=10)
    # bytes: the norm reads g; the update reads w, g, m, v and writes w, m, v (2 bytes each
    # dense, 1 per 8-bit code)
    r["dense_gbps"] = n * (2 + 2 * 4 + 2 * 3) / (r["dense_ms"] / 1e3) / 1e9
    r["8bit_gbps"] = n * (2 + 2 * 2 + 2 + 2 * 2) / (r["8bit_ms"] / 1e3) / 1e9
    print(f"optimizer step over {n:,} values: dense {r['dense_ms']:.2f} ms ({r['dense_gbps']:.0f} GB/s), "
          f"8-bit {r['8bit_ms']:.2f} ms ({r['8bit_gbps']:.0f} GB/s), torch fused AdamW {r['torch_fused_ms']:.2f} ms",
          flush=True)
    return r


def tune(rows, saved=lambda: None):
    """Forward and forward+backward milliseconds per tile configuration (TUNE) at the benchmark
    shapes, through Triton's JIT with each configuration's warps and stages: the compiler the
    cubins come from, so the fastest is what flash_attn.CONFIGS should say. Each configuration's
    row is appended to `rows` and `saved()` is called, so a call cut off keeps what it timed."""
    import flash_attn

    for name, b, t, hq, hkv, d in SHAPES[:2]:
        q, k, v, do = make(b, t, hq, hkv, d, "bthd", torch.bfloat16)
        cu = offsets(b, t, None).cuda()
        ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))
        for bm, bn, warps, stages in TUNE:
            def launch(kernel, grid, args, consts, warps=warps, stages=stages):
                w, st = (4, 1) if kernel == "flash_bwd_delta" else (warps, stages)
                getattr(flash_attn, kernel)[grid](*args, **consts, num_warps=w, num_stages=st)

            def step():
                o = host.flash_attention(ql, kl, vl, cu, "bthd", 0, None, 0.0, False, launch)
                torch.autograd.grad(o, (ql, kl, vl), do)

            def fwd():
                with torch.no_grad():
                    host.forward(q, k, v, cu, "bthd", launch=launch)

            patch = _Patch()
            patch.setattr(host, "tiles", lambda d, interpret=False, bm=bm, bn=bn: (bm, bn))
            r = {"shape": name, "config": [bm, bn, warps, stages]}
            try:
                r["fwd_ms"], r["step_ms"] = timed(fwd) * 1e3, timed(step) * 1e3
            except Exception as e:  # noqa: BLE001 - e.g. more shared memory than the card has
                r["error"] = str(e)[-300:]
            finally:
                patch.restore()
            rows.append(r)
            saved()
            print(f"tune {name} {r['config']}: " + (
                f"fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['step_ms']:.2f} ms" if "error" not in r else r["error"]),
                flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tune", action="store_true", help="only time TUNE's tile configurations (JIT)")
    args = ap.parse_args()
    import triton

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}

    def save(name):
        """The report so far, written whole (a temporary renamed): a stage cut off by its time
        limit keeps every section done before it."""
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)

    def section(key, fn):
        """One section of the check: its result, or its error (never the end of the check)."""
        try:
            report[key] = fn()
        except Exception:  # noqa: BLE001 - reported, not fatal to the rest of the check
            report[key] = {"error": traceback.format_exc(limit=2)[-600:]}
        save("flash_check.json")

    if args.tune:
        report["tune"] = []
        tune(report["tune"], lambda: save("flash_tune.json"))
        save("flash_tune.json")
        return
    # What has never run on a GPU first (the committed cubins, then their timings); the JIT
    # tests, which the interpreter already runs on the CPU, last.
    try:
        cubins = Cubins()
        report["arch"] = cubins.arch
    except Exception:  # noqa: BLE001 - the cubins cannot load here: said, and the JIT tests still run
        report["cubins"] = {"error": traceback.format_exc(limit=2)[-600:]}
        cubins = None
    save("flash_check.json")
    if cubins is None:
        for key in ("correctness", "adamw_cubins", "adamw8_cubins"):
            report[key] = {"error": "the cubins did not load"}
    else:
        section("correctness", lambda: correctness(cubins))
    # The optimizer's committed cubins: f32 state bit for bit against the composed ops' op
    # order, the norm against f64, a non-finite norm changing nothing; then the 8-bit moments'
    # cubins in the launch sequence refdpo makes: bitsandbytes' codes, the CPU loops' bits beside
    # a dense tensor, bf16 weights and a non-finite norm.
    for key, label, cases in () if cubins is None else (
        ("adamw_cubins", "AdamW cubins", (test_adamw.test_f32_state_equals_the_composed_ops_and_torch_adamw,
                                          test_adamw.test_a_non_finite_norm_changes_nothing,
                                          test_adamw.test_bf16_weights_round_stochastically)),
        ("adamw8_cubins", "8-bit AdamW cubins",
         (test_adamw8.test_follows_bitsandbytes_adamw8bit,
          test_adamw8.test_equals_the_cpu_loops_beside_a_dense_tensor,
          test_adamw8.test_bf16_weights_round_stochastically_and_a_non_finite_norm_changes_nothing)),
    ):
        def run_cases(cases=cases):
            for case in cases:
                case(launch=cubins)
            return "ok"

        section(key, run_cases)
        print(f"{label}:", report[key], flush=True)
    if cubins is not None:
        section("speed", lambda: speed(cubins))
        section("optimizer_speed", lambda: optimizer_speed(cubins))
    if not args.skip_tests:
        def jit():
            passed, failures, skipped = jit_tests()
            print(f"JIT tests on the GPU: {passed} passed, {len(failures)} failed, {len(skipped)} skipped", flush=True)
            for f in failures:
                print(f, flush=True)
            return {"passed": passed, "failures": failures, "skipped": skipped}

        section("jit_tests", jit)
    correct = report["correctness"]
    report["all_ok"] = (
        isinstance(correct, list)
        and all(r["ok"] for r in correct)
        and not report.get("jit_tests", {}).get("failures")
        and "error" not in report.get("jit_tests", {})
        and report["adamw_cubins"] == "ok"
        and report["adamw8_cubins"] == "ok"
    )
    save("flash_check.json")
    print("all ok" if report["all_ok"] else "FAILURES: see flash_check.json")
    sys.exit(0 if report["all_ok"] else 1)


if __name__ == "__main__":
    main()
