"""The LoRA family as method classes over the one op: ``m.apply(model)``, ``m.attach(optimizer)``.

Each class takes its hyperparameters as keyword arguments; ``apply`` swaps the targeted
``nn.Linear`` layers for lorakern modules and freezes the rest, ``attach`` registers the
method's optimizer-side logic as step hooks, ``regularization`` gives its extra loss term.

>>> import torch
>>> from lorakern.methods import LoRA
>>> net = LoRA(r=4, target_modules=["0"]).apply(torch.nn.Sequential(torch.nn.Linear(16, 8)))
>>> type(net[0]).__name__
'LoRALinear'
"""
from lorakern.methods.adalora import AdaLoRA
from lorakern.methods.base import Method
from lorakern.methods.cglora import CGLoRA
from lorakern.methods.dora import DoRA
from lorakern.methods.igulora import IGULoRA
from lorakern.methods.lora import LoRA
from lorakern.methods.reflora import RefLoRA
from lorakern.methods.tied import TiedLoRA
from lorakern.methods.vera import VeRA

__all__ = ["Method", "LoRA", "TiedLoRA", "VeRA", "AdaLoRA", "IGULoRA", "RefLoRA", "CGLoRA", "DoRA"]
