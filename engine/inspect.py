"""``python -m engine inspect``: decode captured streams into a summary. (In progress.)"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import ConfigError


def run_inspect(files: Sequence[Path], *, as_json: bool) -> int:
    raise ConfigError("inspect is not implemented yet")
