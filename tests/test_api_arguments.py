"""Python API arguments are typed at the boundary (trt_gemma.api.check_arguments): a value of the wrong type is an
InputError naming the argument and what it accepts, raised before anything is encoded or queued. Each case below
raised TypeError, or was accepted, before."""
from __future__ import annotations

import pytest

import trt_gemma
from trt_gemma.errors import InputError


@pytest.fixture(scope="module")
def model():
    with trt_gemma.load(backend="reference") as m:
        yield m


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": "hot"}, ["temperature", "an int or a float", "str"]),
    ({"top_p": "x"}, ["top_p", "an int or a float"]),
    ({"top_k": 2.5}, ["top_k", "an int", "float"]),
    ({"top_k": True}, ["top_k", "bool"]),
    ({"max_tokens": "8"}, ["max_tokens", "an int or None"]),
    ({"seed": 1.0}, ["seed", "an int or None"]),
    ({"ignore_eos": "yes"}, ["ignore_eos", "a bool"]),
    ({"temperature": float("nan")}, ["temperature", "finite"]),
    ({"temperature": float("inf")}, ["temperature", "finite"]),
    ({"stop": 123}, ["stop", "a str, a list of str or None", "int"]),
    ({"stop": ["ok", 5]}, ["stop", "list of str"]),
    ({"stop": b"\n"}, ["stop", "bytes"]),
])
def test_wrong_types_name_the_argument(model, kwargs, words):
    with pytest.raises(InputError) as e:
        model.generate("Hello", max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
    for w in words:
        assert w in str(e.value) or w in (e.value.fix or ""), (w, str(e.value))
    assert model._scheduler.admission.waiting == 0 and model._scheduler.admission.running == 0


@pytest.mark.parametrize("prompt, words", [
    (b"abc", ["bytes", "decode"]),
    (bytearray(b"abc"), ["bytearray"]),
    ("", ["empty"]),
])
def test_bytes_and_empty_prompts_are_refused(model, prompt, words):
    """b"abc" used to be generated from as the token ids 97, 98, 99; '' was accepted although docs/api.md says
    InputError."""
    for call in (model.generate, model.stream):
        with pytest.raises(InputError) as e:
            call(prompt, max_tokens=2)
        assert all(w in str(e.value) + (e.value.fix or "") for w in words), str(e.value)


def test_valid_arguments_still_generate(model):
    c = model.generate("Hello", max_tokens=2, temperature=0, top_p=1, top_k=0, seed=None, stop=("\n",),
                       ignore_eos=True)
    assert c.usage.completion_tokens == 2
    assert model.generate([2, 10, 11], max_tokens=1, stop="x").usage.prompt_tokens == 3
