"""The run directory and the checkpoint protocol: where a run's files live (a folder or an s3:// prefix), how a
checkpoint is staged, written and made visible (marker last), which checkpoints are kept, and how a remote
checkpoint is fetched. `RunRecord` is the typed view of a trained run that every reader uses."""
