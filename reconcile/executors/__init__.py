"""Where apply's sessions run: `apply.apply_plan` is the local executor, `slurm` the cluster one.

An executor only decides where staging happens; committing always goes through
`apply.commit_session`, one writer at a time.
"""
