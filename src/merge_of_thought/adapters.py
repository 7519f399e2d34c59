"""PEFT glue: fresh branch adapters, reading their deltas, and holding the merged student as a frozen adapter.

The student is ``base + D_t`` where the base model stays exactly as loaded (4-bit, 8-bit, bf16 or fp32: never
re-quantized) and ``D_t`` lives in a frozen LoRA adapter named :data:`MERGED_ADAPTER` whose factors (fp32, or the
mixed-precision compute dtype) are the recompressed sum of every merged branch (scaling 1: ``lora_alpha == r``).
A branch trains a second, fresh adapter on top of it. Because the merged state is an ordinary PEFT LoRA adapter, it
saves, loads and exports with PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_DEFAULT_TARGETS
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from . import fused
from .library_noise import peft_adapter_deleted, peft_checkpointing_alias
from .merging import LowRankDelta
from .quantization import keep_4bit_layout

MERGED_ADAPTER = "mot_merged"
BRANCH_ADAPTER = "mot_branch"  # one adapter that every branch of a round re-initialises (PEFT's add_adapter is slow)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."  # before each module name in a saved adapter's keys
# What every adapter MoT writes of a merged delta says it is for: MoT distils causal LMs only, and without a task type
# AutoPeftModelForCausalLM cannot load the adapter and PeftModel.from_pretrained returns a plain PeftModel.
SAVED_TASK_TYPE = "CAUSAL_LM"

_UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": "DoRA rescales the weight by a trained magnitude, so its change is not a low-rank delta",
    "lora_bias": "a trained LoRA bias is not part of the low-rank delta that MoT averages",
    "modules_to_save": "fully trained modules are not low-rank deltas; MoT averages LoRA deltas only",
    "trainable_token_indices": "trained token embeddings are not low-rank deltas",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported yet",
}


def validate_lora_config(peft_config: object) -> LoraConfig:
    """Accept only LoRA settings whose trained change is exactly ``B @ A * scaling`` on linear layers."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(
            f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}: MoT averages LoRA deltas "
            "(B @ A * scaling) in weight space, which other PEFT methods do not produce."
        )
    for option, why in _UNSUPPORTED_LORA_OPTIONS.items():
        if getattr(peft_config, option, None):
            raise ValueError(f"LoraConfig({option}={getattr(peft_config, option)!r}) is not supported: {why}.")
    if peft_config.bias != "none":
        raise ValueError(f"LoraConfig(bias={peft_config.bias!r}) is not supported: MoT averages weight deltas only.")
    if peft_config.init_lora_weights not in (True, "gaussian"):
        raise ValueError(
            f"LoraConfig(init_lora_weights={peft_config.init_lora_weights!r}) is not supported: a branch must start "
            "at the student (B = 0), and initialisations such as PiSSA or LoftQ rewrite the base weights."
        )
    return peft_config


def check_targets(model: PreTrainedModel, peft_config: LoraConfig) -> list[str]:
    """The names of the linear modules the config adapts; a clear error if it adapts nothing or non-linear layers.

    ``target_modules=None`` (e.g. TRL's ``--use_peft`` without ``--lora_target_modules``) gets PEFT's default for the
    architecture, as ``get_peft_model`` would pick it.
    """
    if peft_config.target_modules is None and model.config.model_type in LORA_DEFAULT_TARGETS:
        peft_config.target_modules = set(LORA_DEFAULT_TARGETS[model.config.model_type])
    if peft_config.target_modules is None:
        raise ValueError(
            f"LoraConfig has no target_modules and PEFT has no default for {model.config.model_type!r}: set "
            "target_modules (e.g. 'all-linear')."
        )
    matched, linear_names = [], set()
    all_linear = peft_config.target_modules == "all-linear"  # PEFT's shorthand: every linear but the output layer
    output_layer = model.get_output_embeddings()
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear:
            linear_names.add(name.rsplit(".", 1)[-1])
        if all_linear:
            if is_linear and module is not output_layer:
                matched.append(name)
        elif name and check_target_module_exists(peft_config, name):
            if not is_linear:
                raise ValueError(
                    f"LoRA target {name!r} is a {type(module).__name__}; MoT merges linear layers only."
                )
            matched.append(name)
    if not matched:
        raise ValueError(
            f"LoRA target_modules={peft_config.target_modules!r} match no module of {type(model).__name__}. "
            f"Its linear layers are named: {', '.join(sorted(linear_names))}."
        )
    return matched


def layer_dims(model: PreTrainedModel, module_names: list[str]) -> list[tuple[int, int]]:
    """(in_features, out_features) of each named linear module: what sizes an adapter on them."""
    return [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in module_names]


def add_branch_adapter(
    model: PreTrainedModel | PeftModel, name: str, peft_config: LoraConfig, seed: int, one_pass: bool = True
) -> PeftModel:
    """Make ``name`` a fresh LoRA adapter (B = 0, A drawn from ``seed``) and the only trainable one, above the frozen
    merged state. An adapter of that name already attached (the round's previous branch) is re-initialised in place:
    PEFT's ``add_adapter`` scans every module of the model against every adapter layer (0.5 s a branch on
    SmolLM2-135M), and either way A depends on ``seed`` alone, so a resumed round starts its branches as before.

    ``one_pass`` computes the frozen merged adapter and the branch in one low-rank pass (fused.py); False keeps
    PEFT's pass per adapter (the same arithmetic, slower: for comparisons).
    """
    if not isinstance(model, PeftModel):
        with peft_checkpointing_alias():
            model = get_peft_model(model, peft_config, adapter_name=name)
    elif name not in model.peft_config:
        model.add_adapter(name, peft_config)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.reset_lora_parameters(name, peft_config.init_lora_weights)  # PEFT's own init (check_lora_config)
    activate(model, trainable=name, one_pass=one_pass)
    return model


def silence_adapter(model: PeftModel, name: str) -> None:
    """Zero the factor of ``name`` that PEFT starts at zero (B; an embedding's A): the model then computes exactly
    what it would without the adapter until the next branch re-initialises it. Only for finite weights (NaN * 0 is
    NaN): a diverged branch's adapter is removed instead."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].weight.zero_()
                if layer.lora_B[name].bias is not None:
                    layer.lora_B[name].bias.zero_()
            if name in layer.lora_embedding_A:
                layer.lora_embedding_A[name].zero_()


def remove_adapter(model: PreTrainedModel | PeftModel, name: str) -> None:
    """Delete one of MoT's adapters, if attached; PEFT's notice that the active one is gone (MoT re-activates what it
    needs) is dropped for this call only."""
    if isinstance(model, PeftModel) and name in model.peft_config:
        with peft_adapter_deleted():
            model.delete_adapter(name)


def activate(model: PeftModel, trainable: str | None, one_pass: bool = False) -> None:
    """Make the merged state (if any) and ``trainable`` apply; only ``trainable`` gets gradients.

    With ``one_pass``, wherever a layer holds both, ``trainable``'s forward includes the merged adapter (fused.py)
    and only ``trainable`` is active; where the merged adapter covers a layer the branch does not, both stay
    active in PEFT's own passes. Without it, both are active and each runs its own pass.
    """
    names = [n for n in (MERGED_ADAPTER, trainable) if n is not None and n in model.peft_config]
    layers = lora_layers(model).values()
    merged_layers = [layer for layer in layers if MERGED_ADAPTER in layer.lora_A]
    one_pass = one_pass and len(names) == 2 and all(trainable in layer.lora_A for layer in merged_layers)
    for layer in layers:
        if trainable in layer.lora_A:
            frozen = MERGED_ADAPTER if one_pass and MERGED_ADAPTER in layer.lora_A else None
            fused.set_frozen(layer, trainable, frozen)
    model.base_model.set_adapter([trainable] if one_pass else names)
    model.active_adapter = names[-1]  # PeftModel's own record; the trainer reads the trainable one's config
    if MERGED_ADAPTER in model.peft_config:
        model.set_requires_grad(MERGED_ADAPTER, requires_grad=False)


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """Adapted layers by module name inside the base model (``model.layers.0.self_attn.q_proj``)."""
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen base weight of an adapted layer in fp32, dequantized for bitsandbytes 4-bit and 8-bit layers.

    Reads the quantized state without touching it: PEFT's ``dequantize_module_weight`` re-assigns an 8-bit weight
    on the CPU, which drops the scales bitsandbytes moved into ``layer.state`` and breaks the next forward. (A 4-bit
    weight that bitsandbytes repacked for CPU inference is first brought back to the layout it reads: quantization.py.)
    """
    base = layer.get_base_layer()
    keep_4bit_layout(base)
    weight = base.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        scales = weight.SCB if weight.SCB is not None else base.state.SCB
        return weight.data.float() * (scales.float()[:, None] / 127.0)
    return weight.detach().float()


@dataclass
class AdapterWeights:
    """One LoRA adapter detached from the model: what PEFT saves for it, plus each layer's exact scaling.

    Plain tensors and dicts, so another process can receive it (``distributed.py``) and save or merge it exactly as
    the process that trained it would.
    """

    state: dict[str, torch.Tensor]  # PEFT's saved keys (``base_model.model.<module>.lora_{A,B}.weight``), fp32 CPU
    config: dict  # the adapter's LoraConfig as a dict
    scaling: dict[str, float]  # module name -> the layer's ``scaling`` for this adapter

    def deltas(self) -> dict[str, LowRankDelta]:
        """The fp32 delta ``B @ A * scaling`` of every layer (scaling folded into B)."""
        deltas = {}
        for module, factor in self.scaling.items():
            key = f"base_model.model.{module}"
            B, A = self.state[f"{key}.lora_B.weight"], self.state[f"{key}.lora_A.weight"]
            deltas[module] = LowRankDelta(B * factor, A)
        return deltas

    def save(self, folder: Path, base_model_name_or_path: str | None) -> None:
        """Write the adapter in PEFT's format (safetensors + adapter_config.json) straight into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state, folder / ADAPTER_WEIGHTS)
        config = LoraConfig(**self.config)
        config.base_model_name_or_path = base_model_name_or_path
        config.save_pretrained(folder)


def detach_adapter(model: PeftModel, adapter: str) -> AdapterWeights:
    """Copy one adapter's weights (fp32, CPU), config and per-layer scaling out of the model."""
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    scaling = {name: layer.scaling[adapter] for name, layer in lora_layers(model).items() if adapter in layer.lora_A}
    return AdapterWeights(
        # copies (the live adapter may be recast later), contiguous for safetensors: one copy per tensor
        state={k: v.detach().to("cpu", torch.float32, copy=True, memory_format=torch.contiguous_format)
               for k, v in state.items()},  # fmt: skip
        config=model.peft_config[adapter].to_dict(),
        scaling=scaling,
    )


def merged_adapter_config(
    merged: Mapping[str, LowRankDelta], base_model_name_or_path: str | None, rank_multiple: int = 1
) -> LoraConfig:
    """A plain LoRA config that reproduces ``merged`` with scaling 1, padded to one rank for every layer (rounded up
    to a multiple of ``rank_multiple``)."""
    rank = math.ceil(max(d.rank for d in merged.values()) / rank_multiple) * rank_multiple
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(merged),
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
    )


def _padded(delta: LowRankDelta, rank: int) -> LowRankDelta:
    extra = rank - delta.rank
    if extra == 0:
        return delta
    B = torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1)
    A = torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0)
    return LowRankDelta(B, A)


def merged_state_dict(merged: Mapping[str, LowRankDelta], rank: int) -> dict[str, torch.Tensor]:
    """The merged delta as PEFT's saved state dict (keys ``base_model.model.<module>.lora_{A,B}.weight``)."""
    state = {}
    for name, delta in merged.items():
        padded = _padded(delta, rank)
        state[f"base_model.model.{name}.lora_A.weight"] = padded.A.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = padded.B.contiguous()
    return state


def install_merged(
    model: PreTrainedModel | PeftModel,
    merged: Mapping[str, LowRankDelta],
    base_model_name_or_path: str | None,
    task_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    rank_multiple: int = 1,
) -> PeftModel:
    """Replace the frozen merged-state adapter with ``merged``, its factors in ``dtype`` (fp32 unless a mixed-precision
    run computes them in bf16 or fp16; frozen.py), whatever the base precision; its rank is padded with zeros to a
    multiple of ``rank_multiple`` (the product, and what is saved, are unchanged).

    A plain model (a resumed run) is wrapped with ``task_type``, the PeftModel class its branches would create.
    """
    config = merged_adapter_config(merged, base_model_name_or_path, rank_multiple)
    # low_cpu_mem_usage: the adapter is created on the meta device, not initialised and then overwritten (at round 5
    # of K=4, r=16 that initialisation alone was as large as the whole merged delta)
    if not isinstance(model, PeftModel):
        config.task_type = task_type
        model = get_peft_model(model, config, adapter_name=MERGED_ADAPTER, low_cpu_mem_usage=True)
    else:
        if MERGED_ADAPTER in model.peft_config:
            model.delete_adapter(MERGED_ADAPTER)
        model.add_adapter(MERGED_ADAPTER, config, low_cpu_mem_usage=True)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, delta in merged.items():
            padded = _padded(delta, config.r)
            layer = layers[name]
            device = layer.get_base_layer().weight.device
            layer.lora_A[MERGED_ADAPTER].weight = torch.nn.Parameter(padded.A.to(device, dtype), requires_grad=False)
            layer.lora_B[MERGED_ADAPTER].weight = torch.nn.Parameter(padded.B.to(device, dtype), requires_grad=False)
    activate(model, trainable=None)
    return model


def save_merged(merged: Mapping[str, LowRankDelta], folder: Path, base_model_name_or_path: str | None) -> None:
    """Write the merged state as a PEFT LoRA adapter that applies to the base model the run started from; it loads
    with ``AutoPeftModelForCausalLM`` (task type ``CAUSAL_LM``)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = merged_adapter_config(merged, base_model_name_or_path)
    config.task_type = SAVED_TASK_TYPE
    save_file(merged_state_dict(merged, config.r), folder / ADAPTER_WEIGHTS)
    config.save_pretrained(folder)


def load_delta(folder: str | Path, allow_pickle: bool = False) -> dict[str, LowRankDelta]:
    """Read a saved PEFT LoRA adapter back as fp32 deltas (scaling from its config, including rank/alpha patterns).

    Only linear-layer LoRA weights are accepted: anything else in the file (embedding or convolution LoRA, DoRA
    magnitudes, trained biases or full modules) raises, because it would be silently lost from the delta.
    """
    folder = Path(folder)
    config = LoraConfig.from_pretrained(str(folder))
    state = read_adapter_weights(folder, allow_pickle)
    deltas = {}
    for key, A in state.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{folder}: {key!r} is not a linear LoRA factor; only B @ A deltas can be read.")
            continue
        module = key[len(PEFT_KEY_PREFIX) : -len(".lora_A.weight")]
        B = state[key.replace(".lora_A.", ".lora_B.")]
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"{folder}: {module} has {A.dim()}-d LoRA factors; only linear layers are supported.")
        deltas[module] = LowRankDelta(B.float() * adapter_scaling(config, module), A.float())
    return deltas


def adapter_scaling(config: LoraConfig, module: str) -> float:
    """The factor PEFT multiplies ``B @ A`` by in ``module`` (rank and alpha patterns, rsLoRA included)."""
    r, alpha = _rank_and_alpha(config, module)
    return alpha / (r**0.5) if config.use_rslora else alpha / r


def read_adapter_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """An adapter's tensors from ``adapter_model.safetensors``; a pickled ``.bin`` only when explicitly allowed.

    Unpickling runs code from the file, so a ``.bin`` adapter is refused by default; when allowed it is read with
    ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
    """
    if (folder / ADAPTER_WEIGHTS).exists():
        return load_file(str(folder / ADAPTER_WEIGHTS))
    pickled = folder / ADAPTER_PICKLE
    if pickled.exists():
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only {ADAPTER_PICKLE}, a pickle file that can run code when loaded. Convert it "
                "to safetensors, or allow it explicitly (allow_pickle=True, or --allow-pickle) if you trust it."
            )
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS}: it is not a saved PEFT adapter.")


def _rank_and_alpha(config: LoraConfig, module: str) -> tuple[int, float]:
    rank, alpha = config.r, config.lora_alpha
    for pattern, value in (config.rank_pattern or {}).items():
        if module == pattern or module.endswith("." + pattern):
            rank = value
    for pattern, value in (config.alpha_pattern or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return rank, alpha


def quantization_summary(model: PreTrainedModel) -> dict[str, Any] | None:
    """How the student's base weights are quantized (``{"method", "bits", "type"}``), or None when they are not.

    Recorded in ``mot_run.json`` so a model card can say that the exports, which apply the delta to the
    full-precision base, differ from the student as trained by the base's quantization error.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    values = config if isinstance(config, dict) else config.to_dict()
    method = values.get("quant_method")
    method = str(getattr(method, "value", method)) if method is not None else None
    bits = 4 if values.get("load_in_4bit") else 8 if values.get("load_in_8bit") else values.get("bits")
    kind = values.get("bnb_4bit_quant_type") if bits == 4 and method == "bitsandbytes" else None
    return {"method": method, "bits": bits, "type": kind}
