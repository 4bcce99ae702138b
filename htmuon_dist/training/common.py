"""What both :mod:`.config` and :mod:`.model` need: the error type, the repository root and
model-file lookup. A leaf module (imports nothing from the package) so that config.py and
model.py no longer import each other."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


# Shipped as package data (pyproject.toml), so a wheel install finds them; the repository's
# configs/model is a link to this folder.
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def model_config_path(name: str) -> Path:
    """``tiny`` -> ``htmuon_dist/configs/model/tiny.json`` (= ``configs/model/tiny.json`` in a
    clone); a path is returned as is."""
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--model {name}: no such file")
        return path
    candidate = MODEL_CONFIG_DIR / f"{name.lower()}.json"
    if not candidate.is_file():
        names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"--model {name!r}: not one of {names} and not a JSON file")
    return candidate
