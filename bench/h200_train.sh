#!/usr/bin/env bash
# Train on a lent GPU machine (one H200, 16 cores, ~15 min of device time in all) and bring
# the weights back. Prepared here, run there; everything it writes goes to one folder.
#
# Here, once (the pack is ~55 MB, small enough to travel with the working tree; gpu/ is
# git-ignored, so name it in the device call's `carry`):
#   dosediff pack --split train=data/train-pats --split validation=data/validation-pats:5 \
#       --out gpu/openkbp.pack.xz
# There (the device tool's `run`, carry ["gpu"], timeout 600):
#   bash bench/h200_train.sh            # OUT defaults to $OUT, the folder that comes back
# Back here: join any split weights (cat best.safetensors.part-* > best.safetensors), check
# the card's checksum with `dosediff predict ... --model best.json`, then evaluate on all
# validation patients before the card is updated or the weights bundled.
#
# The device image has torch, numpy, scipy, safetensors, tqdm and matplotlib but not
# SimpleITK or pydicom; DoseDiffLib imports them only where images or DICOM are read
# (rehearsed here with both blocked: prepare --pack and train ran).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:?set OUT to the folder that should come back}
pack=${PACK:-gpu/openkbp.pack.xz}
preset=${PRESET:-small}
budget=${TRAIN_SECONDS:-480}
device=${DEVICE:-cuda}    # DEVICE=cpu PRESET=tiny TRAIN_SECONDS=30 rehearses the script here
# INIT=Resources/Models/dosediff-openkbp.json PRESET=tiny LR=3e-4 warm-starts from the bundled
# weights instead: the CPU hours stay, and so do both speed bars on 2 cores, which a `small`
# network misses for 8 DDIM steps
init=${INIT:-}
lr=${LR:-5e-4}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cache=$(mktemp -d)
mkdir -p "$out"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; \
  grep -m1 -o -w -E 'avx512f|avx2' /proc/cpuinfo | head -n 1; } | tee "$out/device.txt"
t0=$SECONDS
python3 -m DoseDiffLib.cli prepare --pack "$pack" --cache "$cache" --workers "$(nproc)" 2>&1 | tail -n 2
echo "cache built in $((SECONDS - t0)) s" | tee -a "$out/device.txt"
# the recipe of the bundled model's inputs and objective, on a bigger batch (and network, without INIT)
python3 -m DoseDiffLib.cli train --cache "$cache" --run "$out/run" --device "$device" \
    --set preset="$preset" --set prediction=x0 --set context=2 --set beams=True --set beam_mu=0.0045 \
    --set loss=l1 --set outside_weight=0.1 --set dvh_weight=0.5 --set last_step_fraction=0.5 \
    --set sampler=regression --set batch_size=64 --set lr="$lr" --set steps=100000 ${init:+--set init="$init"} \
    --set max_seconds="$budget" --set val_every=1000 --set val_patients=5 --set checkpoint_every=1000 \
    2>&1 | tail -n 5
rm -f "$out/run/checkpoint.pt"    # optimiser state: too big to bring back, not needed for the model
# the device tool returns files of at most 16 MiB: split larger ones
for f in "$out"/run/*.safetensors; do
    if [ "$(stat -c %s "$f")" -gt 15000000 ]; then split -b 15000000 -d "$f" "$f.part-" && rm "$f"; fi
done
ls -la "$out/run"
