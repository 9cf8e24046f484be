#!/usr/bin/env bash
# Debian's SLURM and munge for tests/test_slurm.py (which starts its own private cluster),
# when missing and this is root with apt-get (CI, containers); elsewhere the test is skipped
# and says why. Never fails the set-up.
command -v slurmctld >/dev/null && exit 0
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "SLURM not installed (needs root and apt-get): tests/test_slurm.py will be skipped"
  exit 0
fi
packages=(slurmctld slurmd slurm-client munge)
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 ||
  { apt-get update -q >/dev/null 2>&1 &&
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1; } ||
  echo "SLURM could not be installed: tests/test_slurm.py will be skipped"
exit 0
