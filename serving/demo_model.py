"""A tiny, random-weight Mistral model that the vLLM CPU engine can serve.

The model is useless as a language model, but it is a real MistralForCausalLM with
Mistral's real v3 tokenizer and a Mistral-style chat template, so everything between a
caller and the engine (tokenisation, chat templating, tool-call ids, streaming, metrics,
saturation) behaves as it would with a production Mistral checkpoint. Nothing is
downloaded: the tokenizer ships inside the mistral_common package that vLLM depends on.

    python -m serving.demo_model DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Written last, so its presence means every other file is complete.
MARKER_NAME = ".spillover-demo-model.json"
# Bump when the builder writes something different, so stale builds are visible in the marker.
BUILDER_VERSION = 1
TOKENIZER_FILE = "mistral_instruct_tokenizer_240323.model.v3"


@dataclass(frozen=True, slots=True)
class DemoModelShape:
    """Architecture of the demo model.

    head_dim 64 because the CPU attention kernel rejects smaller heads; vocab 32768
    because that is the size of the Mistral v3 tokenizer.
    """

    num_hidden_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 256
    vocab_size: int = 32768
    max_position_embeddings: int = 4096
    # bfloat16 halves the checkpoint (about 17 MB of weights instead of 34 MB); the
    # vLLM CPU backend serves it as is.
    dtype: str = "bfloat16"


# Mistral v3-style template: system prompt folded into the last user turn, tools before
# it, assistant tool calls as [TOOL_CALLS], results as [TOOL_RESULTS]. Like Mistral's own
# templates it refuses tool-call ids that are not exactly 9 characters of [a-zA-Z0-9],
# which is the rule La Plateforme enforces too, so local and hosted fail the same way.
CHAT_TEMPLATE = r"""
{%- set id_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" %}
{%- macro check_id(call_id) %}
    {%- if call_id is not string or call_id|length != 9
          or (call_id|list|reject("in", id_chars)|list|length) != 0 %}
        {{- raise_exception("Tool call ids must be exactly 9 characters of [a-zA-Z0-9], got: "
                            ~ (call_id|string)) }}
    {%- endif %}
{%- endmacro %}
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools is not defined %}
    {%- set tools = none %}
{%- endif %}
{%- set ns = namespace(index=0, last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
    {%- set is_call = message.tool_calls is defined and message.tool_calls %}
    {%- if not (message["role"] == "tool" or is_call) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles "
                                "must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools and loop.index0 == ns.last_user %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- {"type": "function", "function": tool["function"]} | tojson }}
                {%- if not loop.last %}{{- ", " }}{%- endif %}
            {%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.index0 == ns.last_user and system_message is defined and system_message %}
            {{- "[INST] " ~ system_message ~ "\n\n" ~ message["content"] ~ "[/INST]" }}
        {%- else %}
            {{- "[INST] " ~ message["content"] ~ "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant"
             and message.tool_calls is defined and message.tool_calls %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {{- check_id(tool_call.id) }}
            {{- {"name": tool_call.function.name, "arguments": tool_call.function.arguments,
                 "id": tool_call.id} | tojson }}
            {%- if not loop.last %}{{- ", " }}{%- endif %}
        {%- endfor %}
        {{- "]" ~ eos_token }}
    {%- elif message["role"] == "assistant" %}
        {{- " " ~ (message["content"] or "") | trim ~ eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- check_id(message.tool_call_id) }}
        {%- set result = {"content": message["content"], "call_id": message.tool_call_id} %}
        {{- "[TOOL_RESULTS] " ~ (result | tojson) ~ "[/TOOL_RESULTS]" }}
    {%- else %}
        {{- raise_exception("Only user, assistant and tool roles are supported, "
                            "after an optional first system message") }}
    {%- endif %}
{%- endfor %}
"""


def is_complete(model_dir: Path) -> bool:
    """True when model_dir holds a finished build (its marker is written last)."""
    return (model_dir / MARKER_NAME).is_file()


def tokenizer_source() -> Path:
    """The Mistral v3 SentencePiece model shipped inside the mistral_common package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the installed mistral_common does not ship the v3 tokenizer"
        )
    return path


def build_demo_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the demo model into out_dir and return it; a finished build is reused.

    The build happens in a temporary directory beside out_dir and is renamed into place,
    so a crash or a concurrent builder never leaves a half-written model behind.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a finished demo model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _write_model(tmp, DemoModelShape(), seed)
        _write_tokenizer(tmp)
        marker = {"builder_version": BUILDER_VERSION, "seed": seed, **asdict(DemoModelShape())}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model dir is ordinary shared data
        try:
            with contextlib.suppress(FileNotFoundError):
                out_dir.rmdir()  # an empty directory left by a caller; rename needs it gone
            os.rename(tmp, out_dir)
        except OSError:
            # Another builder won the race; its result is as good as ours.
            if not is_complete(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_model(target: Path, shape: DemoModelShape, seed: int) -> None:
    # Heavy imports stay local: the router imports serving without needing torch.
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    # A private RNG stream: the weights depend on the seed alone, and a caller's own
    # torch random state is left as it was.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # transformers' model constructors carry no annotations; the ignore is for that.
        model = MistralForCausalLM(config).to(getattr(torch, shape.dtype))  # type: ignore[no-untyped-call]
    model.config.architectures = ["MistralForCausalLM"]
    model.save_pretrained(target, safe_serialization=True)


def _write_tokenizer(target: Path) -> None:
    from transformers import LlamaTokenizer

    # transformers converts a SentencePiece model to a fast tokenizer when it finds a
    # tokenizer.model and no tokenizer.json; the copy is dropped afterwards because the
    # fast tokenizer.json is all vLLM needs and the .model would add 0.6 MB.
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        shutil.copyfile(tokenizer_source(), Path(scratch) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(scratch, legacy=False, add_bos_token=True)
    tokenizer.chat_template = CHAT_TEMPLATE.strip()
    tokenizer.model_max_length = DemoModelShape().max_position_embeddings
    tokenizer.save_pretrained(target)
    # from_pretrained records how *this* load happened (a local scratch dir, offline);
    # left in, those keys would leak into every later load of the model.
    config_path = target / "tokenizer_config.json"
    saved = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        saved.pop(key, None)
    config_path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.demo_model",
        description="Write a tiny random-weight Mistral model (real v3 tokenizer) for vLLM.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_demo_model(args.out_dir, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
