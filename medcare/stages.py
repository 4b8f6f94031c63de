"""Stage transitions on a transformers model: targeting, stage 1, attention merge, stage 2, final merge.

Model state kept on the model object (plain attributes, never in the state dict):

* ``model.medcare_config``: the :class:`MedCareConfig` of the current stage.
* ``model._medcare_merged``: ``{module name: {"lora_A", "lora_B", "scaling"}}`` for every attention LoRA
  folded into its base weight (by :func:`merge_lora`, :func:`to_stage2` or :func:`~medcare.load_adapter`),
  kept (on the CPU, tiny) so an adapter saved later still carries it and a fresh base model can be rebuilt.
* ``model._medcare_layers``: a cache of the wrapper modules per class (O(layers) penalty/aux collection),
  rebuilt by every stage function.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from medcare.config import MedCareConfig
from medcare.distributed import is_zero3_param
from medcare.modules import LoRALinear, MoLoRALinear, OrthLoRALinear, fold_into

__all__ = ["TargetError", "apply_stage1", "merge_and_unload", "merge_lora", "model_stage", "to_stage2",
           "wrapper_modules"]

_WRAPPERS = (MoLoRALinear, LoRALinear, OrthLoRALinear)


# ---- model state --------------------------------------------------------------------------------------

def wrapper_modules(model: nn.Module, cls: type[nn.Module]) -> tuple[nn.Module, ...]:
    """The ``cls`` wrappers of ``model`` in module order, collected once per stage change and cached."""
    cache = model.__dict__.get("_medcare_layers")
    if cache is None:
        cache = _refresh_cache(model)
    if cls not in cache:
        cache[cls] = tuple(m for m in model.modules() if isinstance(m, cls))
    return cache[cls]


def _refresh_cache(model: nn.Module) -> dict:
    cache: dict = {c: [] for c in _WRAPPERS}
    for m in model.modules():
        for c in _WRAPPERS:
            if isinstance(m, c):
                cache[c].append(m)
    cache = {c: tuple(v) for c, v in cache.items()}
    model.__dict__["_medcare_layers"] = cache
    return cache


def model_stage(model: nn.Module) -> int:
    """1 if the model holds MoLoRA layers, 2 if it holds OrthLoRA layers, 0 if neither."""
    has1 = bool(wrapper_modules(model, MoLoRALinear))
    has2 = bool(wrapper_modules(model, OrthLoRALinear))
    if has1 and has2:
        raise ValueError("the model holds both MoLoRALinear (stage 1) and OrthLoRALinear (stage 2) layers")
    return 1 if has1 else 2 if has2 else 0


def merged_records(model: nn.Module) -> dict[str, dict]:
    """Attention LoRAs folded into base weights: ``{name: {"lora_A", "lora_B", "scaling"}}`` (live dict)."""
    return model.__dict__.setdefault("_medcare_merged", {})


def _record_merge(model: nn.Module, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    merged_records(model)[name] = {"lora_A": lora_A.detach().to("cpu", copy=True),
                                   "lora_B": lora_B.detach().to("cpu", copy=True), "scaling": float(scaling)}


def _config_of(model: nn.Module, config: MedCareConfig | None) -> MedCareConfig:
    if config is None:
        config = getattr(model, "medcare_config", None)
        if config is None:
            raise ValueError("no MedCareConfig given and the model carries none (model.medcare_config): "
                             "pass one, e.g. to_stage2(model, MedCareConfig(...))")
    if not isinstance(config, MedCareConfig):
        raise TypeError(f"config must be a MedCareConfig, got {type(config).__name__}")
    return config


# ---- targeting ----------------------------------------------------------------------------------------

class TargetError(ValueError):
    """The target patterns do not fit the model. Every problem of every group is listed at once.

    ``problems``: ``[(field, text)]`` where ``field`` is the :class:`MedCareConfig` field at fault
    (``"ffn_targets"``, ``"attn_targets"``, ``"layers_pattern"``); :meth:`render` names the fields the caller's
    way (the command line names its flags).
    """

    def __init__(self, problems: list[tuple[str, str]], linear_names: list[str], hint: str = ""):
        self.problems, self.linear_names, self.hint = list(problems), list(linear_names), hint
        super().__init__(self.render())

    def render(self, label: Callable[[str], str] = lambda f: f"MedCareConfig.{f}") -> str:
        """The message with each field named by ``label(field)`` (default ``MedCareConfig.<field>``)."""
        def named(text: str) -> str:
            return re.sub("\x1f(\\w+)\x1f", lambda m: label(m[1]), text)

        lines = [f"{label(f)}: {named(text)}" for f, text in self.problems]
        fields = sorted({f for f, _ in self.problems}
                        | {m for _, t in self.problems for m in re.findall("\x1f(\\w+)\x1f", t)})
        tail = (f"The model's linear layers are: {self.linear_names}. Set {' / '.join(label(f) for f in fields)} "
                f"(a list of module-name suffixes, or one string: a regular expression for the full module name)")
        hint = named(self.hint)
        return "the targets do not fit the model: " + "; ".join(lines) + ". " + tail + (f". {hint}" if hint else "")


def _field(name: str) -> str:
    """A config field inside a problem's text; :meth:`TargetError.render` names it the caller's way."""
    return f"\x1f{name}\x1f"


def _in_layers(name: str, layers_pattern: str) -> bool:
    return re.search(rf"(^|\.){re.escape(layers_pattern)}\.\d+\.", name) is not None


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _place(name: str, layers_pattern: str) -> str:
    """Where in its layer a module sits: ``model.layers.3.mlp.gate_proj`` -> ``mlp.gate_proj``."""
    rel = re.split(rf"(?:^|\.){re.escape(layers_pattern)}\.\d+\.", name, maxsplit=1)[-1]
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", rel)


def linear_names(model: nn.Module) -> list[str]:
    """The model's linear layers (wrappers included), with layer indices collapsed to ``*``."""
    seen: dict[str, None] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, *_WRAPPERS)) and not name.endswith(".router"):
            seen[re.sub(r"\.\d+\.", ".*.", name)] = None
    return list(seen)


def _layer_lists(model: nn.Module) -> list[str]:
    """Names of the numbered module lists that hold linears (``layers``, ``layer``, ``h``), most used first."""
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            for found in re.findall(r"(?:^|\.)([A-Za-z_]\w*)\.\d+\.", name)[:1]:
                counts[found] = counts.get(found, 0) + 1
    return sorted(counts, key=lambda k: -counts[k])


def _match_group(model: nn.Module, field: str, spec: tuple[str, ...] | str, layers_pattern: str,
                 problems: list[tuple[str, str]]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules that ``spec`` selects; what does not fit is appended to ``problems``."""
    if isinstance(spec, str):  # a regex: full match on the full name, any linear of the model
        pattern = re.compile(spec)
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
        if not found:
            problems.append((field, f"the regular expression {spec!r} fully matches no nn.Linear's name"))
        return found
    found, places = [], {t: {} for t in spec}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not _in_layers(name, layers_pattern):
            continue
        # the longest matching suffix claims the module, so ("output.dense", "attention.output.dense") is fine
        hits = [t for t in spec if _matches(name, t)]
        if hits:
            t = max(hits, key=len)
            found.append((name, m))
            place = _place(name, layers_pattern)
            places[t][place] = places[t].get(place, 0) + 1
    missing = [t for t in spec if not places[t]]
    if missing:
        problems.append((field, f"{missing} match no nn.Linear inside the model's layers (modules named "
                                f"'<...>.{layers_pattern}.<i>.<...>')"))
    for t, where in places.items():
        if len(where) > 1:
            shown = ", ".join(f"{p!r} ({n})" for p, n in where.items())
            problems.append((field, f"the suffix {t!r} matches linears at {len(where)} places in each layer: {shown}; "
                                    f"name the one you mean by a longer suffix, list each, or give a regex"))
    return found


def resolve_targets(model: nn.Module, groups: dict[str, tuple[str, ...] | str],
                    layers_pattern: str = "layers") -> dict[str, list[tuple[str, nn.Linear]]]:
    """``{field: [(name, linear)]}`` for each target group (``{"ffn_targets": ..., "attn_targets": ...}``).

    Raises :class:`TargetError` listing, at once, every group that matches nothing, every suffix that
    matches more than one place per layer, and every module that more than one group selects.
    """
    problems: list[tuple[str, str]] = []
    found = {f: _match_group(model, f, spec, layers_pattern, problems) for f, spec in groups.items() if spec}
    owner: dict[str, list[str]] = {}
    for f, mods in found.items():
        for n, _ in mods:
            owner.setdefault(n, []).append(f)
    shared = [n for n, fs in owner.items() if len(fs) > 1]
    if shared:
        fields = owner[shared[0]]
        listed = ", ".join(repr(n) for n in shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        problems.append((fields[0], f"{listed} {'is' if len(shared) == 1 else 'are'} selected by both "
                                    f"{' and '.join(_field(f) for f in fields)}: a module belongs to one group"))
    if problems:
        hint = ""
        lists = _layer_lists(model)
        uses_suffix = any(not isinstance(spec, str) and spec for spec in groups.values())
        if uses_suffix and layers_pattern not in lists and lists:
            hint = (f"No module of this model is named '<...>.{layers_pattern}.<i>.<...>'; its numbered layer list is "
                    f"{lists[0]!r}: set {_field('layers_pattern')} to {lists[0]!r}")
        raise TargetError(problems, linear_names(model), hint)
    return found


def find_targets(model: nn.Module, targets: tuple[str, ...] | str, layers_pattern: str = "layers",
                 group: str = "targets") -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules one target group selects (suffixes inside the layers, or a full-name regex).

    Raises :class:`TargetError` (a ``ValueError``) listing the model's linear names when it does not fit.
    """
    return resolve_targets(model, {group: targets}, layers_pattern)[group]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` by ``module``, which takes over its train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module.train(getattr(parent, child).training)
    setattr(parent, child, module)


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _reentrant_checkpointing(layers: tuple[nn.Module, ...]) -> bool:
    """Whether a layer runs under *reentrant* gradient checkpointing now (training, grad enabled).

    transformers sets ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` (a ``partial`` of
    ``torch.utils.checkpoint.checkpoint``) on the layers it checkpoints; ``use_reentrant`` left unset counts
    as reentrant (torch's default for years, and the safe reading: the hook only adds a ``requires_grad``).
    """
    if not torch.is_grad_enabled():
        return False
    for m in layers:
        if getattr(m, "gradient_checkpointing", False) and m.training:
            keywords = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None) or {}
            return keywords.get("use_reentrant", True) is not False
    return False


def _enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad *while reentrant gradient checkpointing runs*, once.

    With a frozen embedding, reentrant checkpointing (the default of transformers 4.x) sees no input that
    requires grad and gives the adapters of the checkpointed layers no gradient; transformers'
    ``enable_input_require_grads`` fixes that with a hook that always calls ``output.requires_grad_()``,
    which ``torch.compile`` cannot keep in one graph (a graph break per forward). This hook does the same
    only when :func:`_reentrant_checkpointing` says it is needed; otherwise it traces to nothing, so a
    wrapped model compiles whole (``fullgraph=True``) without checkpointing or with the non-reentrant kind.
    Under DeepSpeed ZeRO-3 (a partitioned embedding weight) it always acts: ZeRO-3 needs it. Nothing is
    installed when the user (or transformers) already put its own hook on the model.
    """
    if (model.__dict__.get("_require_grads_hooks") or "_require_grads_hook" in model.__dict__
            or "_medcare_input_grads_hook" in model.__dict__):
        return
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if get is not None else None
    except (NotImplementedError, AttributeError, TypeError):  # a model without input embeddings
        embeddings = None
    if not isinstance(embeddings, nn.Module):
        return
    layers = tuple(m for m in model.modules() if hasattr(m, "gradient_checkpointing"))

    def inputs_require_grad(module: nn.Module, args: object, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or output.requires_grad:
            return
        # DeepSpeed ZeRO-3 gathers a module's partitioned parameters for the backward through hooks on tensors
        # that require grad: with the frozen embedding's output as is, the first layers' backward met an empty
        # (partitioned) base weight. So under ZeRO-3 the hook always acts, as transformers' own does.
        if _reentrant_checkpointing(layers) or any(is_zero3_param(p) for p in module.parameters(recurse=False)):
            output.requires_grad_(True)

    model.__dict__["_medcare_input_grads_hook"] = embeddings.register_forward_hook(inputs_require_grad)


# ---- stage functions ----------------------------------------------------------------------------------

def apply_stage1(model: nn.Module, config: MedCareConfig | None = None) -> nn.Module:
    """MedCare stage 1 (knowledge aggregation), in place; returns ``model``.

    Every ``nn.Linear`` named by ``config.ffn_targets`` inside the layers becomes a
    :class:`MoLoRALinear` (``num_experts`` routed experts + shared LoRA of rank ``r * num_shared``), every
    one named by ``config.attn_targets`` a :class:`LoRALinear` (suffixes or a full-name regex: see
    :class:`MedCareConfig`). All other parameters are frozen: only the LoRA and router parameters train.
    Raises :class:`TargetError` (a ``ValueError`` listing the model's linear names) before changing anything
    when a group matches nothing, a suffix matches two places per layer, or a module is in both groups;
    ``ValueError`` when the model is already wrapped.
    """
    config = MedCareConfig() if config is None else _config_of(model, config)
    if any(isinstance(m, _WRAPPERS) for m in model.modules()):
        raise ValueError("the model already holds MedCare layers; apply_stage1 expects a plain model")
    found = resolve_targets(model, {"ffn_targets": config.ffn_targets, "attn_targets": config.attn_targets},
                            config.layers_pattern)
    ffn, attn = found["ffn_targets"], found.get("attn_targets", [])
    _freeze_all(model)
    for name, linear in ffn:
        _set_module(model, name, MoLoRALinear.from_linear(linear, config))
    for name, linear in attn:
        _set_module(model, name, LoRALinear.from_linear(linear, config))
    _enable_input_grads(model)
    model.medcare_config = config
    _refresh_cache(model)
    return model


def merge_lora(model: nn.Module, targets: str = "attn") -> nn.Module:
    """Fold LoRA wrappers into their base weights (back to ``nn.Linear``), in place; returns ``model``.

    ``targets``: ``"attn"`` (every :class:`LoRALinear`, the step between the stages), ``"ffn"`` (every
    :class:`OrthLoRALinear`) or ``"all"``. Routed MoLoRA layers cannot be folded (their update depends
    on the token); :func:`to_stage2` drops them. Folded attention LoRAs are remembered (CPU copies) so
    :func:`~medcare.save_adapter` still writes them.
    """
    kinds = {"attn": (LoRALinear,), "ffn": (OrthLoRALinear,), "all": (LoRALinear, OrthLoRALinear)}
    if targets not in kinds:
        raise ValueError(f"targets must be one of {sorted(kinds)}, got {targets!r}")
    for name, m in list(model.named_modules()):
        if isinstance(m, kinds[targets]):
            if isinstance(m, LoRALinear):
                _record_merge(model, name, m.lora_A, m.lora_B, m.scaling)
            _set_module(model, name, m.merge())
    _refresh_cache(model)
    return model


def to_stage2(model: nn.Module, config: MedCareConfig | None = None) -> nn.Module:
    """MedCare stage 2 (downstream alignment), in place; returns ``model``.

    * Attention LoRAs still unmerged are folded into their base weights first (``merge_lora(model, "attn")``).
    * Each :class:`MoLoRALinear` becomes an :class:`OrthLoRALinear`: routed experts and router dropped,
      the shared LoRA becomes the base LoRA (frozen when ``config.freeze_base``), and a new orth LoRA of
      the same rank (A Kaiming-uniform, B zeros) trains, so the model starts as base + shared experts.
    * On a plain model (no stage-1 layers: e.g. a fresh base model in a new process), the FFN targets are
      wrapped with a zero base LoRA; then ``load_adapter(model, stage1_dir)`` initialises the base LoRA
      from the stage-1 shared experts and folds the stage-1 attention LoRA into the attention weights.

    ``config`` defaults to ``model.medcare_config``; its scale (r, alpha, use_rslora) must match stage 1.
    """
    config = _config_of(model, config)
    if wrapper_modules(model, OrthLoRALinear):
        raise ValueError("the model is already in stage 2 (it holds OrthLoRALinear layers)")
    merge_lora(model, "attn")
    molora = [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]
    if molora:
        bad = [n for n, m in molora if m.shared_rank != config.shared_rank]
        if bad:
            raise ValueError(f"config.r * config.num_shared = {config.shared_rank} differs from the stage-1 shared "
                             f"rank of {bad[:4]}{'...' if len(bad) > 4 else ''}: use the stage-1 r and num_shared")
        new = [(n, OrthLoRALinear.from_molora(m, config)) for n, m in molora]
    else:
        warnings.warn("to_stage2: the model has no stage-1 MoLoRA layers, so the frozen base LoRA starts at "
                      "zero; initialise it from stage 1 with load_adapter(model, stage1_adapter_dir)", stacklevel=2)
        new = [(n, OrthLoRALinear.from_linear(lin, config))
               for n, lin in find_targets(model, config.ffn_targets, config.layers_pattern, "ffn_targets")]
    _freeze_all(model)
    for name, module in new:
        _set_module(model, name, module)
        module.orth_A.requires_grad_(True)
        module.orth_B.requires_grad_(True)
        module.base_A.requires_grad_(not config.freeze_base)
        module.base_B.requires_grad_(not config.freeze_base)
    _enable_input_grads(model)
    model.medcare_config = config
    _refresh_cache(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA/OrthLoRA wrapper into its base weight; returns a plain transformers model.

    The result has only ``nn.Linear`` layers and no MedCare attributes: ``save_pretrained`` writes a
    checkpoint that plain transformers loads. Raises ``ValueError`` if routed MoLoRA layers remain (their
    update depends on the token: call :func:`to_stage2` first). Parameters keep their ``requires_grad``.
    """
    molora = [n for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]
    if molora:
        raise ValueError(f"cannot fold routed MoLoRA layers into a plain linear (the update depends on the token): "
                         f"call to_stage2(model, config) first. MoLoRA layers: {molora[:4]}"
                         f"{'...' if len(molora) > 4 else ''}")
    merge_lora(model, "all")
    hook = model.__dict__.pop("_medcare_input_grads_hook", None)
    if hook is not None:
        hook.remove()
    for attr in ("medcare_config", "_medcare_layers", "_medcare_merged"):
        model.__dict__.pop(attr, None)
    return model


def fold_recorded(model: nn.Module, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """Fold an attention LoRA into the plain ``nn.Linear`` at ``name`` and remember it (adapter loading)."""
    linear = model.get_submodule(name)
    fold_into(linear.weight, lora_A, lora_B, scaling)
    _record_merge(model, name, lora_A, lora_B, scaling)
