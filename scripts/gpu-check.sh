#!/usr/bin/env bash
# Check Den's GPU path on a host with NVIDIA GPUs, their driver and Den installed and running
# (docs/gpus.md). It talks to Den's HTTP API only, and removes the workspaces it made.
#
# Usage: DEN_URL=http://127.0.0.1:8080 DEN_TOKEN=den_... scripts/gpu-check.sh REPO_URL
#   REPO_URL  any repository Den may clone (a small one: nothing in it is used)
#   DEN_TOKEN an admin's API token (the check reads who holds which GPU)
# Environment:
#   GPU_CHECK_CUDA=0      skip the CUDA computation (it installs PyTorch from PyPI inside the
#                         workspace: the workspace needs network mode internet)
#   GPU_CHECK_IDLE_S=60   the idle timeout given to the idle-handling workspace
#
# Checks, each printed as it passes; the first failure stops the check (exit 1):
#  1. the host's driver lists GPUs and Den's inventory has them
#  2. a workspace asking for one GPU gets one; nvidia-smi inside lists exactly that GPU
#  3. a small CUDA computation inside gives the right answer
#  4. isolation: a second GPU workspace gets another GPU (or a 409 when none is free), and a
#     workspace without a GPU sees none
#  5. release: stopping the workspace gives its GPU back; starting takes it again
#  6. idle handling: an idle GPU workspace is stopped (not paused) and its GPU is free again
set -euo pipefail

REPO=${1:?usage: DEN_URL=... DEN_TOKEN=... $0 REPO_URL}
: "${DEN_URL:?set DEN_URL}" "${DEN_TOKEN:?set DEN_TOKEN (an admin token)}"
CUDA=${GPU_CHECK_CUDA:-1}
IDLE_S=${GPU_CHECK_IDLE_S:-60}
PREFIX="gpucheck-$$"

log() { printf 'gpu-check: %s\n' "$*"; }
fail() { printf 'gpu-check: FAILED: %s\n' "$*" >&2; exit 1; }
api() {  # api METHOD PATH [JSON] -> body on stdout; the HTTP status in $STATUS_FILE
    local body
    body=$(curl -sS -X "$1" -H "Authorization: Bearer $DEN_TOKEN" \
        -H 'Content-Type: application/json' -w '\n%{http_code}' \
        ${3:+--data "$3"} "$DEN_URL$2")
    printf '%s\n' "${body##*$'\n'}" >"$STATUS_FILE"
    printf '%s' "${body%$'\n'*}"
}
status() { cat "$STATUS_FILE"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }
run_in() {  # run_in WS_ID CMD -> stdout; fails on a non-zero exit
    local out
    out=$(api POST "/api/v1/workspaces/$1/exec" \
        "$(python3 -c 'import json,sys; print(json.dumps({"cmd": sys.argv[1], "timeout_s": 900}))' "$2")")
    [ "$(status)" = 200 ] || fail "exec in $1 answered $(status): $out"
    [ "$(printf '%s' "$out" | field 'd["exit_code"]')" = 0 ] \
        || fail "'$2' failed in $1: $(printf '%s' "$out" | field 'd["stderr"][-2000:]')"
    printf '%s' "$out" | field 'd["stdout"]'
}
create() {  # create NAME RESOURCES_JSON [EXTRA_JSON_FIELDS] -> workspace id (waits for running)
    local out id state
    out=$(api POST /api/v1/workspaces \
        "{\"name\": \"$1\", \"repo\": {\"url\": \"$REPO\"}, \"resources\": $2${3:+, $3}}")
    case $(status) in 201|202) ;; *) printf '%s' "$out"; return 1 ;; esac
    id=$(printf '%s' "$out" | field 'd["id"]')
    echo "$id" >>"$MADE_FILE"  # create runs in a subshell: the list is a file
    for _ in $(seq 1 600); do
        state=$(api GET "/api/v1/workspaces/$id" | field 'd["state"]')
        [ "$state" = running ] && { printf '%s' "$id"; return 0; }
        [ "$state" = error ] && fail "workspace $1 ended in error"
        sleep 1
    done
    fail "workspace $1 not running after 600 s"
}
cleanup() {
    local id
    while read -r id; do api DELETE "/api/v1/workspaces/$id" >/dev/null || true; done <"$MADE_FILE"
    rm -f "$STATUS_FILE" "$MADE_FILE"
}
STATUS_FILE=$(mktemp)
MADE_FILE=$(mktemp)
trap cleanup EXIT

# 1. -------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || fail "nvidia-smi is not on this host's PATH"
host_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
[ "$host_gpus" -ge 1 ] || fail "nvidia-smi lists no GPU"
inv=$(api GET /api/v1/gpus)
[ "$(status)" = 200 ] || fail "GET /api/v1/gpus answered $(status): $inv"
total=$(printf '%s' "$inv" | field 'd["total"]')
free0=$(printf '%s' "$inv" | field 'd["free"]')
[ "$total" -ge 1 ] || fail "Den's inventory is empty (DEN_GPUS? nvidia-ml-py?)"
[ "$(printf '%s' "$inv" | field 'd["gpus"] is not None')" = True ] || fail "DEN_TOKEN is not an admin's"
log "1. host lists $host_gpus GPU(s); Den hands out $total, $free0 free"

# 2. -------------------------------------------------------------------------------------
a=$(create "$PREFIX-a" '{"gpus": 1}' "\"idle_timeout_s\": 0") || fail "GPU create refused: $a"
mine=$(api GET "/api/v1/workspaces/$a" | field '",".join(d["resources"]["gpu_uuids"])')
[ -n "$mine" ] || fail "the workspace has no GPU recorded"
seen=$(run_in "$a" "nvidia-smi -L")
printf '%s\n' "$seen" | sed 's/^/    /'
[ "$(printf '%s\n' "$seen" | grep -c '^GPU ')" = 1 ] || fail "nvidia-smi inside lists not exactly one GPU"
printf '%s' "$seen" | grep -q "UUID: $mine" || fail "nvidia-smi inside shows another GPU than $mine"
log "2. workspace $a holds $mine and nvidia-smi inside lists exactly it"

# 3. -------------------------------------------------------------------------------------
if [ "$CUDA" = 1 ]; then
    # PyTorch's wheels from PyPI bring their own CUDA runtime (about 3 GB to download).
    run_in "$a" 'python3 -m pip install --quiet --user torch >/dev/null 2>&1 ||
                 python3 -m pip install --quiet --user --break-system-packages torch' >/dev/null
    got=$(run_in "$a" 'python3 -c "
import torch
assert torch.cuda.is_available() and torch.cuda.device_count() == 1, torch.cuda.device_count()
a = torch.arange(1024, dtype=torch.float64, device=\"cuda\").reshape(32, 32)
print(int((a @ a.T).sum().item()))"')
    want=$(python3 -c 'a=[[r*32+c for c in range(32)] for r in range(32)]
print(sum(sum(x*y for x,y in zip(a[i],a[j])) for i in range(32) for j in range(32)))')
    [ "$got" = "$want" ] || fail "CUDA matmul gave $got, want $want"
    log "3. CUDA computation inside (a PyTorch matmul on the GPU) is right: $got"
else
    log "3. CUDA computation skipped (GPU_CHECK_CUDA=0)"
fi

# 4. -------------------------------------------------------------------------------------
if [ "$free0" -ge 2 ]; then
    b=$(create "$PREFIX-b" '{"gpus": 1}' "\"idle_timeout_s\": 0") || fail "second GPU create refused: $b"
    seen_b=$(run_in "$b" "nvidia-smi -L")
    printf '%s' "$seen_b" | grep -q "$mine" && fail "the second workspace sees $mine"
    log "4. a second GPU workspace sees only its own GPU"
else
    out=$(api POST /api/v1/workspaces "{\"name\": \"$PREFIX-b\", \"repo\": {\"url\": \"$REPO\"}, \"resources\": {\"gpus\": 1}}")
    [ "$(status)" = 409 ] || fail "a second GPU create with none free answered $(status): $out"
    log "4. with no GPU free, a second GPU create is a 409: $(printf '%s' "$out" | field 'd["error"]["message"]')"
fi
c=$(create "$PREFIX-c" '{}' "\"idle_timeout_s\": 0") || fail "plain create refused: $c"
run_in "$c" 'if ls /dev/nvidia[0-9]* 2>/dev/null; then exit 1; fi; ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "' >/dev/null \
    || fail "a workspace without a GPU sees one"
log "4. a workspace without a GPU sees none"

# 5. -------------------------------------------------------------------------------------
free_now() { api GET /api/v1/gpus | field 'd["free"]'; }
before=$(free_now)
api POST "/api/v1/workspaces/$a/stop" >/dev/null
[ "$(free_now)" = $((before + 1)) ] || fail "stopping did not give the GPU back"
api POST "/api/v1/workspaces/$a/start" >/dev/null
[ "$(status)" = 200 ] || fail "start after stop answered $(status)"
[ "$(free_now)" = "$before" ] || fail "starting did not take the GPU again"
run_in "$a" "nvidia-smi -L" | grep -q "UUID: $mine" || fail "after a restart the GPU is not $mine"
log "5. stop gave the GPU back; start took the same GPU again"

# 6. -------------------------------------------------------------------------------------
api DELETE "/api/v1/workspaces/$a" >/dev/null
d=$(create "$PREFIX-d" '{"gpus": 1}' "\"idle_timeout_s\": $IDLE_S") || fail "idle create refused: $d"
action=$(api GET "/api/v1/workspaces/$d" | field 'd["idle_action"]')
log "6. idle action of a GPU workspace: $action; waiting for it (idle timeout ${IDLE_S} s)"
for _ in $(seq 1 $((IDLE_S * 4 + 120))); do
    state=$(api GET "/api/v1/workspaces/$d" | field 'd["state"]')
    [ "$state" = running ] || break
    sleep 1
done
want=stopped
[ "$action" = pause ] && want=paused
[ "$state" = "$want" ] || fail "the idle GPU workspace is $state, expected $want"
held=$(api GET /api/v1/gpus | field '[g["uuid"] for g in d["gpus"] if g["held_by"] and g["held_by"]["workspace_id"] == "'"$d"'"]')
[ "$held" = "[]" ] || fail "the idle workspace still holds $held"
log "6. the idle GPU workspace went $state and its GPU is free"
log "all checks passed"
