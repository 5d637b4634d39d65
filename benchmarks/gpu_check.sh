#!/usr/bin/env bash
# One GPU check of TFD at full size, in at most 13 minutes on one large GPU (H100/H200 class, >= 80 GB; 23 with
# the FSDP row on several GPUs): the training step of each script timed on random-weight real architectures, its
# peak memory, the largest group count that fits, and one real run of train_tfd_imagenet64.py, train_tfd_sdxl.py
# and train_tfd_sd3.py (SD3.5 large: LoRA on one GPU, a full fine-tune under FSDP where there are >= 2 GPUs).
# One table and one JSON at the end, also when stages fail or time out.
#
#   bash benchmarks/gpu_check.sh                          # CUDA, full size
#   bash benchmarks/gpu_check.sh --device cpu --tiny      # the same stages at toy sizes: about a minute on a CPU
#   options: --out DIR (default outputs/gpu_check)  --python PY (default .venv/bin/python, else python3)
#            --wheels DIR (pip-install the wheels in DIR offline into .venv-gpu, on top of the system's torch)
#            --skip STAGE[,STAGE]  --time_scale F (multiply every stage's timeout)
#
# Stages, each under its own timeout (seconds on CUDA; a failed or timed-out stage is recorded, the rest run):
#   bench_imagenet64  (80)  ADM ImageNet-64 UNet (296 M), the recipe's batch per GPU 10 x (4, 4, 4), bf16 student
#                           autocast, fp32 teacher: the script's own step time, torch.cuda.max_memory_allocated, and
#                           the most classes per GPU whose step fits (searched up to 64)
#   bench_sdxl       (130)  SDXL base UNet (2.57 B) at 1024 px, 1 prompt x (4, 4), bf16: full fine-tune (bf16
#                           teacher, gradient checkpointing, 8-bit AdamW) and LoRA r64; the most prompts that fit
#                           (searched up to 8)
#   bench_sd3         (80)  SD3.5-medium transformer (the published config, real_arch.SD35_MEDIUM, 2.5 B) at
#                           1024 px, 1 prompt x (4, 4), bf16, full and LoRA
#   script_imagenet64 (50)  train_tfd_imagenet64.py, one update on the random ADM UNet, 10 classes x (4, 4, 4), bf16
#   script_sdxl      (140)  train_tfd_sdxl.py LoRA, one update at 1024 px, 1 prompt x (4, 4), positives sampled
#                           with 4 teacher steps; then load_lora_weights and one 1024 px one-step image
#   script_sd35_large_lora (300)  train_tfd_sd3.py LoRA r64 on the published SD3.5-large transformer (8.1 B;
#                           real_arch.SD35_LARGE, no T5, --drop_t5), one update at 1024 px, 1 prompt x (4, 4),
#                           positives of 4 teacher steps, bf16 teacher; then load_lora_weights and one 1024 px image
#   script_sd35_large_fsdp (600)  the same model, full fine-tune under FSDP (examples/accelerate_configs/
#                           fsdp_full_shard.yaml with JointTransformerBlock wrapped: the yaml names SDXL's block
#                           classes, so the SD3 one is given on the command line; one process per GPU, AdamW, bf16
#                           autocast, gradient checkpointing), one update, then the consolidated export. Only with
#                           >= 2 GPUs (nvidia-smi -L); otherwise recorded as skipped, with the reason. Memory per GPU:
#                           the fp32 student, gradients and AdamW states (130 GB in all) split over the GPUs, plus the
#                           whole bf16 teacher (16 GB): ~81 GB on 2 GPUs (needs 141 GB GPUs; 80 GB ones from 4 GPUs).
#
# Needs: bash, coreutils `timeout`, and a Python with the project's requirements.txt: torch with CUDA,
# diffusers, transformers, accelerate, datasets, peft, safetensors, bitsandbytes (8-bit AdamW of the full
# rows), and open_clip_torch (only its CLIP BPE vocabulary file, for the random pipelines' tokenizers:
# `pip install --no-deps` is enough). Nothing is downloaded: every network is built from its config with
# random weights, the data are random images. A machine without network access needs those packages
# installed, or their wheels carried in (--wheels DIR). Disk: ~6 GB (the bf16 SDXL pipeline, the ADM UNet), then
# ~17 GB (the bf16 SD3.5-large pipeline), with the FSDP row ~50 GB (its export: the fp32 student pipeline).
# Results: OUT/summary.md, OUT/summary.json; each stage's log and JSON under OUT/stages/.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
TINY=0
OUT="$ROOT/outputs/gpu_check"
PY=""
WHEELS=""
SKIP=""
TIME_SCALE=1

while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --skip) SKIP="$2"; shift 2 ;;
    --time_scale) TIME_SCALE="$2"; shift 2 ;;
    -h|--help) sed -n '2,44p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if [[ -n "$WHEELS" ]]; then
  # The system's torch (with CUDA) stays; the carried wheels go into a venv on top of it, offline.
  "$PY" -m venv --system-site-packages "$ROOT/.venv-gpu"
  "$ROOT/.venv-gpu/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
  PY="$ROOT/.venv-gpu/bin/python"
fi

OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
STAGES="$OUT/stages"
WORK="$OUT/work"
rm -rf "$STAGES" "$WORK"
mkdir -p "$STAGES" "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ "$DEVICE" == cpu ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""; fi
BENCH="$ROOT/benchmarks/bench_train_step.py"
ARCH="$ROOT/benchmarks/real_arch.py"
T0=$SECONDS

# run_stage NAME TIMEOUT_S COMMAND...: runs under `timeout`, never stops the script; writes NAME.status
run_stage() {
  local name="$1" limit="$2"; shift 2
  if [[ ",$SKIP," == *",$name,"* ]]; then
    echo "skipped 0 0" > "$STAGES/$name.status"; echo "== $name: skipped"; return 0
  fi
  limit="$(awk -v t="$limit" -v s="$TIME_SCALE" 'BEGIN { printf "%d", t * s + 0.5 }')"
  echo "== $name (timeout ${limit}s)"
  local start=$SECONDS rc=0
  timeout -k 15 "$limit" "$@" > "$STAGES/$name.log" 2>&1 || rc=$?
  local status=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timeout; elif [[ $rc -ne 0 ]]; then status=failed; fi
  echo "$status $rc $((SECONDS - start))" > "$STAGES/$name.status"
  echo "   $status (rc $rc, $((SECONDS - start)) s)"
  if [[ $status != ok ]]; then tail -n 5 "$STAGES/$name.log" | sed 's/^/   | /'; fi
  return 0
}

# skip_stage NAME REASON: a stage this machine cannot run, recorded as skipped with the reason
skip_stage() {
  echo "skipped 0 0" > "$STAGES/$1.status"; echo "$2" > "$STAGES/$1.reason"; echo "== $1: skipped ($2)"
}

# The script stages: build, data, train[, infer], each its own process at full size (a builder's weights never add
# to the training run's memory); one log, RESULT lines collected.
script_imagenet64() {
  local teacher="$WORK/adm" data="$WORK/adm_data" out="$WORK/adm_run"
  rm -rf "$out"
  if [[ $TINY == 1 ]]; then  # toy sizes: one process for the three steps
    "$PY" "$ARCH" chain build-adm "$teacher" --device "$DEVICE" --tiny \
      -- images "$data" --classes 2 --per_class 4 --resolution 16 \
      -- train-imagenet64 --pretrained_teacher_model "$teacher" --train_data_dir "$data" \
      --classes_per_batch 2 --num_generated 2 --num_positives 2 --num_anchors 2 --mixed_precision no \
      --max_train_steps 1 --lr_warmup_steps 0 --checkpointing_steps 1000 --validation_steps 0 --logging_steps 1 \
      --num_validation_images 2 --report_to none --output_dir "$out"
  else
    "$PY" "$ARCH" build-adm "$teacher" --device "$DEVICE"
    "$PY" "$ARCH" images "$data" --classes 10 --per_class 8 --resolution 64
    "$PY" "$ARCH" train-imagenet64 --pretrained_teacher_model "$teacher" --train_data_dir "$data" \
      --classes_per_batch 10 --num_generated 4 --num_positives 4 --num_anchors 4 --mixed_precision bf16 \
      --max_train_steps 1 --lr_warmup_steps 0 --checkpointing_steps 1000 --validation_steps 0 --logging_steps 1 \
      --num_validation_images 4 --report_to none --output_dir "$out"
  fi
  cp "$out/metrics.jsonl" "$STAGES/script_imagenet64.metrics.jsonl"
}

script_sdxl() {
  local pipe="$WORK/sdxl" out="$WORK/sdxl_run" prompts="$WORK/prompts.txt"
  rm -rf "$out"
  echo "a photo of a red fox in the snow" > "$prompts"
  local common=(--prompts_file "$prompts" --train_mode lora --gradient_checkpointing --prompts_per_batch 1
                --max_train_steps 1 --lr_warmup_steps 0 --checkpointing_steps 1000 --validation_steps 0
                --validation_prompts "a cat" --logging_steps 1 --report_to none --output_dir "$out")
  if [[ $TINY == 1 ]]; then
    "$PY" "$ARCH" chain build-sdxl "$pipe" --tiny \
      -- train-sdxl --pretrained_model_name_or_path "$pipe" --resolution 32 --lora_rank 4 --lora_alpha 4 \
      --num_generated 2 --num_positives 2 --num_positive_steps 1 --mixed_precision no "${common[@]}" \
      -- infer-sdxl "$pipe" "$out" --resolution 32 --device "$DEVICE"
  else
    "$PY" "$ARCH" build-sdxl "$pipe" --device "$DEVICE" --dtype bf16
    "$PY" "$ARCH" train-sdxl --pretrained_model_name_or_path "$pipe" --resolution 1024 --lora_rank 64 \
      --lora_alpha 64 --num_generated 4 --num_positives 4 --num_positive_steps 4 --teacher_dtype bf16 \
      --mixed_precision bf16 "${common[@]}"
    "$PY" "$ARCH" infer-sdxl "$pipe" "$out" --resolution 1024 --device "$DEVICE"
  fi
  cp "$out/metrics.jsonl" "$STAGES/script_sdxl.metrics.jsonl"
}
# SD3.5 large (8.1 B): the pipeline built once (bf16, no T5) for the LoRA row and the FSDP row.
sd3_common() {
  echo "a photo of a red fox in the snow" > "$WORK/prompts_sd3.txt"
  SD3_COMMON=(--prompts_file "$WORK/prompts_sd3.txt" --drop_t5 --gradient_checkpointing --prompts_per_batch 1
              --max_train_steps 1 --lr_warmup_steps 0 --checkpointing_steps 1000 --validation_steps 0
              --validation_prompts "a cat" --logging_steps 1 --report_to none --output_dir "$1")
}

script_sd35_large_lora() {
  local pipe="$WORK/sd35_large" out="$WORK/sd35_large_lora"
  rm -rf "$out"
  sd3_common "$out"
  if [[ $TINY == 1 ]]; then
    "$PY" "$ARCH" chain build-sd3 "$pipe" --model sd35-large --tiny \
      -- train-sd3 --pretrained_model_name_or_path "$pipe" --train_mode lora --resolution 32 --lora_rank 4 \
      --lora_alpha 4 --num_generated 2 --num_positives 2 --num_positive_steps 1 --mixed_precision no "${SD3_COMMON[@]}" \
      -- infer-sd3 "$pipe" "$out" --resolution 32 --device "$DEVICE"
  else
    "$PY" "$ARCH" build-sd3 "$pipe" --model sd35-large --device "$DEVICE" --dtype bf16
    "$PY" "$ARCH" train-sd3 --pretrained_model_name_or_path "$pipe" --train_mode lora --resolution 1024 \
      --lora_rank 64 --lora_alpha 64 --num_generated 4 --num_positives 4 --num_positive_steps 4 --teacher_dtype bf16 \
      --mixed_precision bf16 "${SD3_COMMON[@]}"
    "$PY" "$ARCH" infer-sd3 "$pipe" "$out" --resolution 1024 --device "$DEVICE"
  fi
  cp "$out/metrics.jsonl" "$STAGES/script_sd35_large_lora.metrics.jsonl"
}

script_sd35_large_fsdp() {
  local pipe="$WORK/sd35_large" out="$WORK/sd35_large_fsdp"
  rm -rf "$out"
  sd3_common "$out"
  if [[ ! -f "$pipe/model_index.json" ]]; then
    "$PY" "$ARCH" build-sd3 "$pipe" --model sd35-large --device "$DEVICE" --dtype bf16
  fi
  "$PY" -m accelerate.commands.launch --config_file "$ROOT/examples/accelerate_configs/fsdp_full_shard.yaml" \
    --num_processes "$NGPU" --fsdp_transformer_layer_cls_to_wrap JointTransformerBlock \
    "$ARCH" train-sd3 --pretrained_model_name_or_path "$pipe" --train_mode full --resolution 1024 \
    --num_generated 4 --num_positives 4 --num_positive_steps 4 --teacher_dtype bf16 --mixed_precision bf16 \
    "${SD3_COMMON[@]}"
  cp "$out/metrics.jsonl" "$STAGES/script_sd35_large_fsdp.metrics.jsonl"
  rm -rf "$out"  # the exported fp32 pipeline (~33 GB)
}
export -f script_imagenet64 script_sdxl sd3_common script_sd35_large_lora script_sd35_large_fsdp
NGPU=0
if [[ "$DEVICE" == cuda ]] && command -v nvidia-smi > /dev/null; then
  NGPU="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
export PY ARCH WORK STAGES DEVICE TINY ROOT NGPU

if [[ $TINY == 1 ]]; then
  COMMON=(--device "$DEVICE" --measure step --tiny --repeats 1 --warmup 0)
  FIND=()  # the largest batch is searched for on a GPU only
  T=(60 60 60 90 120 120 60)  # a loaded CPU: each stage is mostly imports
else
  COMMON=(--device "$DEVICE" --measure step --warmup 1 --repeats 3)
  FIND=(--find_max_batch)
  T=(80 130 80 50 140 300 600)
fi

run_stage bench_imagenet64 "${T[0]}" "$PY" "$BENCH" "${COMMON[@]}" ${FIND[@]+"${FIND[@]}"} --config imagenet64 \
  $([[ $TINY == 1 ]] || echo --imagenet_batch 10x4,4,4 --teacher_dtype fp32 --max_groups 64) \
  --output_json "$STAGES/bench_imagenet64.json"
run_stage bench_sdxl "${T[1]}" "$PY" "$BENCH" "${COMMON[@]}" ${FIND[@]+"${FIND[@]}"} --config sdxl --sdxl_prompts 1 \
  --sdxl_modes full,lora \
  $([[ $TINY == 1 ]] || echo --sdxl_unet full --sdxl_resolution 1024 --sdxl_batch 4,4 --sdxl_precision bf16 --max_groups 8) \
  --output_json "$STAGES/bench_sdxl.json"
run_stage bench_sd3 "${T[2]}" "$PY" "$BENCH" "${COMMON[@]}" --config sd3 --sdxl_prompts 1 \
  --sdxl_modes full,lora \
  $([[ $TINY == 1 ]] || echo --sd3_transformer full --sd3_resolution 1024 --sdxl_batch 4,4 --sdxl_precision bf16) \
  --output_json "$STAGES/bench_sd3.json"
run_stage script_imagenet64 "${T[3]}" bash -c 'set -euo pipefail; script_imagenet64'
run_stage script_sdxl "${T[4]}" bash -c 'set -euo pipefail; script_sdxl'
rm -rf "$WORK/sdxl" "$WORK/sdxl_run"  # the bf16 SDXL pipeline (5 GB): disk for SD3.5 large
run_stage script_sd35_large_lora "${T[5]}" bash -c 'set -euo pipefail; script_sd35_large_lora'
if [[ "$DEVICE" != cuda ]]; then
  skip_stage script_sd35_large_fsdp "FSDP needs CUDA GPUs (accelerate has no FSDP on a CPU)"
elif [[ "$NGPU" -lt 2 ]]; then
  skip_stage script_sd35_large_fsdp "FSDP needs >= 2 GPUs; nvidia-smi -L counts $NGPU"
else
  run_stage script_sd35_large_fsdp "${T[6]}" bash -c 'set -euo pipefail; script_sd35_large_fsdp'
fi
rm -rf "$WORK"  # the random pipelines (GBs)

# The table and the JSON, from whatever the stages left. A bare JSON of the statuses if Python itself fails.
if ! "$PY" - "$OUT" "$DEVICE" "$TINY" "$((SECONDS - T0))" <<'EOF'
import glob, json, os, sys

out, device, tiny, total_s = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
stages_dir = os.path.join(out, "stages")
names = ["bench_imagenet64", "bench_sdxl", "bench_sd3", "script_imagenet64", "script_sdxl", "script_sd35_large_lora",
         "script_sd35_large_fsdp"]
summary = {"device": device, "tiny": tiny, "total_s": total_s, "stages": {}}
try:
    import torch
    summary["gpu"] = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    summary["torch"] = torch.__version__
except Exception as e:  # the summary must still be written
    summary["torch_error"] = repr(e)
rows = []
for name in names:
    path = os.path.join(stages_dir, name + ".status")
    status, rc, secs = (open(path).read().split() + ["missing", "", ""])[:3] if os.path.exists(path) else ("missing", "", "")
    st = {"status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
          "seconds": int(secs) if secs.isdigit() else None}
    reason = os.path.join(stages_dir, name + ".reason")
    if os.path.exists(reason):
        st["reason"] = open(reason).read().strip()
    bench = os.path.join(stages_dir, name + ".json")
    if name.startswith("bench") and os.path.exists(bench):
        st["results"] = json.load(open(bench))["results"]
        for r in st["results"]:
            errors = "; ".join(f"{k[:-6]}: {v}" for k, v in r.items() if k.endswith("_error"))
            rows.append((name, status, r["config"], r["batch"], r.get("step_ms"), r.get("peak_bytes"),
                         r.get("max_groups"), errors))
    log = os.path.join(stages_dir, name + ".log")
    if name.startswith("script") and os.path.exists(log):
        results = [json.loads(ln[len("RESULT "):]) for ln in open(log, errors="replace") if ln.startswith("RESULT ")]
        st["processes"] = results
        metrics = os.path.join(stages_dir, name + ".metrics.jsonl")
        if os.path.exists(metrics):
            st["metrics"] = [json.loads(ln) for ln in open(metrics) if ln.strip()]
        train = [r.get("cuda_peak_gb") or r.get("peak_rss_gb") or 0 for r in results if r["stage"].startswith("train")]
        loss = st.get("metrics", [{}])[-1].get("loss/total") if st.get("metrics") else None
        rows.append((name, status, "one real run of the script" + (f", loss {loss:.4g}" if loss is not None else ""),
                     "", None, max(train, default=0) * 2**30 or None, None,  # several processes: the largest
                     "; ".join(f"{r['stage']}{' rank %d' % r['rank'] if 'rank' in r else ''} {r['wall_s']} s"
                               for r in results)))
    if status != "ok" and os.path.exists(log):
        st["log_tail"] = open(log, errors="replace").read()[-2000:]
    if not any(row[0] == name for row in rows):
        rows.append((name, status, "", "", None, None, None, st.get("reason", "")))
    summary["stages"][name] = st

mem = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS above the row's start (CPU)"
fmt = lambda v, f: "n/a" if v is None else format(v, f)
lines = [f"TFD GPU check: {summary.get('gpu') or device}{' (tiny)' if tiny else ''}, torch {summary.get('torch')}, "
         f"{total_s} s in all. Memory: {mem}; script rows: the training process's peak.", "",
         "| stage | status | configuration | batch | step ms | peak memory | largest groups that fit | notes |",
         "|---|---|---|---|---|---|---|---|"]
for name, status, config, batch, ms, peak, groups, notes in rows:
    lines.append(f"| {name} | {status} | {config} | {batch} | {fmt(ms, '.1f')} | "
                 f"{'n/a' if not peak else f'{peak / 2**30:.2f} GiB'} | {fmt(groups, 'd')} | {notes} |")
table = "\n".join(lines)
print("\n" + table)
open(os.path.join(out, "summary.md"), "w").write(table + "\n")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
EOF
then
  {
    printf '{"device": "%s", "tiny": %s, "summary_error": true, "stages": {' "$DEVICE" "$([[ $TINY == 1 ]] && echo true || echo false)"
    sep=""
    for f in "$STAGES"/*.status; do
      [[ -e "$f" ]] || continue
      read -r s rc secs < "$f"
      printf '%s"%s": {"status": "%s", "rc": %s, "seconds": %s}' "$sep" "$(basename "$f" .status)" "$s" "$rc" "$secs"
      sep=", "
    done
    printf '}}\n'
  } > "$OUT/summary.json"
  echo "gpu_check.sh: the summary step failed; statuses in $OUT/summary.json" >&2
fi
echo "Wrote $OUT/summary.md and $OUT/summary.json ($((SECONDS - T0)) s)."
