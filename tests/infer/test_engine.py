"""The serving engine without Ray: what to serve, message conversion, defaults, grounding boxes."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from vray.errors import RequestError, VrayError
from vray.infer.engine import ModelEngine
from vray.infer.requests import convert_messages
from vray.infer.target import resolve_target


def _png(colour=(200, 30, 30), size=(112, 112)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _user(*parts):
    return {"role": "user", "content": list(parts)}


IMAGE = {"type": "image_url", "image_url": {"url": _png()}}


def test_default_system_prompt_unless_the_request_has_one():
    messages, images = convert_messages([_user(IMAGE, {"type": "text", "text": "colour?"})], "Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "colour?"}]
    assert len(images) == 1 and images[0].size == (112, 112)
    own, _ = convert_messages([{"role": "system", "content": "Mine."}, _user({"type": "text", "text": "hi"})], "Be brief.")
    assert [m["content"] for m in own if m["role"] == "system"] == ["Mine."]


def test_bare_base64_images_are_accepted():
    raw = _png().split(",", 1)[1]
    _, images = convert_messages([_user({"type": "image_url", "image_url": {"url": raw}})], None)
    assert images[0].size == (112, 112)


@pytest.mark.parametrize(("messages", "needle"), [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role .robot. is not one of"),
    ([_user({"type": "audio", "audio": "x"})], "part type 'audio'"),
    ([_user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})], "not allowed"),
    ([_user({"type": "image_url", "image_url": {"url": "%%%"}})], "neither a data: URL"),
    ([_user({"type": "text", "text": "q"}), {"role": "assistant", "content": "a"}], "last message must come from the user"),
])
def test_bad_messages_are_request_errors(messages, needle):
    with pytest.raises(RequestError, match=needle):
        convert_messages(messages, None)


@pytest.mark.parametrize("url", ["https://evil.example.com/x.png", "http://evil.example.com#@images.example.com/x.png",
                                 "http://evil.example.com?@images.example.com/x.png"])
def test_allowed_image_hosts_are_checked_by_host_name(url):
    with pytest.raises(RequestError, match="'evil.example.com' is not allowed"):
        convert_messages([_user({"type": "image_url", "image_url": {"url": url}})], None,
                         allowed_hosts=("images.example.com",))


@pytest.fixture(scope="module")
def grounding_engine() -> ModelEngine:
    return ModelEngine(resolve_target("tiny:qwen3_vl", task="phrase_grounding"), device="cpu")


def test_base_model_target_uses_registry_defaults(grounding_engine):
    t = grounding_engine.target
    assert t.architecture == "qwen3vl:2B" and t.adapter is None and t.checkpoint == "base"
    assert t.system_prompt and "bounding box" in t.system_prompt
    s = grounding_engine.settings({})
    assert (s.max_new_tokens, s.temperature, s.top_k, s.repetition_penalty) == (512, 1.0, 50, 1.05)
    s = grounding_engine.settings({"max_tokens": 3, "temperature": 0})
    assert s.max_new_tokens == 3 and s.generate_kwargs()["do_sample"] is False
    with pytest.raises(RequestError, match="top_p: got 0"):
        grounding_engine.settings({"top_p": 0})


def test_chat_counts_tokens_and_respects_max_tokens(grounding_engine):
    result = grounding_engine.chat([_user(IMAGE, {"type": "text", "text": "Locate the red square."})], max_tokens=5, temperature=0)
    assert result.prompt_tokens > 16  # 16 visual tokens and the prompt
    assert 1 <= result.completion_tokens <= 5
    assert result.finish_reason in ("stop", "length")
    assert isinstance(result.boxes, list)


def test_grounding_boxes_come_back_in_original_pixels(grounding_engine, monkeypatch):
    # Whatever the model writes in its convention is parsed and converted back to the request image's pixels.
    import vray.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "generate_texts",
                        lambda *a, **k: (['[{"bbox_2d": [100, 200, 500, 1000], "label": "red square"}]'], [12]))
    image = {"type": "image_url", "image_url": {"url": _png(size=(640, 320))}}
    result = grounding_engine.ground(image["image_url"]["url"], "red square")
    assert result.boxes == [{"label": "red square", "bbox": [64.0, 64.0, 320.0, 320.0]}]


def test_targets_that_are_not_servable():
    with pytest.raises(VrayError, match="not a run directory, a checkpoint or a model folder"):
        resolve_target("someone/unknown-model")
    with pytest.raises(VrayError, match="no complete checkpoint"):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "spec.yaml").write_text("task: vqa\n")
            resolve_target(tmp)
