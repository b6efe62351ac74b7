#!/bin/sh
# Compiles qpc_14cores_4BS_64PL_1024CL_2MOS_4devices_mxfp6_mxint8 for Cloud AI 100 (written by qeff). Runs from anywhere:
# the files it names sit next to this script.
set -e
cd "$(dirname "$0")"
rm -rf qpcs
exec {compiler} \
    -m={onnx} \
    -aic-hw \
    -aic-hw-version=2.0 \
    -network-specialization-config=specializations.json \
    -convert-to-fp16 \
    -retained-state \
    -aic-num-cores=14 \
    -custom-IO-list-file=custom_io.yaml \
    -compile-only \
    -aic-binary-dir=qpcs \
    -mxfp6-matmul \
    -mos=2 \
    -aic-enable-depth-first \
    -mdp-load-partition-config=mdp_ts_4.json
