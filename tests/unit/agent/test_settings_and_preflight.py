from __future__ import annotations

from pathlib import Path

import pytest

from tapio.agent import preflight
from tapio.agent.kconfig import signal_mask, standalone_config, user_thresholds
from tapio.agent.settings import (
    AgentSettings,
    MetricsServerSettings,
    SettingsError,
    load_settings,
    parse_settings,
)
from tapio.bpf.abi import FLAG_NETWORK, FLAG_STORAGE, TAPIO_CONFIG


def test_missing_file_is_all_defaults(tmp_path: Path) -> None:
    s = load_settings(tmp_path / "nope.toml")
    assert s.thresholds.rtt_spike_ratio == 2 and s.thresholds.io_latency_warning_ns == 50_000_000
    assert s.metrics == MetricsServerSettings() and s.agent.drain_interval_ms == 100
    assert not s.metrics.enabled and s.metrics.port == 9464 and s.otlp == {} and s.http == {}


def test_documented_keys(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(
        "[thresholds]\nrtt_spike_ratio = 3\nio_latency_critical_ns = 1000\n"
        "[metrics]\nenabled = true\nport = 9100\n[otlp]\nendpoint = 'http://c:4318'\n"
        "protocol = 'http/json'\n[http]\nendpoint = 'http://h:8765'\n[file]\nmax_files = 5\n"
        "[agent]\ndrain_interval_ms = 50\n[container]\nexit_scope = 'all'\n"
    )
    s = load_settings(p)
    assert s.thresholds.rtt_spike_ratio == 3
    assert s.thresholds.io_latency_critical_ns == 1000
    assert s.metrics.enabled and s.metrics.port == 9100
    assert s.otlp == {"endpoint": "http://c:4318", "protocol": "http/json"}
    assert s.http == {"endpoint": "http://h:8765"} and s.file.max_files == 5
    assert s.agent.drain_interval_ms == 50 and s.container.exit_scope == "all"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[otlp]\nendpiont = 'http://c:4318'\n", "unknown key 'endpiont' in section [otlp]"),
        ("[http]\nendpont = 'http://c'\n", "unknown key 'endpont' in section [http]"),
        ("[metrics]\nenable = true\n", "unknown key 'enable' in section [metrics]"),
        ("[thresholds]\nfuture_key = 1\n", "unknown key 'future_key' in section [thresholds]"),
        ("[agent]\ndrain_interval = 5\n", "unknown key 'drain_interval' in section [agent]"),
        ("[container]\nexit_scpe = 'all'\n", "unknown key 'exit_scpe' in section [container]"),
        ("[file]\nmax_file = 1\n", "unknown key 'max_file' in section [file]"),
        ("[something_new]\nx = 1\n", "unknown section [something_new]"),
    ],
)
def test_unknown_key_is_an_error_naming_key_and_section(
    tmp_path: Path, body: str, message: str
) -> None:
    p = tmp_path / "t.toml"
    p.write_text(body)
    with pytest.raises(SettingsError) as exc:
        load_settings(p)
    assert str(p) in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize(
    "body",
    [
        "[thresholds\n",
        "[thresholds]\nrtt_spike_ratio = 'two'\n",
        "[container]\nexit_scope = 'x'\n",
        # Out of range: would crash packing tapio_config, spin the drain loop or drop everything.
        "[thresholds]\nretransmit_threshold = -1\n",
        "[thresholds]\nrtt_spike_abs_us = 4294967296\n",
        "[thresholds]\nmemory_some_pct = 101\n",
        "[agent]\ndrain_interval_ms = 0\n",
        "[agent]\nchannel_batches = 0\n",
        "[agent]\nshutdown_grace_secs = -1\n",
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, body: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(body)
    with pytest.raises(SettingsError) as exc:
        load_settings(p)
    assert str(p) in str(exc.value)


def test_standalone_kernel_config(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(
        "[thresholds]\nretransmit_threshold = 9\nretransmit_window_ms = 250\n"
        "[container]\nexit_scope = 'all'\nignore_exit_codes = [1, 1, 2]\nignore_signals = [15, 99]\n"
    )
    s = load_settings(p)
    cfg = standalone_config(s, ["network", "storage"])
    assert cfg.generation == 1 and cfg.flags == FLAG_NETWORK | FLAG_STORAGE
    assert (cfg.retransmit_threshold, cfg.retransmit_window_ns) == (9, 250_000_000)
    assert cfg.ignore_exit_codes == (1, 2) and cfg.exit_flags == 0
    assert cfg.ignore_signal_mask == 1 << 15
    fields = TAPIO_CONFIG.struct.unpack(cfg.pack())
    assert fields[TAPIO_CONFIG.index["rtt_spike_multiplier"]] == 2
    assert user_thresholds(s).exit_scope == "all"


def test_signal_mask_ignores_out_of_range() -> None:
    assert signal_mask([0, 9, 64, -1]) == 1 << 9


def test_privileges_refused_without_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "effective_caps", lambda: 0)
    with pytest.raises(preflight.PreflightError, match="CAP_BPF"):
        preflight.check_privileges()
    monkeypatch.setattr(preflight, "effective_caps", lambda: (1 << 39) | (1 << 38))
    preflight.check_privileges()


def test_kernel_too_old_and_missing_btf(tmp_path: Path) -> None:
    with pytest.raises(preflight.PreflightError, match="too old"):
        preflight.check_kernel("5.4.0-100-generic", btf=tmp_path)
    with pytest.raises(preflight.PreflightError, match="BTF"):
        preflight.check_kernel("6.1.0", btf=tmp_path / "missing")
    preflight.check_kernel("6.18.44-fc", btf=tmp_path)


def test_tracefs_found_or_explained(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    assert preflight.ensure_tracefs(tmp_path) == tmp_path


def test_ring_sizes_are_powers_of_two_per_observer() -> None:
    s = parse_settings({"agent": {"ring_kib": {"network": 256}}})
    assert s.agent.ring_kib == {"network": 256}
    assert AgentSettings().agent.ring_kib == {}  # the objects' own sizes
    for bad in (300, 2, 3):
        with pytest.raises(SettingsError, match=r"agent\.ring_kib\.network must be a power of two"):
            parse_settings({"agent": {"ring_kib": {"network": bad}}})
