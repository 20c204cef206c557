"""Runs a command and prints JSON {seconds, peak_rss_mib, rc}: the wall time of the whole process
and the peak resident memory of the child (getrusage). usage: python bench/measure.py -- CMD..."""
import json
import resource
import subprocess
import sys
import time

cmd = sys.argv[sys.argv.index("--") + 1 :]
start = time.perf_counter()
rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "rc": rc}))
sys.exit(rc)
