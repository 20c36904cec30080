#!/usr/bin/env bash
# The nightly pipeline's Slurm executor against a real single-node Slurm on this machine
# (Debian's slurm-wlm: slurmctld and slurmd on localhost, as ../shared/SLURM.md describes).
# Starts munge, slurmctld and slurmd when no cluster answers (installing the packages with
# apt when they are missing; needs root), runs the pipeline on the fixtures as an sbatch
# chain (the split as a 2-part job array and a merge), checks the report, runs it again
# (nothing to submit: every stage is unchanged), trains with two data-parallel ranks
# started by srun, and stops only the daemons it started.
# Usage: scripts/slurm-check.sh [WORK_DIR]   (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mmrec-target}"
work="${1:-$(mktemp -d)}"
started=()
stop_daemons() { for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_daemons EXIT

if ! sinfo -h >/dev/null 2>&1; then
  command -v slurmctld >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; }
  mkdir -p /var/run/munge /var/log/munge /var/lib/munge /etc/munge
  [[ -f /etc/munge/munge.key ]] || { head -c 1024 /dev/urandom >/etc/munge/munge.key; }
  chown -R munge: /etc/munge /var/run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force
  host=$(hostname)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /etc/slurm "$work/slurm-logs"
  cat >/etc/slurm/slurm.conf <<CONF
ClusterName=mmrec
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmUser=root
ReturnToService=2
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -L "$work/slurm-logs/slurmctld.log"
  slurmd -L "$work/slurm-logs/slurmd.log"
  sleep 1
  started=($(pgrep -x slurmctld) $(pgrep -x slurmd))
  for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
fi
sinfo

cargo build --workspace --bins --quiet
bin="$CARGO_TARGET_DIR/debug"
fx=$(realpath fixtures)
cat >"$work/nightly-slurm.toml" <<CONF
[pipeline]
work = "$work/work"
runs = "$work/runs"
executor = "slurm"

[slurm]
split_parts = 2

[corpora]
text = ["$fx/corpora/wikitext.jsonl"]
code = ["$fx/corpora/python_stdlib.jsonl"]
mixed = ["$fx/corpora/chat.jsonl"]

[tokenizer]
vocab_size = 2048

[split]
near_dup = true

[model]
preset = "tiny"

[train]
device = "cpu"
set = ["data.seq_len=64", "data.batch_size=4", "run.eval_every=0", "run.ckpt_every=5"]

[pretrain]
set = ["run.steps=10"]

[finetune]
set = ["run.steps=5", "optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_steps=1"]

[fusion]
set = ["run.steps=4", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1"]

[eval]
seq_len = 64
batch_size = 4
max_batches = 2
CONF
echo "== the pipeline as an sbatch chain"
"$bin/mmrec-recipe" run "$work/nightly-slurm.toml"
run=$(ls -d "$work"/runs/*/ | sort -V | tail -1)
python3 - "$run" <<'PY'
import json, sys
run = sys.argv[1]
stages = json.load(open(f"{run}/stages.json"))
assert all(s["status"] == "ran" for s in stages), stages
# each job records its own run time in its marker
assert sum(s["seconds"] for s in stages) > 0, stages
report = json.load(open(f"{run}/report.json"))
for m in ["base", "control", "text", "code", "fused"]:
    assert report["models"][m]["all"]["loss"] > 0, m
print("report:", {m: round(report["models"][m]["all"]["loss"], 3) for m in report["models"]})
PY
ls "$run/slurm" "$run/logs"
echo "== again: nothing changed, nothing submitted"
"$bin/mmrec-recipe" run "$work/nightly-slurm.toml"
run=$(ls -d "$work"/runs/*/ | sort -V | tail -1)
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); assert all(x['status']=='skipped' for x in s), s; print('all', len(s), 'stages skipped')" "$run/stages.json"
echo "== data parallel: two ranks started by srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)"
MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 srun -n 2 --export=ALL "$bin/mmrec-train" pretrain --device cpu \
  --data "$run/outputs/split/shards" --out "$work/data-parallel" --json --set 'model.preset="tiny"' \
  --set data.seq_len=64 --set data.batch_size=2 --set run.steps=6 --set run.eval_every=0 \
  --set run.log_every=1 --set run.check_sync_every=2 >/dev/null
python3 - "$work/data-parallel" <<'PY'
import json, os, sys
out = sys.argv[1]
steps = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"loss"' in l]
assert [r["step"] for r in steps] == list(range(1, 7)), steps
# two ranks of 2 rows of 65 tokens each step
assert steps[-1]["tokens_seen"] == 6 * 2 * 2 * 65, steps[-1]
assert os.path.exists(f"{out}/final.safetensors")
print("two ranks under srun: 6 steps, losses", [round(r["loss"], 3) for r in steps])
PY
echo "slurm check passed ($work)"
