"""The built collector accepts every shipped config, and has exactly the components they use."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stack._stack import COLLECTOR_DIR, TOKEN_FILE, Stack, load_yaml, write_yaml

pytestmark = pytest.mark.stack

SHIPPED = [
    COLLECTOR_DIR / "otelcol-config.yaml",
    COLLECTOR_DIR / "existing-collector-snippets.yaml",
]


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_the_built_collector_validates_the_shipped_config(
    stack: Stack, config: Path, tmp_path: Path
) -> None:
    """`otelcol-coworker validate` accepts the config, its ${env:...} references filled in."""
    env = {
        "COWORKER_INGEST_ENDPOINT": "https://audit.example:4319",
        "COWORKER_INGEST_TOKEN_FILE": str(TOKEN_FILE),
        "COWORKER_QUEUE_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [stack.binary("OTELCOL_BIN"), "validate", f"--config={config}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_built_collector_validates_the_local_overlay(stack: Stack) -> None:
    """otelcol-config.yaml merged with otelcol-local.yaml (the README's local stack) is valid."""
    result = subprocess.run(
        [stack.binary("OTELCOL_BIN"), "validate", f"--config={SHIPPED[0]}",
         f"--config={COLLECTOR_DIR / 'otelcol-local.yaml'}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_validate_rejects_a_component_the_build_lacks(stack: Stack, tmp_path: Path) -> None:
    """The check has teeth: a component outside the manifest makes validate fail."""
    config = load_yaml(COLLECTOR_DIR / "otelcol-config.yaml")
    config["processors"]["transform/not-built"] = {}
    config["service"]["pipelines"]["traces"]["processors"].append("transform/not-built")
    path = write_yaml(tmp_path / "config.yaml", config)
    result = subprocess.run(
        [stack.binary("OTELCOL_BIN"), "validate", f"--config={path}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "transform" in result.stderr


def test_the_built_collector_has_exactly_the_manifest_components(stack: Stack) -> None:
    """`components` lists the modules of builder-config.yaml at their pinned versions, no more."""
    result = subprocess.run(
        [stack.binary("OTELCOL_BIN"), "components"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = load_yaml_text(result.stdout)
    built = {
        entry["module"]
        for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
        for entry in listed.get(kind) or []
    }
    manifest = load_yaml(COLLECTOR_DIR / "builder-config.yaml")
    wanted = {
        entry["gomod"]
        for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
        for entry in manifest[kind]
    }
    assert built == wanted


def load_yaml_text(text: str) -> dict[str, Any]:
    """Parse YAML text into a mapping."""
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data
