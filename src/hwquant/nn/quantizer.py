"""``FakeQuantizer``: the one module that holds a tensor's quantization state.

A quantizer has three switches:

* ``observing``: feed every input to a calibration observer (see :mod:`hwquant.observers`);
* ``enabled``: fake-quantize (``(q - z) * s``) instead of passing the value through;
* its parameters (``scale``, ``zero_point`` buffers, and the resolved sign), set by :meth:`calibrate`
  or :meth:`set_params` and saved in ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics.uniform import fake_quantize, quantize
from ..observers import make_observer
from ..spec import QuantParams, QuantSpec


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor according to a :class:`~hwquant.spec.QuantSpec`.

    Args:
        spec: bits, sign, granularity, rounding, observer.
        axis: channel axis for ``granularity="channel"`` (default 0, the output channel of a weight).
        generator: random source for stochastic rounding (``None``: torch's global generator).
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.spec = spec
        self.axis = (0 if axis is None else axis) if spec.granularity == "channel" else None
        self.generator = generator
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.signed: bool | None = spec.signed
        self.enabled = False
        self.observing = False
        self.observer = None
        self.calib_info: dict = {}  # observer.summary() of the last calibration, for reports

    # ----------------------------------------------------------------- state
    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def set_params(self, params: QuantParams) -> None:
        """Install calibrated parameters and enable quantization."""
        self.scale = params.scale.detach().to(torch.float32).clone()
        self.zero_point = params.zero_point.detach().to(torch.int32).clone()
        self.signed = params.signed
        self.enabled = True

    def params(self) -> QuantParams:
        """The current parameters as a :class:`QuantParams` (raises if not calibrated)."""
        if not self.calibrated:
            raise RuntimeError("quantizer is not calibrated")
        return QuantParams(self.scale, self.zero_point, self.spec.bits, bool(self.signed), self.axis, self.spec.narrow)

    def get_extra_state(self) -> dict:
        return {"signed": self.signed, "enabled": self.enabled}

    def set_extra_state(self, state: dict) -> None:
        self.signed = state["signed"]
        self.enabled = state["enabled"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers start empty and take the checkpoint's shapes (per-tensor or per-channel).
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------- calibration
    def start_observing(self) -> None:
        self.observer = make_observer(self.spec, self.axis)
        self.observing = True

    def calibrate(self) -> QuantParams:
        """Turn what the observer saw into parameters, install them, stop observing."""
        params = self.observer.compute()
        self.calib_info = self.observer.summary()
        self.set_params(params)
        self.observing = False
        self.observer = None
        return params

    def calibrate_from(self, x: torch.Tensor) -> QuantParams:
        """Calibrate on one tensor (weights need no data)."""
        self.start_observing()
        self.observer.update(x)
        return self.calibrate()

    # --------------------------------------------------------------- forward
    def _zp(self):
        return 0 if self.spec.symmetric else self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observer.update(x)
        if not (self.enabled and self.calibrated):
            return x
        return fake_quantize(
            x,
            self.scale,
            self.spec.bits,
            bool(self.signed),
            self.spec.rounding,
            zero_point=self._zp(),
            axis=self.axis,
            narrow=self.spec.narrow,
            generator=self.generator,
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` with the current parameters (for export and tests)."""
        return quantize(
            x,
            self.scale,
            self.spec.bits,
            bool(self.signed),
            self.spec.rounding,
            zero_point=self._zp(),
            axis=self.axis,
            narrow=self.spec.narrow,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        s = self.spec
        sign = {True: "signed", False: "unsigned", None: "auto-sign"}[self.signed]
        return f"bits={s.bits}, {sign}, {s.granularity}, rounding={s.rounding}, enabled={self.enabled}"
