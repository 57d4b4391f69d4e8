"""A timm-style registry of model constructors.

A constructor is registered with :func:`register_model` and built by name with :func:`create_model`::

    @register_model
    def my_net(in_channels: int, num_classes: int, width: float, depth: int = 2) -> nn.Module: ...

    model = create_model("my_net", in_channels=1, num_classes=10, width=0.5, depth=3)

Every constructor receives ``in_channels``, ``num_classes`` and ``width`` (already checked) plus its own
keyword options.  The model it returns gets an attribute ``hwquant_args``: the dict of arguments that built
it (``name``, ``in_channels``, ``num_classes``, ``width`` and the options passed), so that
:func:`create_model_from_args` can rebuild the same architecture from a checkpoint.

Weights are initialised from torch's global RNG: seed it with ``torch.manual_seed`` before building a model
to make the initial weights reproducible.

A user's own model (``path/to/file.py:Name`` or ``package.module:Name``, see :mod:`hwquant.models.user`) is
built by :func:`build_model` and rebuilt by :func:`create_model_from_args` (``hwquant_args["source"] ==
"user"``) without being registered.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import torch
from torch import nn

from ..errors import ConfigError
from ._layers import check_model_args

__all__ = ["build_model", "check_model_accepts", "create_model", "create_model_from_args", "is_model", "list_models",
           "model_options", "register_model"]

#: The names a model constructor always receives; everything else is a model-specific option.
_COMMON_ARGS = ("in_channels", "num_classes", "width")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def _options_of(fn: Callable[..., nn.Module]) -> tuple[list[str], bool]:
    """The keyword options ``fn`` takes besides the common arguments, and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in _COMMON_ARGS
    ]
    return names, var_kw


@overload
def register_model(fn: F, *, name: str | None = None) -> F: ...


@overload
def register_model(fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def register_model(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a model constructor under ``name`` (default: the function's name).

    Use as ``@register_model`` or ``@register_model(name="other_name")``.  The constructor must accept the
    keyword arguments ``in_channels``, ``num_classes`` and ``width``.  The decorator returns a wrapper with
    defaults ``in_channels=3, num_classes=10, width=1.0`` that checks these arguments, rejects unknown
    options with :class:`~hwquant.errors.ConfigError`, and sets ``model.hwquant_args`` on the result, so
    calling the decorated function directly is the same as :func:`create_model` with its name.

    Raises:
        ConfigError: ``name`` is already registered.
    """

    def decorate(f: F) -> F:
        model_name = name if name is not None else f.__name__
        if model_name in _REGISTRY:
            raise ConfigError(f"model {model_name!r} is already registered")
        options, var_kw = _options_of(f)

        @functools.wraps(f)
        def factory(in_channels: int = 3, num_classes: int = 10, width: float = 1.0, **kw: Any) -> nn.Module:
            check_model_args(in_channels, num_classes, width)
            unknown = sorted(k for k in kw if k not in options)
            if unknown and not var_kw:
                takes = ", ".join(options) if options else "no options"
                raise ConfigError(
                    f"model {model_name!r} got unknown option(s) {', '.join(unknown)}; it takes: {takes}"
                )
            model = f(in_channels=int(in_channels), num_classes=int(num_classes), width=float(width), **kw)
            model.hwquant_args = {
                "name": model_name,
                "in_channels": int(in_channels),
                "num_classes": int(num_classes),
                "width": float(width),
                **kw,
            }
            return model

        _REGISTRY[model_name] = factory
        return factory  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _REGISTRY


def model_options(name: str) -> list[str]:
    """The keyword options the registered model ``name`` names besides ``in_channels``, ``num_classes`` and
    ``width`` (e.g. ``['image_size', 'dropout']`` for ``vgg9``)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    fn = getattr(_REGISTRY[name], "__wrapped__", _REGISTRY[name])
    return _options_of(fn)[0]


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    width: float = 1.0,
    image_size: tuple[int, int] | list[int] | None = None,
) -> nn.Module:
    """A registered model by name, or a user's model (``file.py:Name`` / ``package.module:Name``).

    ``image_size`` (``H, W``) is passed to a constructor that names an ``image_size`` option (``vgg9``, or a
    user's model), and dropped for the others.
    """
    from .user import is_user_spec, load_user_model

    if is_user_spec(name):
        model = load_user_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                                width=width)
    else:
        kw: dict[str, Any] = {}
        if image_size is not None and "image_size" in model_options(name):
            kw["image_size"] = [int(v) for v in image_size]
        model = create_model(name, in_channels=in_channels, num_classes=num_classes, width=width, **kw)
    if image_size is not None:
        check_model_accepts(model, name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    return model


def check_model_accepts(
    model: nn.Module, name: str, *, in_channels: int, num_classes: int, image_size: tuple[int, int] | list[int]
) -> None:
    """Raise :class:`ConfigError` in one line unless ``model`` maps a batch of ``in_channels x H x W`` images
    to ``[N, num_classes]`` logits: the data and the model are checked against each other before any work.

    The probe is one forward pass of two zero images in eval mode without gradients (BN running statistics and
    the model's train/eval mode are left as they were).
    """
    h, w = (int(v) for v in image_size)
    p = next(iter(model.parameters()), None)
    x = torch.zeros(2, in_channels, h, w, dtype=p.dtype if p is not None and p.is_floating_point() else None,
                    device=p.device if p is not None else None)
    what = f"{in_channels}-channel {h}x{w} images"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model {name} does not accept the data's {what}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != 2:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"model {name} must return [batch, classes] logits for {what}, it returned {shape} "
                          "for a batch of 2")
    if y.shape[1] != num_classes:
        raise ConfigError(f"model {name} returns {y.shape[1]} logits per image but the data has {num_classes} "
                          "classes")


def create_model(
    name: str, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, **kw: Any
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        in_channels: channels of the input images (1 for MNIST-like data, 3 for CIFAR).
        num_classes: outputs of the final ``fc`` layer.
        width: channel multiplier; every hidden width ``c`` becomes ``max(1, round(c * width))``.
        **kw: model-specific options (e.g. ``image_size`` and ``dropout`` for ``vgg9``).

    Returns:
        The model, freshly initialised from torch's global RNG, with attributes ``hwquant_args``,
        ``first_layer_name`` and ``last_layer_name``.

    Raises:
        ConfigError: unknown name or option, ``width <= 0``, ``in_channels < 1`` or ``num_classes < 1``.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, width=width, **kw)


def create_model_from_args(args: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its ``hwquant_args`` dict (e.g. one stored in a checkpoint).

    ``args`` must hold ``name``; every other entry is passed to :func:`create_model`.  A user's model
    (``source == "user"``) is loaded again from its file or module.  Weights are freshly initialised; load the
    checkpoint's ``state_dict`` afterwards.

    Raises:
        ConfigError: ``args`` is not a mapping, lacks ``name``, or holds invalid arguments.
    """
    if not isinstance(args, Mapping):
        raise ConfigError(f"model args must be a mapping, got {type(args).__name__}")
    if "name" not in args:
        raise ConfigError("model args lack the 'name' entry")
    if args.get("source") == "user":
        from .user import user_model_from_args

        return user_model_from_args(args)
    kw = dict(args)
    name = kw.pop("name")
    return create_model(name, **kw)
