"""The documentation against the code: the README's Python example runs as written (on a small model saved
locally in place of the hub checkpoint), and the names and lists the docs give are the registered ones."""

import re
from pathlib import Path

import pytest

import leanvlm as lv
from leanvlm.presets import PRESETS, build_preset, demo_image
from leanvlm.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HUB_ID = "llava-hf/llava-1.5-7b-hf"


def readme_example() -> str:
    """The README's first Python block: the example under the introduction."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


def readme_spec_names() -> dict[str, str]:
    """{spec name: the constructor's class name} from the README's table of methods."""
    lines = README.split("\n")
    header = next(i for i, line in enumerate(lines) if line.startswith("| method | spec name |"))
    names = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        constructor = re.match(r"`lv\.(\w+)\(", cells[0])
        spec = re.fullmatch(r"`([\w-]+)`", cells[1])
        assert constructor and spec, f"unexpected row in the README's table of methods: {line}"
        names[spec.group(1)] = constructor.group(1)
    return names


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    code = readme_example()
    assert HUB_ID in code
    for name in ("image", "prompt", "inputs", "model", "processor"):
        assert re.search(rf"^{name} = ", code, flags=re.M), f"the example does not define {name}"
    # LLaVA-1.5's depth (the example's layers 8 / 16 / 24) at a toy width, saved like a hub checkpoint
    model, processor = build_preset("tiny", num_layers=32)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    demo_image(56).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace(HUB_ID, str(tmp_path / "llava")), "README.md", "exec"), namespace)
    prompt, inputs, out = namespace["prompt"], namespace["inputs"], namespace["out"]
    image_token = namespace["processor"].image_token
    assert prompt.count(image_token) == 1  # the chat template put the image token in
    visual = int((inputs["input_ids"] == namespace["model"].config.image_token_id).sum())
    assert visual == 16  # the tiny tower's 4 x 4 patches
    trace = namespace["applied"].trace
    assert trace.visual_per_layer[0] == [16] * 8 + [8] * 8 + [4] * 8 + [2] * 8  # 576 / 288 / 144 / 72 scaled
    assert trace.decode_steps == out.shape[1] - inputs["input_ids"].shape[1] - 1
    assert len(trace.decode[-1].kv_per_layer(32)[0]) == 32  # one count per layer, for the one sample


def test_readme_lists_every_registered_method_by_its_spec_name():
    listed = readme_spec_names()
    assert sorted(listed) == sorted(METHODS), "the README's table of methods and the registry differ"
    for spec, class_name in listed.items():
        method = lv.parse_method(spec)
        assert type(method).__name__ == class_name, (
            f"{spec!r} builds {type(method).__name__}, not {class_name}"
        )
    assert lv.parse_method("none") is None  # the README's "none"
    assert "`none`" in README and "`llavolta`" in README
    assert type(lv.parse_method("llavolta")) is lv.VisualContextCompression


def test_bench_docs_name_every_preset():
    text = (ROOT / "docs" / "bench.md").read_text()
    missing = [name for name in PRESETS if f"`{name}`" not in text]
    assert not missing, f"docs/bench.md does not name the presets {missing}"


def test_engine_invariants_are_numbered_in_order():
    text = (ROOT / "docs" / "engine.md").read_text()
    section = text.split("## Invariants", 1)[1].split("\n## ", 1)[0]
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", section, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 8


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "methods").glob("*.md")), ids=lambda p: p.name)
def test_method_pages_do_not_promise_missing_features(page):
    text = page.read_text()
    assert "not wired yet" not in text and "not yet wired" not in text
