"""The pools file (shared/config.py): a valid file loads; every error names the
file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import EXAMPLES_DIR, ConfigError, load_config

VALID = """
[defaults]
asr = "asr-big"
llm = "llm-a"

[pools.asr-big]
stage = "asr"
engine = "faster-whisper"
gpu_type = "rtx5090"
slots = 8
fallback = "asr-small"
overflow_lag = 16
options = { model = "large-v3-turbo", beam_size = 1 }
labels = { tier = "gold" }

[pools.asr-small]
stage = "asr"
engine = "faster-whisper"

[pools.llm-a]
stage = "llm"
engine = "llamacpp"
max_deliveries = 2
claim_idle_ms = 1500

[pools.tts-a]
stage = "tts"
engine = "piper"
slots = 2

[bridge]
port = 9090
min_silence_ms = 250
ice_servers = ["stun:stun.example.org:3478"]
"""


def assert_config_error(path: Path, fragments: list[str]) -> None:
    """Loading `path` fails with an error that starts with the file's name and holds every fragment."""
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def write(tmp_path: Path, text: str, name: str = "pools.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_pools_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert set(cfg.pools) == {"asr-big", "asr-small", "llm-a", "tts-a"}
    big = cfg.pools["asr-big"]
    assert (big.name, big.stage, big.gpu_type, big.slots, big.fallback) == ("asr-big", "asr", "rtx5090", 8, "asr-small")
    assert big.options == {"model": "large-v3-turbo", "beam_size": 1}
    assert big.labels == {"tier": "gold"}
    assert cfg.pools["asr-small"].slots == 1 and cfg.pools["asr-small"].gpu_type == "cpu"
    assert (cfg.pools["llm-a"].max_deliveries, cfg.pools["llm-a"].claim_idle_ms) == (2, 1500)
    assert cfg.default_pool("asr").name == "asr-big"
    assert cfg.default_pool("tts").name == "tts-a"  # no default: the first pool of the stage
    assert (cfg.bridge.port, cfg.bridge.min_silence_ms, cfg.bridge.host) == (9090, 250, "127.0.0.1")
    assert cfg.bridge.ice_servers == ["stun:stun.example.org:3478"]


def test_pools_file_comes_from_voxbus_pools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, VALID, "from-env.toml")
    monkeypatch.setenv("VOXBUS_POOLS", str(path))
    assert load_config().source == str(path)


@pytest.mark.parametrize("example", sorted(EXAMPLES_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_bundled_example_pools_files_load(example: Path) -> None:
    cfg = load_config(example)
    for stage in ("asr", "llm", "tts"):
        assert cfg.default_pool(stage).stage == stage


def test_lookup_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[pools.asr-a]\nstage = "asr"\nengine = "x"\n')
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"no pool named 'nope' \(have: asr-a\)") as err:
        cfg.pool("nope")
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="no pool serves stage 'tts'"):
        cfg.default_pool("tts")


# Each case: TOML text, then fragments the error message must contain (besides the file name).
BAD_FILES: dict[str, tuple[str, list[str]]] = {
    "wrong-type": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\nslots = "two"\n',
        ["pools.asr-a.slots", "Expected `int`, got `str`"],
    ),
    "wrong-type-table": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\noptions = 3\n',
        ["pools.asr-a.options", "Expected `object`"],
    ),
    "unknown-key": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\nslotz = 2\n',
        ["pools.asr-a", "unknown field `slotz`"],
    ),
    "unknown-bridge-key": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\n[bridge]\nportt = 1\n',
        ["bridge", "unknown field `portt`"],
    ),
    "unknown-section": ('[pool.asr-a]\nstage = "asr"\nengine = "x"\n', ["unknown field `pool`"]),
    "missing-stage": ('[pools.asr-a]\nengine = "x"\n', ["pools.asr-a", "missing required field `stage`"]),
    "missing-pools": ('[bridge]\nport = 1\n', ["missing required field `pools`"]),
    "unknown-stage": (
        '[pools.vad-a]\nstage = "vad"\nengine = "x"\n',
        ["pools.vad-a.stage", "'vad'", "expected one of asr, llm, tts"],
    ),
    "fallback-other-stage": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\nfallback = "llm-a"\n[pools.llm-a]\nstage = "llm"\nengine = "y"\n',
        ["pools.asr-a.fallback", "'llm-a' serves 'llm', expected 'asr'"],
    ),
    "fallback-missing": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\nfallback = "asr-b"\n',
        ["pools.asr-a.fallback", "no pool named 'asr-b'"],
    ),
    "default-missing-pool": (
        '[defaults]\nasr = "asr-z"\n[pools.asr-a]\nstage = "asr"\nengine = "x"\n',
        ["defaults.asr", "no pool named 'asr-z'"],
    ),
    "default-other-stage": (
        '[defaults]\ntts = "asr-a"\n[pools.asr-a]\nstage = "asr"\nengine = "x"\n',
        ["defaults.tts", "'asr-a' serves 'asr'"],
    ),
    "default-unknown-stage": (
        '[defaults]\nvad = "asr-a"\n[pools.asr-a]\nstage = "asr"\nengine = "x"\n',
        ["defaults", "'vad'", "expected one of asr, llm, tts"],
    ),
    "zero-slots": ('[pools.asr-a]\nstage = "asr"\nengine = "x"\nslots = 0\n', ["pools.asr-a.slots", "expected an integer >= 1, got 0"]),
    "zero-deliveries": (
        '[pools.asr-a]\nstage = "asr"\nengine = "x"\nmax_deliveries = 0\n',
        ["pools.asr-a.max_deliveries", "expected an integer >= 1"],
    ),
    "bad-pool-name": ('[pools.ASR]\nstage = "asr"\nengine = "x"\n', ["pools.ASR", "invalid pool name 'ASR'"]),
    "invalid-toml": ('[pools.asr-a\nstage = "asr"\n', ["invalid TOML", "line 1"]),
    "invalid-toml-value": ('[pools.asr-a]\nstage = asr\n', ["invalid TOML", "line 2"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_invalid_pools_file_error_names_file_key_and_expectation(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_FILES[case]
    path = write(tmp_path, text, f"{case}.toml")
    assert_config_error(path, fragments)


def test_missing_pools_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read pools file") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unreadable_pools_file_is_reported_with_its_path(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (chmod 000 would not stop root).
    path = tmp_path / "pools.d"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read pools file") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_non_utf8_pools_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[pools.asr-a]\nstage = "asr"\nengine = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: invalid TOML")


def test_an_llm_pool_warms_with_the_bridges_system_prompt(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, VALID + 'system_prompt = "Be brief."\n'))
    assert cfg.pools["llm-a"].warm_prompt == "Be brief."
    assert cfg.pools["asr-big"].warm_prompt is None  # only LLM pools prefill a prompt
    off = VALID.replace('claim_idle_ms = 1500', 'claim_idle_ms = 1500\nwarm_prompt = ""')
    assert load_config(write(tmp_path, off, "off.toml")).pools["llm-a"].warm_prompt == ""


def test_tts_chunks_default_and_from_the_cpu_pools_file(tmp_path: Path) -> None:
    chunks = load_config(write(tmp_path, VALID)).pools["tts-a"].chunks
    assert (chunks.first_words, chunks.min_words, chunks.edge_ms, chunks.fade_ms) == (4, 3, 5, 2.0)
    assert (chunks.clause_pause_ms, chunks.sentence_pause_ms) == (100, 250)
    cpu = load_config(EXAMPLES_DIR / "cpu.toml").default_pool("tts").chunks
    assert cpu.first_words == 4 and cpu.edge_ms == 5
    off = VALID.replace('slots = 2\n\n[bridge]', 'slots = 2\nchunks = { first_words = 0, min_words = 0, edge_ms = -1 }\n\n[bridge]')
    chunks = load_config(write(tmp_path, off, "off.toml")).pools["tts-a"].chunks
    assert (chunks.first_words, chunks.min_words, chunks.edge_ms) == (0, 0, -1)


@pytest.mark.parametrize(
    ("chunks", "fragments"),
    [
        ("{ first_words = -1 }", ["pools.tts-a.chunks.first_words", "expected 0 to 50", "-1"]),
        ("{ min_words = 99 }", ["pools.tts-a.chunks.min_words", "expected 0 to 50"]),
        ("{ edge_ms = -5 }", ["pools.tts-a.chunks.edge_ms", "expected -1 to 500"]),
        ("{ edge_ms = 3, fade_ms = 4.0 }", ["pools.tts-a.chunks.fade_ms", "must not exceed"]),
        ("{ sentence_pause_ms = 5000 }", ["pools.tts-a.chunks.sentence_pause_ms", "expected 0 to 2000"]),
        ("{ first_word = 2 }", ["pools.tts-a.chunks", "first_word"]),
        ('{ first_words = "four" }', ["pools.tts-a.chunks.first_words", "int"]),
    ],
)
def test_bad_tts_chunks_are_named(tmp_path: Path, chunks: str, fragments: list[str]) -> None:
    path = write(tmp_path, VALID.replace('slots = 2\n\n[bridge]', f'slots = 2\nchunks = {chunks}\n\n[bridge]'))
    assert_config_error(path, fragments)
