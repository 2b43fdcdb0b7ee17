"""`synthalign train`: DPO with LoRA on Ray Train (TRL DPOTrainer, PEFT, DeepSpeed)."""
