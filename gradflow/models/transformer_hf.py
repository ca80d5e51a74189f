"""Hugging Face transformers built from a config, never downloaded: ``hf:gpt2``, ``hf:llama``, ``hf:bert``.

``build_hf("gpt2", {"n_layer": 12, "n_embd": 256})`` makes ``AutoConfig.for_model``
with those fields and builds the model with a language-modelling head from it
(masked LM where transformers has one, as for BERT; else causal LM), so the probe gets
token logits [B, T, vocab]. Nothing is fetched from the Hub. Every override
must be a field of the model type's config (a misspelt key would otherwise be
stored and ignored). Where the width was changed but the head count was not
and the default no longer divides it (GPT-2's 12 heads and ``n_embd=256``),
the largest head count that divides it is used and a warning says so. The
cache is off (``use_cache=False``) unless asked for: a probe runs one training
step, not generation.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch.nn as nn

from gradflow.errors import GradflowError, first_line, unknown
from gradflow.utils.checks import check_model_options

# (heads field, width field) pairs across config classes
_HEADS = (("n_head", "n_embd"), ("num_attention_heads", "hidden_size"))


def _fit_heads(cfg: Any, overrides: dict, model_type: str) -> dict:
    """Pick a head count that divides the width when only the width was given; say so."""
    changed = {}
    for heads, width in _HEADS:
        if not (hasattr(cfg, heads) and hasattr(cfg, width)) or heads in overrides or width not in overrides:
            continue
        h, d = int(getattr(cfg, heads)), int(getattr(cfg, width))
        if d % h == 0:
            continue
        fit = max(k for k in range(1, h + 1) if d % k == 0)
        setattr(cfg, heads, fit)
        changed[heads] = fit
        kv = getattr(cfg, "num_key_value_heads", None)
        if kv is not None and "num_key_value_heads" not in overrides and fit % int(kv):
            cfg.num_key_value_heads = fit
            changed["num_key_value_heads"] = fit
        warnings.warn(f"hf:{model_type}: {width}={d} is not divisible by the default {heads}={h}; "
                      f"using {heads}={fit} (pass {heads}=... in --hf-config to choose)", stacklevel=3)
    return changed


def build_hf(model_type: str, overrides: dict) -> tuple[nn.Module, dict, dict]:
    """Build a Hugging Face model of ``model_type`` from its default config with ``overrides``.

    Args:
        model_type: a transformers model type (``gpt2``, ``llama``, ``bert``, ``mistral`` ...).
        overrides: config fields to set (``{"n_layer": 12, "n_embd": 256}``).
    Returns:
        (module, the config fields set, including any head count chosen and ``use_cache``,
        ``{"vocab_size": V, "seq_len": max positions}``).
    """
    try:
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError:
        raise GradflowError("hf:... models need transformers: pip install 'gradflow[hf]' "
                            "(or pip install transformers)") from None
    if model_type not in CONFIG_MAPPING:
        raise unknown("Hugging Face model type", model_type, list(CONFIG_MAPPING.keys()))
    cfg = transformers.AutoConfig.for_model(model_type)
    bad = sorted(k for k in overrides if not hasattr(cfg, k))
    if bad:
        fields = sorted(k for k in cfg.to_dict() if not k.startswith("_"))
        close = sorted({c for b in bad for c in difflib.get_close_matches(b, fields, n=3)})
        raise GradflowError(f"hf:{model_type}: its config has no field {', '.join(map(repr, bad))}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; fields include: {', '.join(fields[:40])}")
    # each field keeps its default's kind (n_embd=nan is not a width), then the config's own checks
    check_model_options(overrides, {k: getattr(cfg, k) for k in overrides},
                        where=lambda k: f"hf:{model_type} --hf-config {k}")
    for k, v in overrides.items():
        try:
            setattr(cfg, k, v)
        except Exception as e:  # noqa: BLE001  (transformers' strict configs raise several types)
            raise GradflowError(f"hf:{model_type} --hf-config {k}={v!r}: the config refused it "
                                f"({type(e).__name__}: {first_line(e)}); pass a value like its default "
                                f"{k}={getattr(cfg, k)!r}") from None
    used = dict(overrides, **_fit_heads(cfg, overrides, model_type))
    if hasattr(cfg, "use_cache") and "use_cache" not in overrides:
        cfg.use_cache = False
        used["use_cache"] = False
    # masked LM first: encoders (BERT) have both heads, and their causal one expects is_decoder=True
    kinds = (("masked LM", transformers.AutoModelForMaskedLM),
             ("causal LM", transformers.AutoModelForCausalLM))
    for _, auto in kinds:
        if type(cfg) in auto._model_mapping:
            try:
                module = auto.from_config(cfg)
            except Exception as e:  # noqa: BLE001  (transformers refuses bad configs with many types)
                raise GradflowError(f"hf:{model_type} with {overrides}: transformers refused the config "
                                    f"({type(e).__name__}: {first_line(e)}); "
                                    "fix the --hf-config fields") from None
            break
    else:
        raise GradflowError(f"hf:{model_type} has no causal- or masked-LM head in transformers "
                            f"{transformers.__version__}: the probe needs token logits [batch, seq, vocab]")
    seq = next((int(getattr(cfg, f)) for f in ("n_positions", "max_position_embeddings")
                if isinstance(getattr(cfg, f, None), int)), None)
    return module, used, {"vocab_size": int(cfg.vocab_size), "seq_len": seq}
