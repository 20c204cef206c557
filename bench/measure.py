"""Runs a command and prints JSON {seconds, user_s, sys_s, peak_rss_mib, rc}: the wall time of the
whole process, the CPU time its processes spent in user code and in the kernel, and the peak
resident memory of the child (getrusage). usage: python bench/measure.py -- CMD..."""
import json
import resource
import subprocess
import sys
import time

cmd = sys.argv[sys.argv.index("--") + 1 :]
start = time.perf_counter()
rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "seconds": seconds,
    "user_s": usage.ru_utime,
    "sys_s": usage.ru_stime,
    "peak_rss_mib": usage.ru_maxrss / 1024,
    "rc": rc,
}))
sys.exit(rc)
