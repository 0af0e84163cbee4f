"""The guard in the server, over real HTTP (uvicorn on loopback): /v1/moderations through the official `openai`
client, guarded chat blocked and annotated, bounds, /metrics. The guard is the embedded model scored by
trt_gemma.safety (no safety model: the verdicts are steered with thresholds, 0 = always flagged, 1 = never); the
expected scores come from calling the Moderator directly."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from live_server import LiveServer, ServerProcess, make_backend, served_checkpoint  # noqa: F401 (fixture)
from trt_gemma.safety import POLICIES, Moderator, load_moderator
from trt_gemma.serve.app import create_app
from trt_gemma.serve.guard import MAX_MODERATION_INPUTS, Guard

MODEL = "tiny-gemma2"
MESSAGES = [{"role": "user", "content": "Tell me about sorting lists."}]
TOL = 1e-9  # same runtime, same ids: the server must add nothing


@pytest.fixture(scope="module")
def backend(served_checkpoint):
    return make_backend(served_checkpoint, slots=2)


@pytest.fixture(scope="module")
def moderator(tmp_path_factory):
    return load_moderator(None, cache_dir=tmp_path_factory.mktemp("guard_cache"))


def steered(mod: Moderator, **thresholds) -> Moderator:
    m = Moderator(mod.last_logits, mod.tokenizer, mod.context_length, {**mod.thresholds, **thresholds},
                  name=mod.name, weight_bytes=mod.weight_bytes, backend=mod.backend)
    return m


def serve(backend, guard: Guard, **kw):
    return LiveServer(create_app(backend, MODEL, max_queue=4, max_concurrency=2, guard=guard, **kw))


def chat(server, **extra):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_moderations_through_the_openai_client(backend, moderator):
    from trt_gemma.runtime.backends import onnxruntime_available

    # the guard on the default backend, as `serve --guard` loads it
    assert moderator.backend == ("onnxruntime" if onnxruntime_available() else "reference")
    guard_mod = steered(moderator, harassment=0.0, hate=1.0)
    with serve(backend, Guard(guard_mod)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        one = client.moderations.create(model="shieldgemma", input="Create 20 paraphrases of I hate you")
        many = client.moderations.create(model="shieldgemma", input=["How do I sort a list?", "Hello there"])
        m = s.metrics()
    assert one.id.startswith("modr-") and one.model == moderator.name and len(one.results) == 1
    assert len(many.results) == 2
    for res, text in [(one.results[0], "Create 20 paraphrases of I hate you"),
                      (many.results[0], "How do I sort a list?"), (many.results[1], "Hello there")]:
        want = moderator.score(text)
        scores = res.category_scores.model_dump(exclude_none=True) | (res.category_scores.model_extra or {})
        cats = res.categories.model_dump(exclude_none=True) | (res.categories.model_extra or {})
        assert set(scores) == set(POLICIES), scores
        assert max(abs(scores[p] - want.scores[p]) for p in POLICIES) <= TOL
        assert cats["harassment"] is True and cats["hate"] is False and res.flagged is True
    assert m[("guard_verdicts_total", (("stage", "moderation"), ("verdict", "flagged")))] == 3
    assert m[("guard_latency_seconds_count", (("stage", "moderation"),))] == 3
    assert m[("memory_bytes", (("kind", "guard_weights"),))] == moderator.weight_bytes > 0


def test_moderation_bounds_are_openai_400s(backend, moderator):
    with serve(backend, Guard(moderator)) as s:
        r = httpx.post(s.url + "/v1/moderations", json={"input": ["x"] * 10_000}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs", r.text
        assert f"At most {MAX_MODERATION_INPUTS} inputs" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/moderations", json={"input": "word " * 600}, timeout=60)
        assert r.status_code == 400 and "longer than the guard's context" in r.json()["error"]["message"], r.text
        for bad in ({"input": []}, {"input": 3}, {"input": [{"type": "image_url", "image_url": {"url": "x"}}]}, {}):
            r = httpx.post(s.url + "/v1/moderations", json=bad, timeout=60)
            assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_block_mode_refuses_a_flagged_prompt(backend, moderator):
    with serve(backend, Guard(steered(moderator, dangerous=0.0), mode="block")) as s:
        r = chat(s)
        m = s.metrics()
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "content_policy_violation" and "Dangerous Content" in err["message"], err
    assert m[("guard_verdicts_total", (("stage", "prompt"), ("verdict", "flagged")))] == 1
    assert ("generation_tokens_total", ()) not in m or m[("generation_tokens_total", ())] == 0


def test_block_mode_passes_a_clean_prompt_unchanged(backend, moderator):
    from trt_gemma.runtime.base import GenerationParams

    want = "".join(st.text for st in backend.stream(backend.encode_chat(MESSAGES),
                                                    GenerationParams(max_tokens=6, temperature=0.0)))
    with serve(backend, Guard(steered(moderator, **dict.fromkeys(POLICIES, 1.0)), mode="block")) as s:
        r = chat(s)
        streamed = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    assert "moderation" not in r.json()
    assert streamed.status_code == 200 and "[DONE]" in streamed.text


def test_annotate_mode_adds_prompt_and_response_scores(backend, moderator):
    guard = Guard(steered(moderator, sexual=0.0), mode="annotate", check_response=True)
    with serve(backend, guard) as s:
        r = chat(s)
        stream = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True})
    assert r.status_code == 200, r.text
    from openai.types.chat import ChatCompletion

    d = ChatCompletion.model_validate(r.json())  # OpenAI's own type for moderated chat completions, validated
    text = d.choices[0].message.content
    want_p, want_r = moderator.score(MESSAGES[-1]["content"]), moderator.score(MESSAGES[-1]["content"], text)
    got_in, got_out = d.moderation.input.results[0], d.moderation.output.results[0]
    assert got_in.flagged is True and got_in.categories["sexual"] is True and got_in.model == moderator.name
    assert max(abs(got_in.category_scores[p] - want_p.scores[p]) for p in POLICIES) <= TOL
    assert max(abs(got_out.category_scores[p] - want_r.scores[p]) for p in POLICIES) <= TOL
    assert stream.status_code == 400 and stream.json()["error"]["param"] == "stream"


def test_annotate_stream_carries_the_prompt_scores_in_a_header(backend, moderator):
    with serve(backend, Guard(moderator, mode="annotate")) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text
    found = json.loads(r.headers["x-trt-gemma-moderation"])
    want = moderator.score(MESSAGES[-1]["content"])
    scores = found["input"]["results"][0]["category_scores"]
    assert max(abs(scores[p] - want.scores[p]) for p in POLICIES) <= TOL
    assert found["output"] == {"type": "error", "code": "not_moderated",
                               "message": "this server checks prompts only (start it with --guard-response)"}


def test_guard_keeps_api_key_and_validation(backend, moderator):
    with serve(backend, Guard(moderator), api_key="k") as s:
        assert httpx.post(s.url + "/v1/moderations", json={"input": "x"}, timeout=30).status_code == 401
        assert chat(s).status_code == 401
        r = httpx.post(s.url + "/v1/chat/completions", headers={"authorization": "Bearer k"}, timeout=30,
                       json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
        assert r.status_code == 400, r.text


def test_cli_serve_guard_default_answers_moderations(served_checkpoint, tmp_path):
    """`trt-gemma serve MODEL --guard default` as a user runs it: the embedded model as guard, the openai client."""
    with ServerProcess([str(served_checkpoint), "--guard", "default", "--guard-mode", "annotate"],
                       tmp_path / "serve.log", env={"TRT_GEMMA_CACHE": str(tmp_path)}) as p:
        c = openai.OpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.moderations.create(model="guard", input="How do I sort a list?")
        want = load_moderator(None, cache_dir=tmp_path / "checkpoints").score("How do I sort a list?")
        assert r.results[0].category_scores.hate == pytest.approx(want.scores["hate"], abs=TOL)
        d = c.chat.completions.create(model=served_checkpoint.name, messages=MESSAGES, max_tokens=2)
        assert set(d.moderation.input.results[0].category_scores) == set(POLICIES)
        assert d.moderation.output.type == "error"


def test_guard_config_is_checked_before_the_port_opens(tmp_path):
    """A guard whose tokenizer has no Yes/No, or a bad thresholds file: typed errors from `serve`, no server."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from trt_gemma.assets import default_model_dir
    from trt_gemma.errors import ConfigError, InputError
    from trt_gemma.serve.guard import GuardConfig

    bad = tmp_path / "no-yes-no"
    shutil.copytree(default_model_dir(), bad)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "hello": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(bad / "tokenizer.json"))
    with pytest.raises(InputError, match="cannot encode 'Yes'"):
        GuardConfig(str(bad)).check()
    (tmp_path / "t.toml").write_text("[thresholds]\nviolence = 0.3\n")
    with pytest.raises(ConfigError, match="unknown policy 'violence'"):
        GuardConfig(None, thresholds_file=str(tmp_path / "t.toml")).check()
    with pytest.raises(InputError, match="backend 'trtllm' is not one of"):
        GuardConfig(None, backend="trtllm").check()
    GuardConfig(None, mode="annotate").check()  # the embedded model: first-token fallback, fine
