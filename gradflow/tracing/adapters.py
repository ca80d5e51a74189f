"""Adapters: the parts of third-party residual blocks, found by class.

Each adapter re-expresses a block's ``forward`` as :class:`~gradflow.tracing.parts.Parts`
(one residual unit) or a :class:`~gradflow.tracing.parts.Block` (several units run in
sequence, e.g. a transformer block's attention and MLP units), calling the
block's own submodules in the block's own order, so the traced forward computes
the same numbers (the tracer checks this on the first call of every unit) while
exposing h, F and y as separate tensors. Blocks are matched by their class's
module and name, so neither torchvision nor timm is imported unless the model
uses them.

Writing an adapter
------------------
An adapter is ``factory(module) -> Parts | Block``, registered for a class::

    from gradflow.tracing.parts import Block, Parts
    from gradflow.tracing.adapters import register_adapter

    def gpt2_block(m):
        def forward(run, hidden_states, *args, **kwargs):
            rest = []
            def attn(z):                       # the branch; the extra arguments reach it here
                out = m.attn(z, *args, **kwargs)
                rest.append(out[1:])           # outputs besides the hidden state
                return out[0]
            x = run.unit(0, Parts(branch=attn, preact=m.ln_1, modules=(m.ln_1, m.attn)), hidden_states)
            x = run.unit(1, Parts(branch=m.mlp, preact=m.ln_2), x)
            return (x,) + rest[0]              # packed as the block's own forward packs it
        return Block(("attn", "mlp"), forward)

    register_adapter("transformers.models.gpt2.modeling_gpt2", "GPT2Block", gpt2_block,
                     stage=None)

* The block's ``forward(run, *args, **kwargs)`` receives exactly the arguments
  the module was called with; ``run.unit(k, parts, x, *extra, **kw)`` evaluates
  unit k and passes ``extra``/``kw`` to its branch (a :class:`Parts` returned
  directly does the same: its branch receives the module's extra arguments).
* Outputs are packed by the block's forward, so tuples, caches and attention
  weights come back as the module returns them.
* ``stage``: an int fixes the stage of the block's units; None (default) lets
  the tracer number stages as runs of consecutive units whose x_l keeps its
  shape.
* ``scalar_coef``: the closed-form coefficient of h (1.0 for a plain sum), or
  None where it depends on the data.

Adapters for other libraries live in their own files beside this one
(``adapters_transformers.py``) and register themselves on import; discovery
imports every ``gradflow.tracing.adapters_*`` module it finds the first time it
looks for units, and silently skips none: an adapter module that fails to import
is an error.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch.nn as nn

from gradflow.tracing.parts import Block, Parts, as_fn


def out_of_place(act: Optional[nn.Module]) -> Optional[nn.Module]:
    """A copy of an activation that does not write into its input.

    The after-addition activation must leave y = h + F intact, so the direct
    path can be taken through it. Activations have no parameters, so a shallow
    copy with ``inplace=False`` computes the same function.
    """
    if act is None or isinstance(act, nn.Identity):
        return None
    if getattr(act, "inplace", False):
        act = copy.copy(act)
        act.inplace = False
    return act


def _tv_basic(m: nn.Module) -> Parts:
    def branch(x):
        return m.bn2(m.conv2(m.relu(m.bn1(m.conv1(x)))))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.relu))


def _tv_bottleneck(m: nn.Module) -> Parts:
    def branch(x):
        x = m.relu(m.bn1(m.conv1(x)))
        x = m.relu(m.bn2(m.conv2(x)))
        return m.bn3(m.conv3(x))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.relu))


def _timm_tail(m: nn.Module, x):
    if getattr(m, "se", None) is not None:
        x = m.se(x)
    if getattr(m, "drop_path", None) is not None:
        x = m.drop_path(x)
    return x


def _timm_basic(m: nn.Module) -> Parts:
    def branch(x):
        x = m.aa(m.act1(m.drop_block(m.bn1(m.conv1(x)))))
        return _timm_tail(m, m.bn2(m.conv2(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.act2))


def _timm_bottleneck(m: nn.Module) -> Parts:
    def branch(x):
        x = m.act1(m.bn1(m.conv1(x)))
        x = m.aa(m.act2(m.drop_block(m.bn2(m.conv2(x)))))
        return _timm_tail(m, m.bn3(m.conv3(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.act3))


def _timm_preact_basic(m: nn.Module) -> Parts:
    def branch(z):
        return m.drop_path(m.conv2(m.norm2(m.conv1(z))))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), preact=m.norm1,
                 shortcut_preact=m.downsample is not None)


def _timm_preact_bottleneck(m: nn.Module) -> Parts:
    def branch(z):
        x = m.conv2(m.norm2(m.conv1(z)))
        return m.drop_path(m.conv3(m.norm3(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), preact=m.norm1,
                 shortcut_preact=m.downsample is not None)


def _timm_v2_bottleneck(m: nn.Module) -> Parts:
    def branch(x):
        x = m.norm2(m.conv2(m.norm1(m.conv1(x))))
        return m.drop_path(m.norm3(m.conv3(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.act3))


Factory = Callable[[nn.Module], Union[Parts, Block]]


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its factory, and what it knows about the block's units."""

    factory: Factory
    stage: Optional[int] = None
    scalar_coef: Optional[float] = 1.0


# (module of the class, class name) -> adapter
ADAPTERS: dict[tuple[str, str], Adapter] = {}


def register_adapter(module: str, name: str, factory: Factory, stage: Optional[int] = None,
                     scalar_coef: Optional[float] = 1.0) -> None:
    """Make blocks of class ``module.name`` units, split by ``factory(block)``.

    Args:
        module: the class's ``__module__`` (``"timm.models.resnet"``).
        name: the class's ``__name__`` (``"Bottleneck"``).
        factory: ``block -> Parts | Block`` (see the module docstring).
        stage: the stage of every unit of such blocks, or None to number stages by shape.
        scalar_coef: the closed-form coefficient of h, or None where it depends on the data.
    """
    ADAPTERS[(module, name)] = Adapter(factory, stage, scalar_coef)


for _key, _factory in {
    ("torchvision.models.resnet", "BasicBlock"): _tv_basic,
    ("torchvision.models.resnet", "Bottleneck"): _tv_bottleneck,
    ("timm.models.resnet", "BasicBlock"): _timm_basic,
    ("timm.models.resnet", "Bottleneck"): _timm_bottleneck,
    ("timm.models.resnetv2", "PreActBasic"): _timm_preact_basic,
    ("timm.models.resnetv2", "PreActBottleneck"): _timm_preact_bottleneck,
    ("timm.models.resnetv2", "Bottleneck"): _timm_v2_bottleneck,
}.items():
    register_adapter(*_key, _factory)

_loaded = False


def load_adapter_modules() -> None:
    """Import every ``gradflow.tracing.adapters_*`` module once, so they register their adapters."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    pkg = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("adapters_"):
            importlib.import_module(f"{__package__}.{info.name}")


def adapter_for(module: nn.Module) -> Optional[Adapter]:
    """The adapter registered for a block's class, else None."""
    load_adapter_modules()
    cls = type(module)
    return ADAPTERS.get((cls.__module__, cls.__name__))
