"""Trainers: SFT, reward model, DPO and PPO, on accelerate (CPU, one GPU, or several via accelerate launch)."""
