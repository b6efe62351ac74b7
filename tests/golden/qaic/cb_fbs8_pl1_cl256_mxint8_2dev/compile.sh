#!/bin/sh
# Compiles qpc_16cores_1BS_1PL_256CL_8FBS_2devices_fp16_mxint8 for Cloud AI 100 (written by qeff). Runs from anywhere:
# the files it names sit next to this script.
set -e
cd "$(dirname "$0")"
rm -rf qpcs
exec /opt/qti-aic/exec/qaic-exec \
    -m={onnx} \
    -aic-hw \
    -aic-hw-version=2.0 \
    -network-specialization-config=specializations.json \
    -convert-to-fp16 \
    -retained-state \
    -aic-num-cores=16 \
    -custom-IO-list-file=custom_io.yaml \
    -compile-only \
    -aic-binary-dir=qpcs \
    -mdp-load-partition-config=mdp_ts_2.json
