#!/bin/bash
# DiffiT training as a SLURM batch job that outlives its time limit: shortly before the limit it saves a step
# checkpoint, requeues itself, and the next attempt continues the same run, until training completes.
#
#   sbatch launch/slurm_train.sh [TRAINING_SCRIPT.py] [TRAINING FLAGS...]
#   sbatch --time=24:00:00 launch/slurm_train.sh --model diffit_cifar --data cifar10 --epochs 200 --batch-size 512
#   sbatch --nodes=4 launch/slurm_train.sh scripts/train_lora.py --data cifar100_trees_only --epochs 5
#
# Submit from the repository root (or pass --chdir) with the Python environment active: the job inherits both.
# TRAINING_SCRIPT defaults to scripts/train_base.py; the flags go to it unchanged, followed by --auto-resume.
# The checkpoint root (--checkpoint-root, default ./checkpoints) must be a folder every node shares.
#
# What happens
#   * srun starts one `accelerate launch` per node (--machine_rank $SLURM_NODEID, main process on the job's
#     first node), which starts DIFFIT_PROCS_PER_NODE training processes there.
#   * Every attempt runs the same command with --auto-resume. The run key is SLURM_JOB_ID (plus
#     _SLURM_ARRAY_TASK_ID in a job array), the same across requeues: the first attempt creates the run, every
#     later one continues it from its newest intact checkpoint, and one that finds the run completed exits 0.
#   * --signal=B:USR1@S: SLURM sends SIGUSR1 to this script between S+30 and S seconds before the time limit
#     (slurmctld looks every 30 s, and rather early than late); S must cover finishing a step, a save and the
#     exit. The trap below sends SIGUSR1 to srun, which forwards it to every process of the step on every node:
#     the training processes stop at the next step, save a step checkpoint, mark the run interrupted and exit 0;
#     then this script runs `scontrol requeue $SLURM_JOB_ID` (--requeue) and the job waits in the queue for its
#     next attempt. The output file is appended to (--open-mode=append), one block per attempt.
#     By hand, the same stop and requeue: scancel --batch --signal=USR1 JOBID
#   * A normal end (training completed, or failed) exits with the launch's status and is not requeued.
#   * scancel, a requeue or preemption by someone else, and the time limit itself send SIGTERM to every process
#     of the job and SIGKILL KillWait seconds later: the training processes save a step checkpoint if they
#     can in that time (srun answers SIGTERM by SIGKILLing its tasks, but on a job being ended that came after
#     KillWait in our tests); else a requeued or preempted job continues from the newest committed checkpoint
#     (the steps since then are redone, bit-identically; --set checkpoint.save_every_n_steps=N bounds that).
#     This script does not requeue then: scancel must stop the job, and a job at its time limit without the
#     SIGUSR1 first ends as TIMEOUT (resubmit it with the same --run-key to continue the run).
#
# Why the signals go where they go
#   * SIGUSR1, not SIGTERM, to srun: srun forwards SIGUSR1 as it is, but answers SIGTERM with SIGKILL.
#   * slurmstepd delivers a forwarded signal to every process of the step (proctrack/cgroup or linuxproc), so
#     the training processes get it directly, although torch elastic starts them in their own sessions.
#   * `accelerate launch` (torch elastic's agent) is started with SIGUSR1 ignored: by default SIGUSR1 would kill
#     it, and SLURM ends a step whose task has exited, killing the training processes in the middle of their
#     save. Ignoring it, the agent just waits for its workers and exits 0 when they do. The workers inherit
#     the ignored SIGUSR1 until the trainer installs its stop handler, so one that is still starting up would
#     miss a single signal: the trap repeats it every DIFFIT_STOP_RESEND seconds until the launch has exited
#     (a repeat during the save only prints a notice).
#
# Settings: sbatch flags override the #SBATCH lines below (--nodes, --gpus-per-node, --cpus-per-task, --time,
# --signal, --output, --partition, ...); the script reads these environment variables:
#   DIFFIT_ACCELERATE_CONFIG  accelerate config file (default configs/accelerate/multi_node_zero3.yaml)
#   DIFFIT_PROCS_PER_NODE     training processes per node (default: the number of GPUs SLURM gave each node)
#   DIFFIT_MAIN_PORT          rendezvous port on the first node (default 20000 + job id modulo 20000)
#   DIFFIT_STOP_RESEND        seconds between repeats of the stop signal (default 10)
#   DIFFIT_PYTHON             run `$DIFFIT_PYTHON -m accelerate.commands.launch` instead of `accelerate launch`
#                             from PATH (a Python environment that is not activated)
# A single CPU node, as tests/test_slurm.py runs it:
#   export DIFFIT_ACCELERATE_CONFIG=configs/accelerate/cpu_zero2.yaml DIFFIT_PROCS_PER_NODE=2
#   sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --time=10 --signal=B:USR1@150 launch/slurm_train.sh ...
#
#SBATCH --job-name=diffit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: this is a SLURM batch script: submit it with sbatch $0 [TRAINING_SCRIPT.py] [FLAGS...]" >&2
    exit 2
fi
# The traps come first: SLURM may signal the job at any moment, even as it starts.
attempt=$((${SLURM_RESTART_COUNT:-0} + 1))
resend=${DIFFIT_STOP_RESEND:-10}
stop_requested=0 launch_pid='' resender='' requeued=0
log() { echo "[slurm_train $(date '+%F %T')] job ${SLURM_JOB_ID} attempt ${attempt}: $*"; }
resend_stop() {  # SIGUSR1 to srun now and every $resend s until it has exited
    [[ -n $launch_pid && -z $resender ]] || return 0
    (trap '' USR1; while kill -USR1 "$launch_pid" 2>/dev/null; do sleep "$resend"; done) &
    resender=$!
}
# shellcheck disable=SC2317  # trap handlers
on_usr1() {
    if ((stop_requested == 0)); then
        stop_requested=1
        log "SIGUSR1 (time limit near): asking training to save a step checkpoint and stop; then requeueing"
    fi
    resend_stop
}
# shellcheck disable=SC2317
on_term() {
    ((requeued)) || log "SIGTERM (scancel, requeue, preemption or the time limit): srun stops the training now"
}
trap on_usr1 USR1
trap on_term TERM

script=scripts/train_base.py
if [[ $# -gt 0 && $1 == *.py ]]; then
    script=$1
    shift
fi
config=${DIFFIT_ACCELERATE_CONFIG:-configs/accelerate/multi_node_zero3.yaml}
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
per_node=${DIFFIT_PROCS_PER_NODE:-${gpus##*:}}
port=${DIFFIT_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

if [[ ! $per_node =~ ^[1-9][0-9]*$ ]]; then
    log "error: no GPUs on the node and no DIFFIT_PROCS_PER_NODE: set it to the training processes per node"
    exit 2
fi
main_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
log "$nodes node(s) x $per_node process(es), $config, main $main_addr:$port: $script $* --auto-resume"

# One launcher per node, run by this command on each node: SIGUSR1 ignored (see above), and `exec` keeps the
# launcher the task itself, so that the step lasts exactly as long as the launcher, which waits for its workers.
# shellcheck disable=SC2016  # expanded on each node
node_command='trap "" USR1
if [[ -n ${DIFFIT_PYTHON:-} ]]; then launch=("$DIFFIT_PYTHON" -m accelerate.commands.launch); else launch=(accelerate launch); fi
exec "${launch[@]}" --machine_rank "$SLURM_NODEID" "$@"'
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c "$node_command" slurm-train-node \
    --config_file "$config" --num_machines "$nodes" --num_processes $((nodes * per_node)) \
    --main_process_ip "$main_addr" --main_process_port "$port" \
    "$script" "$@" --auto-resume &
launch_pid=$!
((stop_requested)) && resend_stop  # a SIGUSR1 that came before srun started

# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun has exited.
while :; do
    wait "$launch_pid"
    status=$?
    kill -0 "$launch_pid" 2>/dev/null || break
done
[[ -n $resender ]] && kill "$resender" 2>/dev/null

if ((stop_requested)); then
    log "training stopped (launch exit status $status); requeueing the job to continue the run"
    requeued=1
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "error: scontrol requeue failed; resubmit this job to continue the run"
    exit 1
fi
log "launch exited with status $status"
exit "$status"
