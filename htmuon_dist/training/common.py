"""What both :mod:`.config` and :mod:`.model` need: the error type, the repository root and
model-file lookup. A leaf module (imports nothing from the package) so that config.py and
model.py no longer import each other."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def model_config_path(name: str) -> Path:
    """``tiny`` -> ``configs/model/tiny.json``; a path is returned as is."""
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--model {name}: no such file")
        return path
    candidate = REPO_ROOT / "configs" / "model" / f"{name.lower()}.json"
    if not candidate.is_file():
        names = sorted(p.stem for p in (REPO_ROOT / "configs" / "model").glob("*.json"))
        raise ConfigError(f"--model {name!r}: not one of {names} and not a JSON file")
    return candidate
