#!/bin/bash
# MoBY pre-training on a Cloud TPU pod slice (TPU VMs): run from your workstation, in a
# checkout of this repository with requirements.txt and requirements-plan.txt installed.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a BUCKET=gs://my-bucket bash launch/tpu_pod.sh \
#       [--config.x=y ...]
#
# 1. Pre-flight, here: the run is planned for the slice's accelerator type
#    (python3 -m moby_jax.plan, the same construction train.py compiles, for the slice's
#    devices as libtpu describes them). A config that the slice cannot run (a batch its
#    devices do not divide, a queue that is not a multiple of the batch) fails in seconds,
#    one that does not fit a chip's HBM after one compile (minutes on a laptop), before
#    any TPU time is spent. PREFLIGHT=0 skips it.
# 2. Every TPU VM host installs the code in a Python 3.12 virtual environment (the TPU
#    software versions v2-alpha-tpuv6e, v2-alpha-tpuv5, v2-alpha-tpuv5-lite and
#    tpu-ubuntu2204-base are Ubuntu 22.04, whose Python 3.10 no JAX since 0.7 installs
#    on; uv brings a standalone 3.12) and runs the same command (--worker=all).
#    MOBY_DISTRIBUTED=1 makes train.py call jax.distributed.initialize(), which finds the
#    other hosts through the TPU metadata; the workdir and the data live in a bucket that
#    every host reads and writes (orbax, TFDS and the logs all go through etils.epath; the
#    VMs' service account needs access). A maintenance event sends SIGTERM: every host
#    saves the same step and exits 0; run this script again to resume.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG=${CONFIG:-configs/moby_swin_tiny.py}
REPO=${REPO:-https://github.com/your-org/moby_jax.git}
WORKDIR=${WORKDIR:-$BUCKET/runs/moby_swin_t}

if [ "${PREFLIGHT:-1}" != 0 ]; then
  TYPE=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
    --format='value(acceleratorType)')
  echo "pre-flight: planning $CONFIG for $TYPE"
  python3 -m moby_jax.plan --config "$CONFIG" --topology "$TYPE" "$@" \
    || { echo "pre-flight failed: not launching (PREFLIGHT=0 skips the check)"; exit 1; }
fi

# Once: the code and its requirements on every host (JAX's TPU build instead of the CPU one).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d moby_jax ] || git clone $REPO moby_jax
  cd moby_jax && git pull --ff-only
  python3 -m pip install -q --user uv
  [ -x ~/moby_venv/bin/python ] || ~/.local/bin/uv venv -q --seed --python 3.12 ~/moby_venv
  ~/moby_venv/bin/python -m pip install -q -r requirements-tpu.txt"

# The run (again after a preemption: it resumes).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd moby_jax && MOBY_DISTRIBUTED=1 ~/moby_venv/bin/python train.py --config $CONFIG \
    --workdir $WORKDIR --config.data.data_dir=$BUCKET/tfds $*"
