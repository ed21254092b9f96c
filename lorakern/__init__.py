"""lorakern: LoRA-family fine-tuning and serving at the speed of the frozen base layer.

>>> import torch, lorakern
>>> layer = lorakern.LoRALinear(64, 32, r=8)
>>> layer(torch.randn(4, 64)).shape
torch.Size([4, 32])
"""
from lorakern.batch import ActiveRanks, AdapterBatch
from lorakern.modules import LoRALinear
from lorakern.ops import BACKENDS, backend_status, lora_linear
from lorakern.reference import reference_lora_linear
from lorakern.update import lora_update

__version__ = "0.1.0"
__all__ = ["lora_linear", "lora_update", "LoRALinear", "AdapterBatch", "ActiveRanks", "reference_lora_linear", "backend_status", "BACKENDS", "__version__"]
