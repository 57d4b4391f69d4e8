"""One module per ``hwquant`` command: its options dataclass (validated on construction, the CLI's flags and the
YAML keys), its ``run_*`` function (the library call behind the command) and what it prints.

``train``, ``ptq``, ``qat``, ``eval``, ``export``, ``cost``, ``report``, and ``demo`` (which composes them);
:mod:`hwquant.commands.common` holds what they share.  :mod:`hwquant.pipelines` re-exports them in one namespace.
"""
