"""Launchers: local (re-run under mpiexec); slurm (submitit, launch/slurm.py); plain sbatch scripts (launch/sbatch.py)."""

from .local import LOG_DIR_VAR, maybe_relaunch, redirect_rank_output, relaunch_under_mpiexec

__all__ = ["LOG_DIR_VAR", "maybe_relaunch", "redirect_rank_output", "relaunch_under_mpiexec"]
