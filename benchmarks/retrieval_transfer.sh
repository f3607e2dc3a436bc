#!/usr/bin/env bash
# Domain transfer by swapping the datastore (issue 25): a model trained with retrieval on domain A
# captions domain B, whose captions it never saw, from B's datastore. Tiny models, CPU, one thread,
# about 2 minutes alone; the same set-up as tests/test_retrieval_augmented.py.
#   benchmarks/retrieval_transfer.sh WORKDIR     (a new folder; SEED=1 etc. for another seed)
# Results: benchmarks/results/retrieval-transfer/transfer.txt
set -euo pipefail
W=${1:?usage: $0 WORKDIR (a new folder)}; NA=${NA:-360}; NB=${NB:-300}; EPOCHS=${EPOCHS:-12}; SEED=${SEED:-0}
mkdir "$W"; cd "$W"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
A=red:green,red:blue,red:yellow,green:blue,green:yellow,green:purple,blue:yellow,blue:purple,blue:orange,yellow:purple,yellow:orange,purple:red,purple:orange,orange:red,orange:green
B=green:red,blue:red,yellow:red,blue:green,yellow:green,purple:green,yellow:blue,purple:blue,orange:blue,purple:yellow,orange:yellow,red:purple,orange:purple,red:orange,green:orange
# 1. Two domains: A holds one orientation of each pair of six colours, B the other.
prefixcap synth A --num-images $NA --image-size 16 --seed 1 --pairs $A
prefixcap synth B --num-images $NB --image-size 16 --seed 2 --pairs $B
# 2. Tiny random CLIP and GPT-2; the CLIP's projections are taught that images go with their captions
#    (what a real CLIP knows from pretraining; the caption models never see B).
python - <<'PY'
from prefixcap.data import load_records
from prefixcap.testing import align_clip, build_learnable_components
clip, _ = build_learnable_components("models")
train = [r for r in load_records("A/captions.jsonl") + load_records("B/captions.jsonl") if r.split == "train"]
align_clip(clip, [r.image for r in train], [r.captions[0] for r in train])
PY
# 3. Features of A; a datastore of each domain's train captions.
prefixcap prepare A/captions.jsonl --out featA --vision-encoder models/clip --workers 0
prefixcap datastore build A/captions.jsonl --split train --out dsA --encoder models/clip --device cpu
prefixcap datastore build B/captions.jsonl --split train --out dsB --encoder models/clip --device cpu
# 4. Train on A: with retrieval and prefix dropout; with retrieval only; without retrieval.
COMMON="--decoder models/gpt2 --prefix-length 4 --epochs $EPOCHS --batch-size 16 --lr 3e-3 --val-images 0 --best-metric loss --seed $SEED"
prefixcap train featA --out run-pd $COMMON --datastore dsA --retrieve-k 2 --retrieval-template "{captions} a photo of" --prefix-dropout 0.5
prefixcap train featA --out run-r0 $COMMON --datastore dsA --retrieve-k 2 --retrieval-template "{captions} a photo of"
prefixcap train featA --out run-plain $COMMON
# 5. Caption B's test images (and A's) and score them: CIDEr-D etc. in eval-*/metrics.json.
ev() { prefixcap evaluate --model "$1" --data "$2/captions.jsonl" --split test --device cpu --dtype float32 --workers 0 --metrics bleu,cider --out "$3" "${@:4}"; }
ev run-pd/last B eval-pd-dsB --datastore dsB
ev run-pd/last B eval-pd-none
ev run-pd/last B eval-pd-dsA --datastore dsA
ev run-r0/last B eval-r0-dsB --datastore dsB
ev run-plain/last B eval-plain
ev run-pd/last A eval-pd-A --datastore dsA
ev run-plain/last A eval-plain-A
# 6. Held-out exact match: each caption against its image's reference.
python - <<'PY'
import json
from pathlib import Path
refs = {}
for domain in "AB":
    for line in Path(f"{domain}/captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        refs[domain, row["image"]] = row["caption"]
for run, domain in [("eval-pd-dsB", "B"), ("eval-pd-none", "B"), ("eval-pd-dsA", "B"), ("eval-r0-dsB", "B"),
                    ("eval-plain", "B"), ("eval-pd-A", "A"), ("eval-plain-A", "A")]:
    results = json.loads(Path(run, "results.json").read_text())
    exact = sum(r["caption"] == refs[domain, r["image_id"]] for r in results) / len(results)
    cider = json.loads(Path(run, "metrics.json").read_text())["metrics"]["CIDEr"]
    print(f"{run:14s} on {domain} ({len(results)} test images): exact match {exact:.3f}, CIDEr-D {cider:.1f}")
PY
