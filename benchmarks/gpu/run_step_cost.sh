#!/usr/bin/env bash
# One prepared device run of benchmarks/step_cost.py at the paper's shapes (issue 6), for the lent GPU machine.
#
#   run from the repository root; writes under $OUT (or ./gpu_out when $OUT is unset):
#     step_cost_gpu.txt        the `--gpu-full` run (ghost engine, fp32 then bf16), full output
#     step_cost_gpu_fused.txt  if time is left: the LoRA setups on the opt-in `fuse_passes` engine (fp32, then bf16)
#     env.txt                  nvidia-smi, Python/torch/transformers/peft versions, the compatibility check
#
# The whole script stays under DEADLINE seconds (default 460) so that a 480 s device call returns every file.
# A peft wheel in .whl/ (optional, carried) is installed only if the device's own peft fails the 2-sample check.
set -u -o pipefail
DEADLINE=${DEADLINE:-460}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=python3
export PYTHONUNBUFFERED=1 PYTHONPATH=src
left() { echo $((DEADLINE - SECONDS)); }

{
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
    --format=csv
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0));
print('transformers', transformers.__version__)"
  $PY -m pip show peft torchvision 2>/dev/null | grep -E '^(Name|Version)'
} 2>&1 | tee "$OUT/env.txt"

# 2-sample check of the LoRA/transformers setups on the GPU (peft and transformers versions differ from the dev venv)
check() {
  timeout 90 $PY benchmarks/step_cost.py --dry-run --engines ghost --device cuda \
    --setups resnet18_32_lora vit_b16_224_lora_attn whisper_tiny_30s_lora gpt2_8x512_seq256_lora
}
if ! check 2>&1 | tee -a "$OUT/env.txt"; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== device peft failed the check: installing the carried wheel(s)" | tee -a "$OUT/env.txt"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=src:/tmp/site
    check 2>&1 | tee -a "$OUT/env.txt"
  fi
fi
echo "== check done at ${SECONDS} s" | tee -a "$OUT/env.txt"

echo "== step_cost --gpu-full (limit $(left) s)"
timeout "$(left)" $PY benchmarks/step_cost.py --gpu-full 2>&1 | tee "$OUT/step_cost_gpu.txt"
echo "== gpu-full rc=$? at ${SECONDS} s" | tee -a "$OUT/step_cost_gpu.txt"

LORA="resnet18_32_lora resnet18_224_lora vit_b16_224_lora_attn vit_b16_224_lora_mlp whisper_tiny_30s_lora
gpt2_8x512_seq256_lora"
for precision in "" "--bf16"; do
  if [ "$(left)" -gt 60 ]; then
    echo "== step_cost ghost_fused ${precision:-fp32} (limit $(left) s)" | tee -a "$OUT/step_cost_gpu_fused.txt"
    # shellcheck disable=SC2086
    timeout "$(left)" $PY benchmarks/step_cost.py --engines ghost_fused --setups $LORA $precision 2>&1 \
      | tee -a "$OUT/step_cost_gpu_fused.txt"
    echo "== rc=$? at ${SECONDS} s" | tee -a "$OUT/step_cost_gpu_fused.txt"
  fi
done
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw,memory.used --format=csv | tee -a "$OUT/env.txt"
echo "== done at ${SECONDS} s"
