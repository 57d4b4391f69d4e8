"""A user's own model, named on the command line as ``path/to/file.py:Name`` or ``package.module:Name``.

``Name`` is an ``nn.Module`` subclass or a factory function returning one.  It is called with the keyword
arguments it names among ``in_channels``, ``num_classes`` (both also through ``**kwargs``) and ``image_size``
(``[H, W]``; only when named), and ``width`` only when the run changes it from 1; nothing else.  The model
gets ``hwquant_args = {"name": "/abs/path/file.py:Name", "source": "user", "in_channels": ...,
"num_classes": ..., ...}``, which :func:`hwquant.models.create_model_from_args` turns back into the same
architecture (so a checkpoint of a user's model loads as long as the file is still there).  The first and
last layers (kept at 8 bits by several methods) are found from the traced graph by the quantization passes,
unless the model defines ``first_layer_name`` / ``last_layer_name`` itself.

A file is loaded with ``importlib.util.spec_from_file_location`` under a module name unique to its path (and
loaded again only if it changed since); its directory is not put on ``sys.path`` (a file that imports a
sibling module needs that directory on ``PYTHONPATH``).  Code is never loaded from a place another user can
write: a file that is world-writable, or whose directory is world-writable without the sticky bit, is refused
(for ``package.module``, the module's file, checked before it runs; its parent packages are imported first,
as Python does).

Every mistake is a one-line :class:`~hwquant.errors.ConfigError`: file missing, not a ``.py`` file, import
failed, no such attribute, the call raised, the result is not an ``nn.Module``; and for
:func:`load_weights`, a file that is not a state dict or does not match the model (naming the first missing
or unexpected key or shape mismatch).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..train.checkpoint import nonfinite_tensor, state_dict_mismatch

__all__ = ["check_user_spec", "is_user_spec", "load_user_model", "load_weights", "parse_user_spec",
           "user_model_from_args"]

SOURCE = "user"
_ARGS = ("in_channels", "num_classes", "image_size", "width")


def is_user_spec(name: str) -> bool:
    """Whether ``name`` names a user's model (``file.py:Name`` / ``module:Name``) rather than a registered one."""
    return isinstance(name, str) and ":" in name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def parse_user_spec(spec: str, base_dir: str | Path | None = None) -> tuple[str, str, str]:
    """``(kind, target, attr)``: kind ``'file'`` (target: absolute path, relative to ``base_dir`` or the
    working directory) or ``'module'`` (target: dotted module name).  Checks the syntax only.

    Raises:
        ConfigError: no ``:``, an empty part, or a module part that is not a dotted name.
    """
    target, sep, attr = str(spec).rpartition(":")
    attr = attr.strip()
    target = target.strip()
    if not sep or not target or not attr:
        raise ConfigError(f"model {spec!r} must be path/to/file.py:Name or package.module:Name")
    if not attr.isidentifier():
        raise ConfigError(f"model {spec!r}: {attr!r} is not a Python name")
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else os.getcwd()) / path
    if target.endswith(".py") or "/" in target or os.sep in target or path.is_file():
        return "file", os.path.abspath(path), attr
    if not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"model {spec!r}: {target!r} is neither a .py file nor a dotted module name")
    return "module", target, attr


def _check_not_shared(path: Path) -> None:
    """Refuse ``path`` if another user can write it or replace it: world-writable, or in a directory that is
    world-writable without the sticky bit (for a symlink: the link's directory, the target and its directory)."""
    real = path.resolve()
    if real.stat().st_mode & stat.S_IWOTH:
        raise ConfigError(f"refusing to load {path}: the file is world-writable (never load code from a place "
                          "another user can write; chmod o-w it)")
    for parent in dict.fromkeys((Path(os.path.abspath(path)).parent, real.parent)):
        mode = parent.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise ConfigError(f"refusing to load {path}: its directory {parent} is world-writable without the "
                              "sticky bit (never load code from a place another user can write)")


def _check_file(p: Path) -> None:
    if not p.exists():
        raise ConfigError(f"model file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"model file {p} is not a file")
    if p.suffix != ".py":
        raise ConfigError(f"model file {p} is not a .py file")
    _check_not_shared(p)


def check_user_spec(spec: str, base_dir: str | Path | None = None) -> None:
    """The checks that need no import: the syntax of ``spec`` and, for a file, that it exists, is a ``.py``
    file, and is not writable by other users (so a run can fail before it loads any data)."""
    kind, target, _ = parse_user_spec(spec, base_dir)
    if kind == "file":
        _check_file(Path(target))


def _load_file(path: str) -> ModuleType:
    p = Path(path)
    _check_file(p)
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:12]
    name = f"_hwquant_user_{''.join(c if c.isalnum() else '_' for c in p.stem)}_{digest}"
    st = p.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__hwquant_stamp__", None) == stamp:
        return loaded  # the same file, unchanged: the same classes (a model built before still pickles)
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {p} as a Python module")
    module = importlib.util.module_from_spec(spec)
    module.__hwquant_stamp__ = stamp  # type: ignore[attr-defined]
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        where = ""
        if isinstance(e, SyntaxError) and e.lineno is not None:
            where = f" (line {e.lineno})"
            e = SyntaxError(e.msg)
        raise ConfigError(f"importing {p} failed{where}: {_first_line(e)}") from None
    return module


def _load_module(name: str) -> ModuleType:
    try:
        spec = importlib.util.find_spec(name)
    except Exception as e:  # a parent package failed to import
        raise ConfigError(f"cannot import module {name!r}: {_first_line(e)}") from None
    if spec is None:
        raise ConfigError(f"no module named {name!r} (is its package installed or on PYTHONPATH?)")
    if spec.origin and spec.has_location and name not in sys.modules:
        _check_not_shared(Path(spec.origin))
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise ConfigError(f"importing module {name!r} failed: {_first_line(e)}") from None


def _accepts(fn: Any) -> tuple[set[str], bool]:
    """The keyword arguments ``fn`` names, and whether it takes ``**kwargs`` (unknown signature: none)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def load_user_model(
    spec: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int] | list[int] | None = None,
    width: float = 1.0,
    base_dir: str | Path | None = None,
) -> nn.Module:
    """Build the user's model ``spec`` (``path/to/file.py:Name`` or ``package.module:Name``).

    ``Name`` is called with the keyword arguments it accepts among ``in_channels`` and ``num_classes`` (by name
    or ``**kwargs``) and ``image_size`` (``[H, W]``, by name only); ``width`` is passed when it is not 1 and
    refused if ``Name`` does not name it.  The model's weights come from torch's global RNG, as for the
    registered models.

    Raises:
        ConfigError: see the module docstring.
    """
    kind, target, attr = parse_user_spec(spec, base_dir)
    module = _load_file(target) if kind == "file" else _load_module(target)
    where = f"{target}:{attr}" if kind == "module" else f"{Path(target).name}:{attr}"
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items()
                       if not n.startswith("_") and inspect.isclass(v) and issubclass(v, nn.Module)
                       and getattr(v, "__module__", None) == module.__name__)
        hint = f" (it defines nn.Module classes: {', '.join(found)})" if found else ""
        raise ConfigError(f"{target} has no attribute {attr!r}{hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"{where} is not callable ({type(fn).__name__}): name an nn.Module class or a function")
    names, var_kw = _accepts(fn)
    kw: dict[str, Any] = {}
    for key, value in (("in_channels", int(in_channels)), ("num_classes", int(num_classes))):
        if key in names or var_kw:
            kw[key] = value
    if image_size is not None and "image_size" in names:
        kw["image_size"] = [int(v) for v in image_size]
    if float(width) != 1.0:
        if "width" not in names:
            raise ConfigError(f"{where} takes no 'width' argument; leave width at 1")
        kw["width"] = float(width)
    call = f"{where}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
    try:
        model = fn(**kw)
    except Exception as e:
        raise ConfigError(f"{call} raised {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{call} returned {type(model).__name__}, not a torch.nn.Module")
    name = f"{target}:{attr}"
    args: dict[str, Any] = {"name": name, "source": SOURCE, "in_channels": int(in_channels),
                            "num_classes": int(num_classes)}
    args.update({k: v for k, v in kw.items() if k not in args})
    model.hwquant_args = args
    return model


def user_model_from_args(args: Mapping[str, Any]) -> nn.Module:
    """Rebuild a user's model from its ``hwquant_args`` (``source == 'user'``), e.g. from a checkpoint."""
    unknown = sorted(set(args) - {"name", "source", *_ARGS})
    if unknown:
        raise ConfigError(f"user model args have unknown entries: {', '.join(unknown)}")
    if "in_channels" not in args or "num_classes" not in args:
        raise ConfigError("user model args lack in_channels / num_classes")
    return load_user_model(str(args["name"]), in_channels=args["in_channels"], num_classes=args["num_classes"],
                           image_size=args.get("image_size"), width=float(args.get("width", 1.0)))


def _state_dict_of(obj: Any) -> Mapping[str, torch.Tensor] | None:
    def is_sd(d: Any) -> bool:
        return isinstance(d, Mapping) and len(d) > 0 and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_sd(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if is_sd(obj.get(key)):
                return obj[key]
    return None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict saved with ``torch.save(model.state_dict(), path)`` into ``model`` (strictly).

    Read with ``torch.load(weights_only=True)`` on the CPU.  Also accepted: a dict holding the state dict
    under ``state_dict``, ``model`` or ``model_state_dict`` (an hwquant checkpoint, many training scripts),
    and keys prefixed ``module.`` (saved from DataParallel / DDP) when the model's keys are not.

    Raises:
        ConfigError: file missing or unreadable, pickled objects (a whole saved model), no state dict, or a
            state dict that does not match the model: names the first missing key, unexpected key or shape
            mismatch, and how many problems there are.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ConfigError(f"{p} holds pickled Python objects ({found.group(1)}: a whole saved model?), which "
                              "hwquant does not load; save model.state_dict() instead") from None
        reason = "not a torch.save file, or corrupt" if "Weights only load failed" in str(e) else _first_line(e)
        raise ConfigError(f"cannot read weights {p}: {reason}") from None
    sd = _state_dict_of(obj)
    if sd is None:
        raise ConfigError(f"{p} does not hold a state dict (a mapping of parameter names to tensors)")
    own = model.state_dict()
    if not any(k in own for k in sd) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    problem = state_dict_mismatch(model, sd)
    if problem:
        raise ConfigError(f"{p} does not match the model: {problem}")
    bad = nonfinite_tensor(sd)
    if bad:
        raise ConfigError(f"{p}: {bad} holds NaN or infinite values")
    try:
        model.load_state_dict(sd)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{p} does not match the model: {_first_line(e)}") from None
    return model
