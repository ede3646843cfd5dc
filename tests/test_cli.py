"""The operator's first commands, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def renova(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_upgrade_then_doctor_is_healthy(migrated_database, broker):
    upgraded = renova("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    doctor = renova("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "PostgreSQL" in doctor.stdout
    assert "(head)" in doctor.stdout
    assert "notifications" in doctor.stdout
    assert "healthy" in doctor.stdout


def test_doctor_masks_secrets(migrated_database, broker):
    doctor = renova("doctor", GATEWAY_API_KEY="sk_live_secret", RENOVA_API_KEYS="key-one")
    assert "sk_live_secret" not in doctor.stdout
    assert "key-one" not in doctor.stdout
    assert "1 key(s)" in doctor.stdout


def test_bad_setting_stops_with_its_name():
    result = renova("doctor", BOLETO_LEAD_DAYS="soon")
    assert result.returncode == 2
    assert "BOLETO_LEAD_DAYS" in result.stdout
