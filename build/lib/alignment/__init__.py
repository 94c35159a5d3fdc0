"""alignflow's core library: losses, advantage estimators, models, sampling and trainers of RLHF.

Plain PyTorch + transformers + accelerate; no orchestration or tracking imports.
"""

__version__ = "0.1.0"
