"""Settings: one config dataclass per step, one flat name per setting.

Every config dataclass (``Grid``, ``MagR``, ``OPTQ``, ``CD``, ``Calibration``, ``Evaluation``, ...) declares
its fields with :func:`setting`: the default and a one-line help, set once. Each field also has one flat
name, the class's ``PREFIX`` + the field name (``CD.passes`` -> ``cd_passes``) or the field's own ``flat``
name where a bare field name would be unclear (``OPTQ.backend`` -> ``optq_backend``), which params.yaml cells,
notebook parameters and the CLI flags (``--cd-passes`` or ``--cd_passes``) all use. Checks live in each
dataclass's ``__post_init__``, so a bad value fails when the config is built, before any work.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import Field, field, fields, is_dataclass, replace


def setting(default, help: str, **extra) -> Field:
    """A config field with its default and help; ``extra`` may hold ``choices``, ``type`` (the value type
    when the default is None) or ``nargs`` (for tuples), read by the CLI, and ``flat`` (the flat name, when
    not the class's PREFIX + the field name)."""
    return field(default=default, metadata={"help": help, **extra})


def flat_fields(cls) -> dict[str, Field]:
    """Flat name -> dataclass field of every setting of ``cls`` (none for a plain function)."""
    if not is_dataclass(cls):
        return {}
    prefix = getattr(cls, "PREFIX", "")
    return {f.metadata.get("flat", prefix + f.name): f for f in fields(cls) if "help" in f.metadata}


def from_flat(cls, values: Mapping, base=None):
    """``cls`` built from the entries of ``values`` whose flat names belong to it (or ``base`` with them)."""
    changes = {f.name: values[k] for k, f in flat_fields(cls).items() if k in values}
    return cls(**changes) if base is None else replace(base, **changes)


def check_choice(name: str, value, allowed) -> None:
    """ValueError naming the setting, its value and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
