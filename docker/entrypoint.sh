#!/usr/bin/env bash
# Container entrypoint; also runs outside a container, from the repository root.
#
#   entrypoint.sh [launch] [--config_file F] [--script S] [--dry_run] -- [script args]
#       start this node's share of the run: htmuon_dist/cluster/launch_env.py reads SLURM,
#       Kubernetes PyTorchJob or MASTER_ADDR/NODE_RANK/NNODES/NPROC_PER_NODE variables and
#       execs `accelerate launch --num_machines ... --machine_rank ... script args`
#   entrypoint.sh COMMAND [ARGS...]
#       anything else runs as is (bash, python, pytest, nvidia-smi ...)
#
# The mapping lives in Python (unit-tested in tests/test_cluster_env.py); this stays a thin shim.
set -euo pipefail

PYTHON=${PYTHON:-python3}

case "${1:-}" in
  "")
    exec "$PYTHON" -m htmuon_dist.cluster.launch_env --help
    ;;
  launch)
    shift
    exec "$PYTHON" -m htmuon_dist.cluster.launch_env "$@"
    ;;
  -*)
    exec "$PYTHON" -m htmuon_dist.cluster.launch_env "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
