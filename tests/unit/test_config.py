from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_models_yaml_is_valid() -> None:
    cfg = load_config(ROOT / "models.yaml")
    demo = cfg.aliases["demo"]
    assert demo.local[0].license == "apache-2.0"
    assert demo.hosted[0].provider == "mistral"
    assert cfg.providers["mistral"].base_url == "https://api.mistral.ai/v1"
    assert cfg.licenses["mrl"].commercial is False
    assert cfg.licenses["mnpl"].commercial is False


BAD = """\
providers:
  mistral: {base_url: "https://x/v1", kind: mistral}
aliases:
  demo:
    local:
      - name: a
        model: m
        license: wtfpl
        port: 99999
    hosted:
      - provider: nobody
        model: x
        price: {input_per_mtok: 1, output_per_mtok: 1}
        colour: blue
"""


def test_problems_carry_their_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BAD, "bad.yaml")
    text = [str(p) for p in info.value.problems]
    assert any(t.startswith("line 9: aliases.demo.local.0.port") for t in text), text
    assert any(t.startswith("line 14: aliases.demo.hosted.0.colour") for t in text), text


def test_cross_references_are_checked() -> None:
    ok_fields = BAD.replace("        port: 99999\n", "").replace("        colour: blue\n", "")
    with pytest.raises(ConfigError) as info:
        parse_config(ok_fields, "bad.yaml")
    text = [str(p) for p in info.value.problems]
    assert any("line 8: aliases.demo.local.0.license: unknown licence 'wtfpl'" in t
               for t in text), text
    assert any("line 10: aliases.demo.hosted.0.provider: unknown provider 'nobody'" in t
               for t in text), text


def test_yaml_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("aliases:\n  demo: [unclosed\n", "x.yaml")
    assert info.value.problems[0].line is not None


def test_research_weights_cannot_be_declared_commercial() -> None:
    text = """
aliases:
  large:
    local:
      - name: large-gpu
        model: mistralai/Mistral-Large-Instruct-2411
        license: apache-2.0
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    [problem] = info.value.problems
    assert problem.location == "aliases.large.local.0.license"
    assert "Mistral Research License" in problem.message and problem.line == 7
    parse_config(text.replace("apache-2.0", "mrl"))  # the right licence is accepted


def test_shipped_examples_validate_when_uncommented() -> None:
    """The commented real-GPU entries in models.yaml are correct config, licences included."""
    text = (Path(__file__).resolve().parents[2] / "models.yaml").read_text()
    head, marker, tail = text.partition("  # mistral-small:")
    lines = []
    for ln in (marker + tail).splitlines():
        if ln.startswith("  # "):
            lines.append("  " + ln[4:])
        elif ln.strip() != "#":
            lines.append(ln)
    cfg = parse_config(head + "\n".join(lines) + "\n")
    licences = {dep.model: dep.license for _, dep in cfg.deployments()}
    assert licences["mistralai/Mistral-Large-Instruct-2411"] == "mrl"
    assert licences["mistralai/Ministral-8B-Instruct-2410"] == "mrl"
    assert licences["mistralai/Codestral-22B-v0.1"] == "mnpl"
    for apache in ("Mistral-7B-Instruct-v0.3", "Mixtral-8x7B-Instruct-v0.1",
                   "Mixtral-8x22B-Instruct-v0.1", "Mistral-Nemo-Instruct-2407",
                   "Mistral-Small-3.2-24B-Instruct-2506", "Devstral-Small-2505"):
        assert licences[f"mistralai/{apache}"] == "apache-2.0"
    assert len(cfg.aliases) >= 10


RESERVED = """\
aliases:
  demo:
    local:
      - {name: a, model: m, license: apache-2.0}
callers:
  app:
    key_sha256: []
  admin:
    key_sha256: []
  Anonymous:
    use: research
"""


def test_auth_principals_use_reserved_names() -> None:
    from router.config import RESERVED_CALLER_NAMES
    from router.routing.auth import ADMIN, ANONYMOUS

    assert {ADMIN, ANONYMOUS} <= set(RESERVED_CALLER_NAMES)


def test_metrics_token_must_be_a_digest() -> None:
    text = "server: {metrics_token_sha256: [not-a-digest]}\n" + RESERVED.split("callers:")[0]
    with pytest.raises(ConfigError) as info:
        parse_config(text, "m.yaml")
    assert any("server.metrics_token_sha256.0: not a sha256 hex digest" in str(p)
               for p in info.value.problems)
