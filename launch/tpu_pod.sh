#!/bin/bash
# MoBY pre-training on a Cloud TPU pod slice (TPU VMs): run from your workstation.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket bash launch/tpu_pod.sh
#
# Every TPU VM host runs the same command (--worker=all). MOBY_DISTRIBUTED=1 makes
# train.py call jax.distributed.initialize(), which finds the other hosts through the TPU
# metadata; the workdir and the data live in a bucket that every host reads and writes
# (orbax, TFDS and the logs all go through etils.epath; the VMs' service account needs
# access). A maintenance event sends SIGTERM: every host saves the same step and exits 0;
# run this script again to resume.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG=${CONFIG:-configs/moby_swin_tiny.py}
REPO=${REPO:-https://github.com/your-org/moby_jax.git}

# Once: the code and its requirements on every host (jax for TPU instead of the CPU build).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d moby_jax ] || git clone $REPO moby_jax
  cd moby_jax && git pull --ff-only
  python3 -m pip install -q -r requirements.txt
  python3 -m pip install -q 'jax[tpu]==0.10.2'"

# The run (again after a preemption: it resumes).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd moby_jax && MOBY_DISTRIBUTED=1 python3 train.py --config $CONFIG \
    --workdir $BUCKET/runs/moby_swin_t --config.data.data_dir=$BUCKET/tfds $*"
