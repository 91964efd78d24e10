#!/usr/bin/env bash
# Runs depth2d training on a Cloud TPU VM (single host or pod slice).
#
# The TPU VM image brings its own TPU build of TensorFlow (there is no
# TensorFlow 2.21 TPU wheel), so this script installs depth2d *without*
# replacing that TensorFlow: the package with --no-deps, then its other
# dependencies. Training flags are never set here: everything after `--`
# goes to `python3 -m trainer.main` unchanged, after `--strategy=tpu --tpu=local`.
set -euo pipefail

PROG="$(basename "$0")"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_FILE='~/depth2d-train.log'  # on the TPU VM workers, expanded there

usage() {
  cat <<EOF
usage: $PROG COMMAND NAME --zone=ZONE [options] [-- TRAINER_ARGS...]

commands:
  create   create the TPU VM NAME (or, with --queued, a queued resource NAME-qr)
           needs --accelerator-type (e.g. v5litepod-8, v5p-8, v6e-4, v4-8) and
           --version, the TPU VM runtime (e.g. tpu-vm-tf-2.18.0-pjrt for v4,
           v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  install  build this checkout as a wheel, copy it to every worker, install it
           (keeping the VM's TensorFlow)
  train    start python3 -m trainer.main --strategy=tpu --tpu=local TRAINER_ARGS
           on every worker (nohup, so it survives a dropped SSH) and stream the logs
  logs     stream the training log of every worker again
  delete   delete the TPU VM (with --queued: the queued resource and its VM)
  run      create, install, train; with --delete-after, delete when training ends

options:
  --zone=ZONE                  TPU zone, e.g. us-west4-a (required)
  --project=PROJECT            default: gcloud's configured project
  --accelerator-type=TYPE      create/run: TPU type and size
  --version=RUNTIME            create/run: TPU VM software version
  --queued                     use a queued resource (waits for capacity)
  --spot                       create/run: Spot capacity (can be preempted)
  --delete-after               run: delete the VM when training ends (also on failure)
  -h, --help                   this text

example:
  $PROG run my-tpu --zone=us-west4-a --accelerator-type=v5litepod-8 \\
      --version=v2-alpha-tpuv5-lite --queued --delete-after \\
      -- --model_dir=gs://BUCKET/runs/tpu1 --data_dir=gs://BUCKET/tfds
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

COMMAND=""
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
QUEUED=0
SPOT=0
DELETE_AFTER=0
TRAINER_ARGS=()

parse_args() {
  if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
  fi
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --) shift; TRAINER_ARGS=("$@"); break ;;
      --zone=*) ZONE="${1#*=}" ;;
      --project=*) PROJECT="${1#*=}" ;;
      --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
      --version=*) RUNTIME_VERSION="${1#*=}" ;;
      --zone|--project|--accelerator-type|--version)
        [[ $# -ge 2 ]] || die "$1 needs a value"
        case "$1" in
          --zone) ZONE="$2" ;;
          --project) PROJECT="$2" ;;
          --accelerator-type) ACCELERATOR_TYPE="$2" ;;
          --version) RUNTIME_VERSION="$2" ;;
        esac
        shift ;;
      --queued) QUEUED=1 ;;
      --spot) SPOT=1 ;;
      --delete-after) DELETE_AFTER=1 ;;
      -*) die "unknown option $1" ;;
      *)
        if [[ -z "$COMMAND" ]]; then COMMAND="$1"
        elif [[ -z "$NAME" ]]; then NAME="$1"
        else die "unexpected argument '$1' (trainer flags go after --)"
        fi ;;
    esac
    shift
  done

  case "$COMMAND" in
    create|install|train|logs|delete|run) ;;
    "") die "missing COMMAND" ;;
    *) die "unknown command '$COMMAND' (create, install, train, logs, delete, run)" ;;
  esac
  [[ -n "$NAME" ]] || die "missing NAME of the TPU VM"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "NAME '$NAME' must be lowercase letters, digits and dashes, starting with a letter"
  [[ -n "$ZONE" ]] || die "--zone is required"
  if [[ "$COMMAND" == create || "$COMMAND" == run ]]; then
    [[ -n "$ACCELERATOR_TYPE" ]] || die "$COMMAND needs --accelerator-type (e.g. v5litepod-8)"
    [[ -n "$RUNTIME_VERSION" ]] || die "$COMMAND needs --version (the TPU VM runtime)"
  fi
  if [[ ${#TRAINER_ARGS[@]} -gt 0 && "$COMMAND" != train && "$COMMAND" != run ]]; then
    die "trainer arguments after -- only go with train or run"
  fi
  if [[ "$DELETE_AFTER" == 1 && "$COMMAND" != run ]]; then
    die "--delete-after only goes with run"
  fi
  for arg in "${TRAINER_ARGS[@]}"; do
    case "$arg" in
      --strategy|--strategy=*|--tpu|--tpu=*)
        die "'$arg': this script runs the trainer with --strategy=tpu --tpu=local" ;;
    esac
  done
}

gcloud_tpu() {
  local args=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then args+=(--project="$PROJECT"); fi
  gcloud compute tpus "$@" "${args[@]}"
}

on_all_workers() {
  # One command on every host of the slice; output of all of them streams here.
  gcloud_tpu tpu-vm ssh "$NAME" --worker=all --command="$1"
}

create_vm() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  if [[ "$QUEUED" == 1 ]]; then
    echo "$PROG: requesting queued resource ${NAME}-qr ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
    gcloud_tpu queued-resources create "${NAME}-qr" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      state="$(gcloud_tpu queued-resources describe "${NAME}-qr" --format='value(state.state)')"
      case "$state" in
        FAILED|SUSPENDED) echo "$PROG: queued resource is $state" >&2; exit 1 ;;
        ACTIVE) ;;
        *) echo "$PROG: queued resource ${NAME}-qr is ${state:-unknown}; waiting"; sleep 30 ;;
      esac
    done
  else
    echo "$PROG: creating TPU VM $NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
    gcloud_tpu tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

install_package() {
  local wheel_dir wheel
  wheel_dir="$(mktemp -d)"
  echo "$PROG: building a wheel of $REPO_ROOT"
  python3 -m pip wheel --quiet --no-deps --wheel-dir="$wheel_dir" "$REPO_ROOT"
  wheel="$(ls "$wheel_dir"/depth2d-*.whl)"
  echo "$PROG: copying $(basename "$wheel") to every worker of $NAME"
  gcloud_tpu tpu-vm scp "$wheel" "$NAME":/tmp/ --worker=all
  rm -rf "$wheel_dir"
  # --no-deps keeps the VM's TPU TensorFlow; then install the other
  # requirements the wheel declares (not tensorflow/tensorboard, not extras).
  on_all_workers "set -e
    python3 -m pip install --quiet --force-reinstall --no-deps /tmp/$(basename "$wheel")
    python3 - > /tmp/depth2d-requirements.txt <<'PY'
import importlib.metadata, re
for req in importlib.metadata.requires('depth2d') or []:
    name = re.match(r'[A-Za-z0-9._-]+', req).group(0).lower()
    if 'extra ==' not in req and name not in ('tensorflow', 'tensorboard'):
        print(req.split(';')[0].strip())
PY
    python3 -m pip install --quiet -r /tmp/depth2d-requirements.txt
    python3 -c 'import tensorflow as tf, trainer; print(\"depth2d installed; TensorFlow\", tf.__version__)'"
}

quoted_trainer_args() {
  local quoted=""
  for arg in "${TRAINER_ARGS[@]}"; do
    quoted+=" $(printf '%q' "$arg")"
  done
  printf '%s' "$quoted"
}

train() {
  echo "$PROG: starting the trainer on every worker of $NAME; log: $LOG_FILE on each"
  # nohup + background: a dropped SSH connection does not stop training;
  # tail --pid streams the log until the trainer exits, then reports its status.
  on_all_workers "nohup python3 -m trainer.main --strategy=tpu --tpu=local$(quoted_trainer_args) \
      > $LOG_FILE 2>&1 &
    pid=\$!
    tail -n +1 -f --pid=\$pid $LOG_FILE
    wait \$pid"
}

logs() {
  on_all_workers "tail -n 100 -f $LOG_FILE"
}

delete_vm() {
  if [[ "$QUEUED" == 1 ]]; then
    echo "$PROG: deleting queued resource ${NAME}-qr and its TPU VM"
    gcloud_tpu queued-resources delete "${NAME}-qr" --force --quiet
  else
    echo "$PROG: deleting TPU VM $NAME"
    gcloud_tpu tpu-vm delete "$NAME" --quiet
  fi
}

main() {
  parse_args "$@"
  command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"
  case "$COMMAND" in
    create) create_vm ;;
    install) install_package ;;
    train) train ;;
    logs) logs ;;
    delete) delete_vm ;;
    run)
      create_vm
      if [[ "$DELETE_AFTER" == 1 ]]; then
        # A TPU left running costs money by the hour: delete on every exit path.
        trap delete_vm EXIT
      fi
      install_package
      train ;;
  esac
}

main "$@"
