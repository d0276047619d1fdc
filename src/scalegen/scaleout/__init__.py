"""Running at scale: DDP/FSDP strategies and activation checkpointing (distributed.py), the SLURM pre-timeout agreement
(slurm.py), one file from a sharded checkpoint (consolidate.py), encoding a dataset once (cache_latents.py)."""
