# Sourced by the sbatch templates in this folder: the environment worth setting for ulysses on a
# GPU cluster. Edit the module lines for your site.
#   module load cuda/13 openmpi nccl      # site-specific
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# NCCL: fail loudly instead of hanging, say which transport it chose, use the InfiniBand HCAs.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                       # INFO once, to see the rings/trees
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1                    # harmless here; some sites key on it
export NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}  # bootstrap over a real interface
# export NCCL_IB_HCA=mlx5_0,mlx5_1,...                      # pin the HCAs on multi-rail nodes
# export NCCL_NET_GDR_LEVEL=PHB                             # GPUDirect RDMA where the topology allows
export ULYSSES_BIN=${ULYSSES_BIN:-$PWD/build/apps/ulysses}
# Checkpoint on preemption: the templates ask Slurm for SIGUSR1 120 s before the time limit
# (#SBATCH --signal=B:USR1@120 reaches the batch shell; it is forwarded to the ranks below). The
# trainer stops at the next step boundary on every rank, writes a checkpoint to checkpoint.dir and
# exits 0; resubmit with --set checkpoint.resume=auto to continue (docs/reliability.md).
forward_usr1() { echo "SIGUSR1 from Slurm: asking the ranks to checkpoint and stop"; kill -USR1 "$RUN_PID" 2>/dev/null; wait "$RUN_PID"; }
