"""Shared test helpers: the parity tests record their worst errors here and pytest prints them at the end."""
from __future__ import annotations

import pytest

WORST: dict[str, tuple[float, float]] = {}  # check name -> (max abs error, max abs error / max |expected|)


def record_error(name: str, abs_err: float, rel_err: float) -> None:
    old = WORST.get(name, (0.0, 0.0))
    WORST[name] = (max(old[0], abs_err), max(old[1], rel_err))


def pytest_terminal_summary(terminalreporter):
    if not WORST:
        return
    worst_abs = max(WORST.items(), key=lambda kv: kv[1][0])
    worst_rel = max(WORST.items(), key=lambda kv: kv[1][1])
    terminalreporter.section("HF parity: worst errors (fp32)")
    terminalreporter.write_line(f"{len(WORST)} compared tensors")
    terminalreporter.write_line(f"worst absolute error: {worst_abs[1][0]:.3g} at {worst_abs[0]}")
    terminalreporter.write_line(f"worst relative error (|diff| / max|expected|): {worst_rel[1][1]:.3g} at {worst_rel[0]}")


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory, monkeypatch):
    """Tests never write to the user's ~/.cache nor reach the network for the hub."""
    monkeypatch.setenv("COGVLM_CACHE", str(tmp_path_factory.getbasetemp() / "cogvlm-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
