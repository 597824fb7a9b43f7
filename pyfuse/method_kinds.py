"""Which run options each kind of merge method takes (the kind is the method's own answer, `Method.kind`).

An option that does not apply to a method's kind is refused, naming the option and the method, before any
work: it is never silently ignored. The table is the one place that says what applies where; `pyfuse merge`
and the Python entries check against it. The device is not in it: every kind computes on the CPU or a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["OPTION_KINDS", "refuse_inapplicable"]

# kinds (`pyfuse.methods.base.METHOD_KINDS`): "static", "data" (statistics), "task-data", "adaptive"
WRITES_SHARDS = ("static", "data", "task-data")  # the engine's sharded output and merge_report.json

# option -> (the kinds it applies to, why not for the others: "{method}" is the method's name)
OPTION_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "dtype": (WRITES_SHARDS, "{method} writes the merged model in the base's own dtypes (the config's vector_dtype "
                             "sets how its task vectors are stored)"),
    "no_hash": (WRITES_SHARDS, "{method} always hashes its input files: the sha256s identify the run, so that "
                               "--resume refuses other inputs"),
    "resume": (("adaptive",), "{method} merges in one pass; only adaptive methods checkpoint and resume"),
    "autocast": (("adaptive",), "{method} runs no model forward that reduced precision could speed up; "
                                "autocast is for the adaptive methods' forward passes"),
    "trust_code": (("task-data", "adaptive"), "{method} runs no code from the config; only the methods that run "
                                              "the model on tasks (adaptive ones, regmean++) import its callables"),
}


def refuse_inapplicable(given: Mapping[str, bool], method: str, kind: str, spell=lambda option: option) -> None:
    """Raise ValueError for the first option in `given` (option -> whether the user set it) that a method of
    `kind` does not take; `spell` turns an option's key into how the user wrote it (e.g. "--no-hash")."""
    for option, used in given.items():
        kinds, why = OPTION_KINDS[option]
        if used and kind not in kinds:
            raise ValueError(f"{spell(option)} does not apply to {method} ({kind}): {why.format(method=method)}")
