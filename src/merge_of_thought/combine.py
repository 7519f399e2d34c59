"""Weighted merging of existing LoRA adapters of one base model (``mot merge``).

``linear`` is the exact weighted mean of the adapters' deltas, ``sum_i w_i B_i A_i`` with ``sum_i w_i = 1``,
kept as concatenated factors (rank ``sum_i r_i``, mixed ranks included). PEFT's
``add_weighted_adapter(combination_type="linear")`` is a different thing: it sums ``sqrt(w_i) A_i`` and
``sqrt(w_i) B_i`` separately, so the product carries cross terms ``B_i A_j`` and needs equal ranks; PEFT's
``"cat"`` is the exact weighted sum (what ``linear`` here computes, with the weights normalized).

``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` are PEFT's own functions from
:mod:`peft.utils.merge_utils`, applied to each layer's dense delta (not to A and B separately, as PEFT's
non-SVD variants do). Their result is full-rank: it becomes an adapter through a truncated SVD whose error is
reported, or is folded into the base model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import merge_utils

from . import adapters
from .hub import hub_id, is_local_path
from .merging import LowRankDelta, MergeReport, concatenate, from_dense

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_FILES = f"{adapters.ADAPTER_CONFIG} and {adapters.ADAPTER_WEIGHTS}"


@dataclass
class Adapter:
    """One input adapter: where it came from, its config and its fp32 deltas by module name."""

    source: str
    config: LoraConfig
    deltas: dict[str, LowRankDelta]

    @property
    def base_model(self) -> str | None:
        return hub_id(self.config.base_model_name_or_path)


def resolve(source: str, allow_pickle: bool = False, token: str | bool | None = None) -> Path:
    """A local adapter folder as given, or a Hub id downloaded with ``snapshot_download`` (adapter files only)."""
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if is_local_path(source) or os.path.exists(source):
        raise FileNotFoundError(f"adapter {source!r}: no such folder (a local adapter is a folder with {_FILES}).")
    patterns = [adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS] + ([adapters.ADAPTER_PICKLE] if allow_pickle else [])
    try:
        return Path(snapshot_download(source, allow_patterns=patterns, token=token))
    except HFValidationError:
        raise FileNotFoundError(
            f"adapter {source!r}: neither a local folder nor a Hub repo id (org/name); a local adapter is a folder "
            f"with {_FILES}."
        ) from None
    except (RepositoryNotFoundError, LocalEntryNotFoundError) as error:
        reason = "no such repository (or a private one: pass --token)"
        if isinstance(error, LocalEntryNotFoundError):
            reason = f"the Hub could not be reached and it is not in the cache ({str(error).splitlines()[0]})"
        raise FileNotFoundError(f"adapter {source!r}: no such local folder, and on the Hub: {reason}.") from None


def load(source: str, allow_pickle: bool = False, token: str | bool | None = None) -> Adapter:
    """Read one LoRA adapter, refusing what is not a weight delta ``B @ A`` on the original base weights."""
    folder = resolve(source, allow_pickle, token)
    config = LoraConfig.from_pretrained(str(folder))  # raises for a non-LoRA PEFT config
    if config.peft_type.value != "LORA":
        raise ValueError(f"{source}: a {config.peft_type.value} adapter, not LoRA; only LoRA deltas can be merged.")
    for option, why in adapters._UNSUPPORTED_LORA_OPTIONS.items():
        if getattr(config, option, None):
            raise ValueError(f"{source}: {option}={getattr(config, option)!r} cannot be merged: {why}.")
    if config.bias != "none":
        raise ValueError(f"{source}: bias={config.bias!r} trains biases, which are not part of the LoRA delta.")
    if config.fan_in_fan_out:
        raise ValueError(f"{source}: fan_in_fan_out (GPT-2 Conv1D layers) is not supported.")
    init = str(config.init_lora_weights).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{source}: init_lora_weights={config.init_lora_weights!r} rewrites the base weights, so its delta is "
            "not relative to the original base. Save it converted (path_initial_model_for_weight_conversion)."
        )
    return Adapter(source, config, adapters.load_delta(folder, allow_pickle=allow_pickle))


def check_compatible(loaded: Sequence[Adapter], allow_different_base: bool = False) -> str | None:
    """The common base model; raise naming the adapters and the reason when they cannot be merged."""
    bases = {a.base_model for a in loaded if a.base_model}
    if len(bases) > 1 and not allow_different_base:
        listing = "; ".join(f"{a.source}: {a.base_model}" for a in loaded)
        raise ValueError(
            f"the adapters were trained on different base models ({listing}). A LoRA delta only means something on "
            "its own base; pass --allow-different-base (allow_different_base=True) if these are the same weights."
        )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in loaded:
        for name, delta in adapter.deltas.items():
            seen = shapes.setdefault(name, (delta.shape, adapter.source))
            if seen[0] != delta.shape:
                raise ValueError(
                    f"{name} is {seen[0][0]}x{seen[0][1]} in {seen[1]} but {delta.shape[0]}x{delta.shape[1]} in "
                    f"{adapter.source}: the adapters target different model shapes and cannot be merged."
                )
    return next(iter(bases)) if len(bases) == 1 else (loaded[0].base_model if loaded else None)


def normalized(weights: Sequence[float] | None, count: int, normalize: bool = True) -> list[float]:
    """Uniform ``1/n`` by default; given weights are scaled to sum to 1 (a weighted mean) unless ``normalize=False``."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"got {len(values)} weights for {count} adapters.")
    if any(not math.isfinite(w) for w in values):
        raise ValueError(f"weights must be finite, got {values}.")
    if not normalize:
        return values
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights must have a positive sum to be normalized, got {values}.")
    return [w / total for w in values]


def layer_names(loaded: Sequence[Adapter]) -> list[str]:
    """Every module any adapter touches; an adapter that does not touch a module contributes a zero delta there."""
    return sorted({name for adapter in loaded for name in adapter.deltas})


def merge_linear(loaded: Sequence[Adapter], weights: Sequence[float]) -> dict[str, LowRankDelta]:
    """``sum_i w_i dW_i`` per layer, exactly, as concatenated factors."""
    merged = {}
    for name in layer_names(loaded):
        parts = [(a.deltas[name], w) for a, w in zip(loaded, weights) if name in a.deltas]
        merged[name] = concatenate([d for d, _ in parts], [w for _, w in parts])
    return merged


def merge_dense(
    loaded: Sequence[Adapter],
    weights: Sequence[float],
    method: str,
    density: float,
    majority_sign_method: str = "total",
) -> dict[str, torch.Tensor]:
    """One PEFT merge_utils method per layer on the dense deltas (DARE's random pruning uses torch's seed)."""
    if method not in METHODS[1:]:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}.")
    merge = getattr(merge_utils, method)
    extra = {"majority_sign_method": majority_sign_method} if method.endswith("ties") else {}
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    merged = {}
    for name in layer_names(loaded):
        shape = next(a.deltas[name].shape for a in loaded if name in a.deltas)
        tensors = [a.deltas[name].dense() if name in a.deltas else torch.zeros(shape) for a in loaded]
        merged[name] = merge(tensors, weight_tensor, density=density, **extra)
    return merged


def to_low_rank(
    dense: dict[str, torch.Tensor], rank: int | dict[str, int]
) -> tuple[dict[str, LowRankDelta], dict[str, MergeReport]]:
    """Dense deltas as LoRA factors of at most ``rank`` (per layer, or one for all) with the truncation error."""
    out, reports = {}, {}
    for name, delta in dense.items():
        budget = rank[name] if isinstance(rank, dict) else rank
        out[name], dropped = from_dense(delta, max_rank=budget)
        norm = float(delta.double().norm())
        reports[name] = MergeReport(min(delta.shape), out[name].rank, dropped, norm)
    return out, reports
