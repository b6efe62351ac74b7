#!/bin/sh
# Compiles qpc_8cores_1BS_128PL_2048CL_1devices_fp16 for Cloud AI 100 (written by qeff). Runs from anywhere:
# the files it names sit next to this script.
set -e
cd "$(dirname "$0")"
rm -rf qpcs
exec {compiler} \
    -m={onnx} \
    -aic-hw \
    -aic-hw-version=ai100 \
    -network-specialization-config=specializations.json \
    -convert-to-fp16 \
    -retained-state \
    -aic-num-cores=8 \
    -custom-IO-list-file=custom_io.yaml \
    -compile-only \
    -aic-binary-dir=qpcs \
    -aic-enable-depth-first \
    -stats-level=70 \
    -aic-perf-metrics
