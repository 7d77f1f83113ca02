"""Layer 5: experiment commands (``lore-pl-sweep``, RewardBench 2) on top of everything else."""
