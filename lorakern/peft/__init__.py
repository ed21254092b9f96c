"""PEFT integration: PEFT's LoRA layers run through the fused op, and lorakern's methods save as PEFT checkpoints.

``layer`` is the fused forward of a PEFT LoRA layer (fused where the op computes exactly what PEFT
does, else PEFT's own, with the reason); ``patching`` installs it (``patch`` / ``unpatch`` one
model, ``enable`` / ``disable`` every layer of the process) and reports what the calls did;
``export`` writes a lorakern method's adapters as a checkpoint ``peft.PeftModel.from_pretrained``
loads.

>>> import lorakern.peft
>>> lorakern.peft.patch(peft_model)  # doctest: +SKIP
28
"""
from lorakern.peft.export import save_peft
from lorakern.peft.patching import Report, disable, enable, is_enabled, patch, report, unpatch

__all__ = ["patch", "unpatch", "enable", "disable", "is_enabled", "report", "Report", "save_peft"]
