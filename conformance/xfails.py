"""Known numerical failures of a framework (not of this suite), kept as data in
adapters/xfails/<family>.yaml.

Each entry is run as a strict xfail: when the framework is fixed the item fails until the entry
is removed, so the list never goes stale.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

XFAILS_DIR = Path(__file__).resolve().parent.parent / "adapters" / "xfails"


class KnownFailure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str
    case: str
    checks: list[str] = ["training", "inference", "gradients"]
    reason: str = Field(min_length=1)
    link: str = Field(min_length=1)  # upstream issue or source line


def load(folder: Path = XFAILS_DIR) -> dict[tuple[str, str, str], KnownFailure]:
    """(adapter, case, check) -> entry. A malformed file is an error naming the entry."""
    out: dict[tuple[str, str, str], KnownFailure] = {}
    for path in sorted(folder.glob("*.yaml")):
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        for i, raw in enumerate(entries):
            try:
                entry = KnownFailure.model_validate(raw)
            except ValidationError as exc:
                raise ValueError(f"{path}: entry {i}: {exc}") from exc
            for check in entry.checks:
                out[(entry.adapter, entry.case, check)] = entry
    return out
