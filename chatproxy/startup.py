"""What start-up refuses, in one place: create_app and gunicorn's check before it forks both run it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import models
from .config import Settings, validate


def check(config: Mapping[str, Any]) -> tuple[Settings, models.ModelTable, models.Startup]:
    """Every setting (config.validate), the model table and the configured models (retired ones stop start-up);
    raises SettingsError naming the setting. The settings returned have retired default models replaced."""
    table, found = models.prepare(validate(config))
    return found.settings, table, found
