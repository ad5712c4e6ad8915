"""Training stages: supervised fine-tuning and distillation (off-policy, on-policy, seqKD)."""
