#!/usr/bin/env bash
# Create, set up and run gtpo_jax on a Cloud TPU VM slice (every worker), with a preemption
# supervisor. Every gcloud call goes through `run`, so --dry-run prints them all instead.
#
#   launch/tpu_vm.sh [options] COMMAND
#
# Commands:
#   create     create the slice (on-demand, or --spot)
#   setup      copy this checkout (or clone --repo) to every worker and install requirements
#   run        start the training command on every worker (logs per worker, resume=auto)
#   status     the slice's state (READY, PREEMPTED, ...)
#   logs       the last lines of one worker's log (--worker N, default 0)
#   stop       SIGTERM the trainer on every worker (it checkpoints, then exits)
#   delete     delete the slice
#   supervise  loop: if the slice is preempted or gone, recreate it, set it up and run again
#              (the trainer resumes from the latest checkpoint in --run-dir)
#
# Options (or the environment variable in brackets):
#   --name NAME          slice name                               [TPU_NAME, default gtpo-jax]
#   --zone ZONE          e.g. us-central2-b, us-west4-a           [TPU_ZONE, required]
#   --type TYPE          v4-8, v5litepod-16, v5p-32, v6e-8, ...   [TPU_TYPE, required]
#   --project PROJECT    gcloud project                           [TPU_PROJECT, default: gcloud's]
#   --version VERSION    TPU software version (default: per generation)
#   --spot               request a spot (preemptible) slice
#   --repo URL           clone this git URL instead of copying the checkout
#   --config FILE        experiment config (default configs/qwen2_5_7b_dapo_math.py)
#   --run-dir DIR        where checkpoints and metrics go; a gs:// bucket or a shared disk
#   --args "..."         more --config.x.y=v overrides for the trainer
#   --worker N           worker for `logs` (default 0)
#   --interval SECONDS   supervisor polling period (default 60)
#   --once               supervisor: one pass only (for testing)
#   --dry-run            print every gcloud command instead of running it
set -euo pipefail

NAME="${TPU_NAME:-gtpo-jax}"
ZONE="${TPU_ZONE:-}"
TYPE="${TPU_TYPE:-}"
PROJECT="${TPU_PROJECT:-}"
VERSION=""
SPOT=0
REPO=""
CONFIG="configs/qwen2_5_7b_dapo_math.py"
RUN_DIR=""
EXTRA_ARGS=""
WORKER=0
INTERVAL=60
ONCE=0
DRY_RUN=0
REMOTE_DIR="gtpo_jax"
LOG_DIR="gtpo_jax_logs"

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# Prints the command (quoted so it can be pasted) and runs it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" -eq 0 ]]; then
    "$@"
  fi
}

COMMAND=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --repo) REPO="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --args) EXTRA_ARGS="$2"; shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    --interval) INTERVAL="$2"; shift 2 ;;
    --once) ONCE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    create|setup|run|status|logs|stop|delete|supervise) COMMAND="$1"; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$COMMAND" ]] || die "no command given; one of create setup run status logs stop delete supervise"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
[[ -n "$TYPE" ]] || die "--type (or TPU_TYPE) is required, e.g. v4-8, v5litepod-16, v5p-32, v6e-8"

# Hosts (workers) of a slice. v4 / v5p names count TensorCores (2 per chip), v5e / v6e count
# chips; a host has 4 chips, except single-host v5e / v6e slices of up to 8 chips.
workers_for() {
  local generation="${1%-*}" size="${1##*-}" chips
  [[ "$size" =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$1'"
  case "$generation" in
    v4|v5p) chips=$((size / 2)) ;;
    v5litepod|v5e|v6e) chips=$size; if [[ "$chips" -le 8 ]]; then echo 1; return; fi ;;
    *) die "unknown TPU generation '$generation' (expected v4, v5litepod, v5p or v6e)" ;;
  esac
  if [[ "$chips" -le 4 ]]; then echo 1; else echo $((chips / 4)); fi
}

default_version() {
  case "${1%-*}" in
    v4) echo "tpu-ubuntu2204-base" ;;
    v5litepod|v5e) echo "v2-alpha-tpuv5-lite" ;;
    v5p) echo "v2-alpha-tpuv5" ;;
    v6e) echo "v2-alpha-tpuv6e" ;;
  esac
}

WORKERS=$(workers_for "$TYPE")
VERSION="${VERSION:-$(default_version "$TYPE")}"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then WHERE+=(--project="$PROJECT"); fi

# The training command every worker runs: same arguments everywhere; jax.distributed finds
# the other workers from the TPU metadata. resume=auto makes a restart continue, not restart.
train_command() {
  local run_dir_arg=""
  if [[ -n "$RUN_DIR" ]]; then run_dir_arg="--config.train.run_dir=$RUN_DIR"; fi
  echo "cd ~/$REMOTE_DIR && mkdir -p ~/$LOG_DIR && nohup python3 -m gtpo_jax.train --config=$CONFIG" \
    "$run_dir_arg --config.train.resume=auto $EXTRA_ARGS > ~/$LOG_DIR/train.log 2>&1 < /dev/null &"
}

ssh_all() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

do_create() {
  local spot=()
  if [[ "$SPOT" -eq 1 ]]; then spot=(--spot); fi
  run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION" "${spot[@]}"
}

do_setup() {
  local install="cd ~/$REMOTE_DIR && python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2' -e ."
  if [[ -n "$REPO" ]]; then
    ssh_all "if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR pull --ff-only; else git clone $REPO ~/$REMOTE_DIR; fi"
  else
    local root
    root="$(cd "$(dirname "$0")/.." && pwd)"
    run "${GCLOUD[@]}" scp --recurse "$root" "$NAME:~/$REMOTE_DIR" "${WHERE[@]}" --worker=all
  fi
  ssh_all "$install"
}

do_run() { ssh_all "$(train_command)"; }

do_status() { run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state)"; }

do_logs() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$WORKER" --command="tail -n 200 ~/$LOG_DIR/train.log"; }

do_stop() { ssh_all "pkill -TERM -f gtpo_jax.train || true"; }

do_delete() { run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

# One supervisor pass: READY and training -> nothing; READY, not training -> run;
# PREEMPTED / missing -> delete what is left, create, set up, run (resume=auto).
supervise_once() {
  local state
  if [[ "$DRY_RUN" -eq 1 ]]; then
    do_status
    state="PREEMPTED"
    echo "# dry run: assuming state $state"
  else
    state="$(do_status 2>/dev/null || echo MISSING)"
  fi
  case "$state" in
    READY)
      if ! run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="pgrep -f gtpo_jax.train" >/dev/null; then
        do_run
      fi ;;
    CREATING|STARTING|RESTARTING|REPAIRING) echo "# slice is $state; waiting" ;;
    *)
      echo "# slice is $state: recreating it and resuming from the latest checkpoint"
      if [[ "$state" != "MISSING" ]]; then do_delete; fi
      do_create
      do_setup
      do_run ;;
  esac
}

echo "# slice $NAME: $TYPE in $ZONE, $WORKERS worker(s), version $VERSION$([[ $SPOT -eq 1 ]] && echo ', spot')"
case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  status) do_status ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  supervise)
    while true; do
      supervise_once
      if [[ "$ONCE" -eq 1 || "$DRY_RUN" -eq 1 ]]; then break; fi
      sleep "$INTERVAL"
    done ;;
esac
