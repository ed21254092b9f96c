"""PEFT integration: PEFT's LoRA layers run through the fused op, and lorakern's methods save as PEFT checkpoints.

``layer`` is the fused forward of a PEFT LoRA layer (fused where the op computes exactly what PEFT
does, else PEFT's own, with the reason); ``patching`` installs it (``patch`` / ``unpatch`` one
model, ``enable`` / ``disable`` every layer of the process) and reports what the calls did;
``export`` writes a lorakern method's adapters as a checkpoint ``peft.PeftModel.from_pretrained``
loads.

Needs ``pip install "lorakern[peft]"`` (PEFT, Mangrulkar et al., github.com/huggingface/peft).

- ``patch(model) -> int``: patches ``model``'s PEFT LoRA layers in place and returns how many now
  run fused (patched layers whose active adapters the op can fuse; ``report(model).fused``). One
  WARNING names the layers that will not run fused and why (or that ``model`` has no PEFT LoRA
  layer); the full report is logged at INFO on the ``lorakern.peft`` loggers.
  ``unpatch(model) -> int`` restores PEFT's forward and returns the layers restored.
- ``enable()`` / ``disable()`` / ``is_enabled()``: every PEFT ``lora.Linear`` of the process,
  present and future (for Trainer / TRL scripts that never hold the model).
- ``report(model) -> Report``: layers fused, the reason for each that is not, calls since patch.
- ``save_peft(method, model, path)``: a ``lorakern.methods`` model as a PEFT checkpoint.

Each raises TypeError for a ``model`` that is not an ``nn.Module``. Parameters stay the same
objects: state dicts, ``save_pretrained`` and ``merge_and_unload`` are unchanged. A layer the op
cannot compute exactly runs PEFT's own forward (DEBUG logs the reason).

>>> import torch, lorakern.peft
>>> from peft import LoraConfig, get_peft_model
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> model = get_peft_model(net, LoraConfig(r=4, target_modules=["0", "2"]))
>>> lorakern.peft.patch(model)
2
>>> model(torch.randn(3, 16)).shape
torch.Size([3, 4])
>>> lorakern.peft.report(model).fused, lorakern.peft.unpatch(model)
(2, 2)
"""
from lorakern.peft.export import save_peft
from lorakern.peft.patching import Report, disable, enable, is_enabled, patch, report, unpatch

__all__ = ["patch", "unpatch", "enable", "disable", "is_enabled", "report", "Report", "save_peft"]
