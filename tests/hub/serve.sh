#!/usr/bin/env bash
# A Hugging Face Hub protocol server on localhost over local git repositories, for the hub test:
# two olah 0.5.4 instances chained.
#   origin: offline, serves the git repositories under MIRRORS/{models,datasets}/<org>/<name>;
#   front:  online, with the origin as its "huggingface.co"; HF_ENDPOINT points here.
# The front answers through olah's proxy path, which speaks the whole protocol hf-hub 0.4's sync
# client needs (a ranged GET answered 206 with Content-Range, ETag and X-Repo-Commit); the origin
# alone answers a ranged GET with a plain 200 and none of them.
# usage: serve.sh OLAH_CLI MIRRORS WORK ORIGIN_PORT FRONT_PORT   (prints the two pids)
set -euo pipefail
OLAH=$1; MIRRORS=$2; WORK=$3; OP=$4; FP=$5
mkdir -p "$WORK/origin" "$WORK/front"
cat > "$WORK/origin/olah.toml" <<TOML
[basic]
host = "127.0.0.1"
port = $OP
repos-path = "$WORK/origin/repos"
mirrors-path = ["$MIRRORS"]
mirror-netloc = "127.0.0.1:$OP"
mirror-lfs-netloc = "127.0.0.1:$OP"
[accessibility]
offline = true
TOML
cat > "$WORK/front/olah.toml" <<TOML
[basic]
host = "127.0.0.1"
port = $FP
repos-path = "$WORK/front/repos"
hf-scheme = "http"
hf-netloc = "127.0.0.1:$OP"
hf-lfs-netloc = "127.0.0.1:$OP"
mirror-netloc = "127.0.0.1:$FP"
mirror-lfs-netloc = "127.0.0.1:$FP"
metadata-cache-ttl = 0
cache-block-size = "128MB"
[accessibility]
offline = false
TOML
noproxy=(env -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u http_proxy -u https_proxy -u all_proxy)
"${noproxy[@]}" "$OLAH" -c "$WORK/origin/olah.toml" --log-path "$WORK/origin/logs" > "$WORK/origin/server.log" 2>&1 &
echo $! > "$WORK/origin/pid"
"${noproxy[@]}" "$OLAH" -c "$WORK/front/olah.toml" --log-path "$WORK/front/logs" > "$WORK/front/server.log" 2>&1 &
echo $! > "$WORK/front/pid"
for port in $OP $FP; do # the TCP port (olah 0.5.4 answers 500 on `/`)
  for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
# Offline olah answers /api/<type>/<org>/<repo> (no revision; the front asks it first) only from
# its own metadata cache, never from the mirrors: seed it with each repo's revision answer.
for type in models datasets; do
  [ -d "$MIRRORS/$type" ] || continue
  for d in "$MIRRORS/$type"/*/*; do
    [ -d "$d/.git" ] || continue
    repo=${d#"$MIRRORS/$type/"}
    sha=$(git -C "$d" rev-parse HEAD)
    out="$WORK/origin/repos/api/$type/$repo/revision/$sha/meta_head.json"
    mkdir -p "$(dirname "$out")"
    "${noproxy[@]}" python3 -c 'import sys, urllib.request
open(sys.argv[2], "wb").write(urllib.request.urlopen(sys.argv[1], timeout=30).read())' \
      "http://127.0.0.1:$OP/api/$type/$repo/revision/$sha" "$out"
  done
done
echo "$(cat "$WORK/origin/pid") $(cat "$WORK/front/pid")"
