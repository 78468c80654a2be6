#!/usr/bin/env bash
# Every GPU measurement the ACAM-KD core issue (and the detection and segmentation issues'
# training costs) asks for, in one call (about 6-8 minutes on an H100/H200; the pip install of
# segmentation-models-pytorch needs its wheel carried, the image has timm). Writes JSON and logs to $OUT (or ./gpu_out). Usage on the device machine:
#   pip install --no-deps -e . && bash benchmarks/gpu_core.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -m pytest -q tests/test_acam_cuda.py tests/test_acam_equivalence.py -x 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
B="python -m acamkd.cli bench acam --device cuda --batch 2 --image 800x1333 --dtype bf16 --json"
# 1. RetinaNet P3-P7: floor, fast (eager), reference
$B --detector retinanet > "$OUT/retina_bf16.json" 2> "$OUT/retina_bf16.err"
# 2. the same, fast path compiled (fuses elementwise work; reduce-overhead adds CUDA graphs)
$B --detector retinanet --variants fast --compile default --no-check-finite > "$OUT/retina_bf16_compile.json" 2>> "$OUT/compile.err"
$B --detector retinanet --variants fast --compile reduce-overhead --no-check-finite > "$OUT/retina_bf16_cudagraph.json" 2>> "$OUT/compile.err"
$B --detector retinanet --variants fast --no-check-finite > "$OUT/retina_bf16_nocheck.json" 2>> "$OUT/compile.err"
$B --detector retinanet --variants floor,fast --attention-layout single > "$OUT/retina_bf16_single.json" 2>> "$OUT/compile.err"
# 3. Faster R-CNN P2-P6 (P2: 67,200 positions; the reference is reported as not fitting)
$B --detector fasterrcnn > "$OUT/frcnn_bf16.json" 2> "$OUT/frcnn_bf16.err"
# 3b. Segmentation logits (issue 5): C = M = 19 on the 64x128 grid of a 512x1024 crop, batch 8
$B --detector segmenter --channels 19 --num-masks 19 --image 512x1024 --batch 8 > "$OUT/seg_logits_bf16.json" 2> "$OUT/seg_logits_bf16.err"
# 4. Detection training cost (issue 4): student step, teacher forward, distillation step,
#    RetinaNet R101 -> R50, 1333x800, batch 2, bf16; goal distill <= 1.15 x (student + teacher)
python -m acamkd.cli bench distill --device cuda --image 800x1333 --batch 2 --dtype bf16 --json > "$OUT/distill_bf16.json" 2> "$OUT/distill.err"
# 5. Segmentation training cost (issue 5): student step, teacher (DeepLabV3-R101) logits, distillation
#    step with ACAM-KD on the 19-class logits, 512x1024, batch 8, bf16, for the paper's three students
D="python -m acamkd.cli bench distill --task seg --device cuda --image 512x1024 --batch 8 --dtype bf16 --json"
$D --arch deeplabv3 --student resnet18 > "$OUT/distill_seg_dlv3_r18_bf16.json" 2> "$OUT/distill_seg.err"
$D --arch deeplabv3 --student mobilenet_v2 > "$OUT/distill_seg_dlv3_mbv2_bf16.json" 2>> "$OUT/distill_seg.err"
$D --arch pspnet --student resnet18 > "$OUT/distill_seg_psp_r18_bf16.json" 2>> "$OUT/distill_seg.err"
# 6. RepPoints (issue 14): RepPoints-R50 training step and its ACAM-KD distillation from RepPoints-R101,
#    1333x800, batch 2, bf16 (images/s and peak memory of each)
python -m acamkd.cli bench distill configs/det/reppoints_r101_r50_acam.yaml --device cuda --image 800x1333 --batch 2 \
  --dtype bf16 --json > "$OUT/distill_reppoints_bf16.json" 2> "$OUT/distill_reppoints.err"
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
from acamkd.bench.acam import format_report
for f in sorted(out.glob("*.json")):
    if f.name.startswith("distill"):
        print(f"== {f.name}\n{f.read_text()}")
        continue
    try:
        print(f"== {f.name}\n" + format_report(json.loads(f.read_text())))
    except Exception as err:  # noqa: BLE001 - a summary must not hide the other files
        print(f"== {f.name}: unreadable ({err})")
PY
