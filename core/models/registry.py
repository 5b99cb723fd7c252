"""Build zoo models by name, and describe them as plain data so a checkpoint can rebuild its model.

A model built by :func:`build_model` remembers its architecture and arguments; :func:`model_spec`
returns them as plain data (str / int / float / bool / None / list / dict only, so a checkpoint
holding it loads with ``torch.load(weights_only=True)``)::

    {"arch": "cnn", "kwargs": {"depth": 3, "width": 18, ...},
     "normalize": {"mean": [0.1307], "std": [0.3081]} | None}

and :func:`from_spec` rebuilds the model from that, with a :class:`Normalize` first layer when
``normalize`` is set — so any application rebuilds another one's model without importing it::

    spec = model_spec(model, normalize=data.normalization)        # save side
    torch.save({"model_spec": spec, "model": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    model = from_spec(ckpt["model_spec"], ckpt["model"])          # takes [0, 1] pixels
"""
from __future__ import annotations

import copy
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from core.models.autoencoder import ConvAutoencoder
from core.models.classifiers import ResNet20, lenet5, small_cnn
from core.models.corrector import FieldCorrector
from core.models.denoiser import DnCNN
from core.models.normalize import Normalize

_SPEC_ATTR = "_zoo_spec"
_SPEC_KEYS = ("arch", "kwargs", "normalize")


def cnn(depth: int = 3, width: int = 18, in_channels: int = 1, num_classes: int = 10,
        image_size: int | None = None) -> nn.Sequential:
    """:func:`small_cnn`, checking that ``image_size`` (when given) survives ``depth`` halvings."""
    if image_size is not None and image_size < 2 ** depth:
        raise ValueError(f"cnn depth={depth} halves the image {depth} times; {image_size}×{image_size} "
                         f"inputs allow at most depth {max(1, image_size.bit_length() - 1)}")
    return small_cnn(depth, width, in_channels, num_classes)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn,
    "lenet5": lenet5,
    "resnet20": ResNet20,
    "dncnn": DnCNN,
    "autoencoder": ConvAutoencoder,
    "corrector": FieldCorrector,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add an architecture: ``builder(**kwargs)`` with plain-data keyword arguments, all defaulted."""
    if name in ARCHS:
        raise ValueError(f"model arch '{name}' is already registered")
    ARCHS[name] = builder


def _available() -> str:
    return ", ".join(sorted(ARCHS))


def _plain(value: Any, where: str) -> Any:
    """``value`` as weights_only-safe plain data (tuples become lists); ValueError otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise ValueError(f"{where} must be plain data (str, int, float, bool, None, list, dict); "
                     f"got {type(value).__name__}")


def _type_ok(value: Any, hint: Any) -> bool:
    """A shallow check of a keyword argument against its annotation (int, float, bool, X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True                                               # other annotations: the builder checks


def _bind(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All of the builder's keyword arguments (defaults filled in), checked by name and type."""
    builder = ARCHS[arch]
    sig = inspect.signature(builder)
    takes = ", ".join(sig.parameters)
    try:
        bound = sig.bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for model arch '{arch}': {exc}; it takes: {takes} "
                         f"(available archs: {_available()})") from None
    bound.apply_defaults()
    try:
        hints = typing.get_type_hints(builder.__init__ if inspect.isclass(builder) else builder)
    except Exception:   # unresolvable annotations: leave the checks to the builder
        hints = {}
    for name, value in bound.arguments.items():
        if name in hints and not _type_ok(value, hints[name]):
            raise ValueError(f"model arch '{arch}': {name}={value!r} has the wrong type "
                             f"(expected {getattr(hints[name], '__name__', hints[name])}); it takes: {takes}")
    return _plain(dict(bound.arguments), f"model arch '{arch}' arguments")


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """The zoo model ``arch`` built with ``kwargs``; it remembers both for :func:`model_spec`.

    Archs: ``cnn`` (DeepZero's CNN; ``image_size`` checks the depth), ``lenet5``, ``resnet20``,
    ``dncnn``, ``autoencoder``, ``corrector``.

    Raises:
        ValueError: unknown ``arch`` (naming the available ones), an unknown or mistyped keyword
            argument (naming those the arch takes), or values the architecture rejects.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch '{arch}'; available: {_available()}")
    full = _bind(arch, kwargs)
    model = ARCHS[arch](**full)
    setattr(model, _SPEC_ATTR, {"arch": arch, "kwargs": full})
    return model


def _as_normalize(normalize: Any) -> dict[str, list[float]] | None:
    """``None``, ``{"mean", "std"}``, ``(mean, std)`` or a :class:`Normalize` as plain lists of floats."""
    if normalize is None:
        return None
    if isinstance(normalize, Normalize):
        values = normalize.values
        mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
        if not (torch.allclose(torch.tensor(values["mean"]), torch.tensor(mean))
                and torch.allclose(torch.tensor(values["std"]), torch.tensor(std))):
            values = {"mean": mean, "std": std}             # buffers overwritten by a loaded state dict
        return {"mean": list(values["mean"]), "std": list(values["std"])}
    if isinstance(normalize, Mapping):
        if set(normalize) != {"mean", "std"}:
            got = ", ".join(map(str, normalize))
            raise ValueError(f"normalize must have exactly the keys mean, std; got {got}")
        mean, std = normalize["mean"], normalize["std"]
    elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = normalize
    else:
        raise ValueError(f"normalize must be None, {{'mean': [...], 'std': [...]}}, (mean, std) or a "
                         f"Normalize; got {type(normalize).__name__}")
    try:
        mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
        std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    except (TypeError, ValueError):
        raise ValueError(f"normalize mean and std must be numbers or lists of numbers; "
                         f"got {mean!r}, {std!r}") from None
    Normalize(mean, std)                                      # validates lengths and std > 0
    return {"mean": mean, "std": std}


def with_normalize(model: nn.Module, normalize: Any) -> nn.Sequential:
    """``nn.Sequential(Normalize(mean, std), model)``: the model then takes pixels in [0, 1]."""
    norm = _as_normalize(normalize)
    if norm is None:
        raise ValueError("with_normalize needs mean and std; got None")
    return nn.Sequential(Normalize(norm["mean"], norm["std"]), model)


def _split(model: nn.Module) -> tuple[nn.Module, Normalize | None]:
    """(zoo model, its Normalize first layer or None) of a model built here."""
    if (isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize)
            and hasattr(model[1], _SPEC_ATTR)):
        return model[1], model[0]
    if hasattr(model, _SPEC_ATTR):
        return model, None
    raise ValueError(f"model_spec needs a model built by core.models.build_model or from_spec (optionally "
                     f"behind with_normalize); got {type(model).__name__}")


def model_spec(model: nn.Module, *, normalize: Any = None) -> dict[str, Any]:
    """The plain-data description of a zoo model: ``{"arch", "kwargs", "normalize"}``.

    Args:
        model: built by :func:`build_model` / :func:`from_spec`, or such a model behind a
            :class:`Normalize` first layer (:func:`with_normalize`), whose mean/std are recorded.
        normalize: the input normalisation the model expects but does not contain (it was trained
            on normalised data: pass ``Dataset.normalization``); :func:`from_spec` then puts a
            :class:`Normalize` first, so the rebuilt model takes [0, 1] pixels. ``None``, a dict
            ``{"mean", "std"}``, a pair ``(mean, std)`` or a :class:`Normalize`.
    """
    inner, layer = _split(model)
    norm = _as_normalize(layer) if layer is not None else None
    extra = _as_normalize(normalize)
    if norm is not None and extra is not None and norm != extra:
        raise ValueError(f"model already starts with Normalize {norm}; normalize={extra} would normalise "
                         f"twice")
    spec = copy.deepcopy(getattr(inner, _SPEC_ATTR))
    spec["normalize"] = norm or extra
    return spec


def _load(model: nn.Module, state_dict: Mapping[str, Any], arch: str) -> None:
    want, got = set(model.state_dict()), set(state_dict)
    if want != got:
        missing, unexpected = sorted(want - got)[:5], sorted(got - want)[:5]
        raise ValueError(f"state dict does not fit model arch '{arch}': missing {missing or 'none'}, "
                         f"unexpected {unexpected or 'none'}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:          # shape mismatches: arguments other than the weights' own
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = lines[-1] if lines else exc
        raise ValueError(f"state dict does not fit model arch '{arch}': {why}") from None


def from_spec(spec: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild a model from :func:`model_spec`'s description, and load ``state_dict`` when given.

    With ``spec["normalize"]`` set the result is ``nn.Sequential(Normalize, model)``; ``state_dict``
    may then be either the bare architecture's (saved from a model trained on normalised data) or
    the whole model's.

    Raises:
        ValueError: a malformed spec, an unknown arch or arguments, or a state dict that does not fit.
    """
    if not isinstance(spec, Mapping) or "arch" not in spec or not set(spec) <= set(_SPEC_KEYS):
        got = ", ".join(map(str, spec)) if isinstance(spec, Mapping) else type(spec).__name__
        raise ValueError(f"a model spec is a dict with keys arch, kwargs, normalize; got {got}")
    arch, kwargs = spec["arch"], spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"model spec kwargs must be a dict; got {type(kwargs).__name__}")
    model = build_model(arch, **kwargs)
    full = with_normalize(model, spec["normalize"]) if spec.get("normalize") is not None else model
    if state_dict is not None:
        bare = full is not model and set(state_dict) == set(model.state_dict())
        _load(model if bare else full, state_dict, arch)
    return full


def count_params(model: nn.Module) -> int:
    """Trainable parameters (``requires_grad``) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
