#!/usr/bin/env bash
# Installs Open MPI when it is missing: Debian's openmpi-bin (mpirun, and libmpi.so.40 through its
# dependency libopenmpi3), which the distributed-training tests launch `lora train` with. A no-op
# when it is present. Run as root, or with sudo available.
set -euo pipefail
exec "$(dirname "$0")/install-vulkan.sh" openmpi-bin
