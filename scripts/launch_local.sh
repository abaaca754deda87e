#!/usr/bin/env bash
# Start N cooperating train_jax.py processes on 127.0.0.1, to try multi-host training on one machine.
#   scripts/launch_local.sh 2 --preset tiny --mesh data=2,fsdp=2 --steps 20 --ckpt-dir ckpt-multi
# Each process gets DEVICES_PER_PROCESS simulated CPU devices (default 2). The processes find each
# other through a coordinator on a free local port; process 0 prints the logs. Ctrl-C stops all.
# The interpreter is $PYTHON, else the `python` on PATH (as the README's commands), else `python3`.
set -u
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [train_jax.py flags...]" >&2
  exit 2
fi
n=$1; shift
# (train_jax.py beside the real path of this file: through a link to it elsewhere, ~/bin say, none was found)
here="$(cd "$(dirname "$(readlink -f "$0" 2>/dev/null || echo "$0")")" && pwd)"
python=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
logs=${LOG_DIR:-/tmp}
# Each log file is made before any process starts: a process whose log cannot be written never
# starts, and the others would wait --init-timeout seconds for it, then abort (status 134).
for ((i = 1; i < n; i++)); do
  if ! { : >"$logs/train_jax.process$i.log"; } 2>/dev/null; then
    echo "$0: cannot write $logs/train_jax.process$i.log (LOG_DIR must be a writable directory); nothing started" >&2
    exit 2
  fi
done
pids=()
# Ctrl-C, SIGTERM and a hang-up reach the processes once each, from here, as each signal reaches a
# train_jax.py run alone (Ctrl-C: one line at start-up, else a save before the next step; status
# 130). Started as background jobs of this script without job control, they ignored SIGINT and got
# SIGTERM instead: at start-up they ended silently (143), or the run trained on (JAX's preemption
# notifier took SIGTERM there; `jaxllm.distributed` now puts SIGTERM's handler back). Job control (`set -m`, on only while they start) gives each its own
# process group, with SIGINT as the terminal's shell left it. Their standard input stays /dev/null, as
# without job control: a read of the terminal from a process group of its own would stop that process
# (SIGTTIN), and the launcher would wait for it for ever. Ctrl-Z (SIGTSTP) stops this launcher alone, and is
# not forwarded: processes stopped together for longer than --heartbeat-timeout are all aborted by JAX's
# coordination service (134) as soon as they continue (20 s with --heartbeat-timeout 5, 2026-12-02).
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward HUP' HUP
set -m
for ((i = 0; i < n; i++)); do
  if [ "$i" -eq 0 ]; then
    "$python" "$here/train_jax.py" --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" "$@" \
      </dev/null &
  else
    "$python" "$here/train_jax.py" --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" \
      --no-progress "$@" </dev/null >"$logs/train_jax.process$i.log" 2>&1 &
  fi
  pids+=($!)
done
set +m
status=0
for pid in "${pids[@]}"; do
  # Polled, then `wait`ed for once it has ended (bash has its status then), because a signal caught
  # during a `wait` ends it early with 128 + the signal, and if the process ends at that moment (it
  # may end within microseconds of the signal forwarded to it) bash loses its status: `wait` then
  # reported 143 or, asked again, -1 (255) instead of the process's own status.
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  wait "$pid"; s=$?
  [ "$s" -ne 0 ] && [ "$status" -eq 0 ] && status=$s
done
exit $status
