"""The block-reducing kernels of `../kernels.cu` under ThreadSanitizer: `test_kernels_cu.py`'s cases
for them (f32, blocks of at most 256 threads) rerun in a process that preloads libtsan, with the
emulator built `-fsanitize=thread`. A barrier missing between two threads' use of the same shared
memory (`__syncthreads`, or a warp's shuffle) is reported whether or not the threads' timing
happened to expose it; the kernels' values are held by the cases themselves. torch runs on one
thread there, so that its own (uninstrumented) OpenMP threads report nothing.
"""

import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# The kernels with shared memory and barriers; the 1024-thread cases only cost time here.
SELECT = "f32 and not wf32 and not 1024 and (attn_softmax or rms_norm or logp_lse)"


def libtsan():
    cxx = os.environ.get("CXX", "g++")
    out = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_no_two_threads_race_on_shared_memory():
    if os.environ.get("REFDPO_EMU_SANITIZE"):
        pytest.skip("this is the sanitized run's own collection")
    lib = libtsan()
    if lib is None:
        msg = ("no libtsan.so beside the C++ compiler (Debian: libgcc-12-dev): "
               "the race check did not run")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", REFDPO_EMU_SANITIZE="thread",
                   LD_PRELOAD=lib,
                   TSAN_OPTIONS=f"halt_on_error=1 exitcode=66 log_path={tmp}/tsan")
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "test_kernels_cu.py", "-k", SELECT],
                             cwd=HERE, env=env, capture_output=True, text=True)
        reports = "".join(open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)))
    assert run.returncode == 0, f"{reports[:6000]}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 15, run.stdout[-2000:]
