"""The accelerate Accelerator every trainer's optimisation runs on, made safe for stages that run in threads
of one process (settings.concurrent_stages), each with its own mixed-precision setting."""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
from accelerate import Accelerator

ACCELERATOR_LOCK = threading.Lock()  # one accelerator set up (state reset, model prepared) at a time


def _allow_mixed_precision(mixed_precision: str) -> None:
    """accelerate keeps one mixed-precision setting a process and refuses another: stages of one pipeline run
    in one process, and each may set its own (SFT "no", DPO "bf16"). The accelerator state (not the
    process group) is reset when a stage asks for another setting than the one before."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and str(current) != mixed_precision:
        AcceleratorState._reset_state()


class StageAccelerator(Accelerator):
    """An Accelerator that keeps the state it was made with. accelerate's Accelerators share one state a process
    and read it back at every step (device, mixed precision at each autocast and gradient unscale). When stages run in
    threads of one process (settings.concurrent_stages) and a later one resets it for another setting (DPO
    "bf16", then PPO "no"), the first would go on autocasting in CUDA's default fp16 without a scaler, or clip
    fp16 gradients before unscaling them, or find the state empty while it is being rebuilt."""

    def __init__(self, mixed_precision: str, **kwargs):
        _allow_mixed_precision(mixed_precision)
        super().__init__(mixed_precision=mixed_precision, **kwargs)
        self.state = copy.copy(self.state)  # this accelerator's own: a later reset clears the shared one only

    @contextlib.contextmanager
    def autocast(self, autocast_handler=None):
        """accelerate's autocast, at this accelerator's setting (accelerate's reads the shared state)."""
        handler = autocast_handler or self.autocast_handler
        if not self.native_amp:
            yield
            return
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, **(handler.to_kwargs() if handler else {})):
            yield
