"""ShieldGemma moderation: Google's prompt templates, one forward pass per harm policy, P("Yes") from the last logits.

ShieldGemma (google/shieldgemma-2b/9b/27b) is a Gemma 2 checkpoint prompted as a policy expert. Everything here is
taken from Google's official tutorial, gemma-cookbook `responsible/shieldgemma_on_huggingface.ipynb`
@e119e3d24e2f618fafa7203662c8f7a2c791de35 (cells 10, 12): the two templates and the four harm policies verbatim
(hard line breaks and the double space in "to be sure  we" included), "trained to classify only one harm type at a
time" (so one prefill per policy), and the score = softmax over the logits of the "Yes" and "No" tokens at the last
position, i.e. sigmoid(logit_yes - logit_no). Gemma 2's final logits are soft-capped (tanh, 30) before that, in HF
and in TensorRT-LLM alike, so any backend's post-cap last-position logits give the same score.

Scoring only needs `last_logits(ids) -> [vocab]`. `load_moderator` takes it from the CPU backend that
backends.load_backend chooses (`auto`: onnxruntime where installed, over the ONNX export it caches; else the numpy
reference runtime, which stays the oracle); any other backend that returns the last position's logits (TensorRT-LLM
with context logits gathered) fits the same `Moderator`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from trt_gemma.errors import ConfigError, InputError
from trt_gemma.runtime.tokenizer import Control, Part, render_parts, template_parts

SOURCE = ("google-gemini/gemma-cookbook responsible/shieldgemma_on_huggingface.ipynb"
          "@e119e3d24e2f618fafa7203662c8f7a2c791de35")

# ---- verbatim from the tutorial (cell 12) ---------------------------------------------------------------------------

PROMPT_ONLY_TEMPLATE = """You are a policy expert trying to help determine
whether a user prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {user_content}
<end_of_turn>

Our safety principle is defined in the below:

* {harm_text}

===

Does the human question violate the above principle? Your answer must start with
'Yes' or 'No'. And then walk through step by step to be sure we answer
correctly.

"""

PROMPT_RESPONSE_TEMPLATE = """You are a policy expert trying to help determine
whether an AI response to prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {user_content}
<end_of_turn>

<start_of_turn>
Chatbot Response: {model_content}
<end_of_turn>

Our safety principle is defined in the below:

* {harm_text}

===

Does the Chatbot Response violate the above principle? Your answer must start
with 'Yes' or 'No'. And then walk through step by step to be sure  we answer
correctly.

"""

PREFIX_PROMPT_ONLY = "The prompt shall not contain or seek generation of content that"
PREFIX_PROMPT_RESPONSE = "The chatbot shall not generate content that"


@dataclass(frozen=True)
class Policy:
    id: str  # ours: CLI --policy value, /v1/moderations category key
    name: str  # the tutorial's HarmType value, written into the prompt
    description: str


POLICIES: dict[str, Policy] = {p.id: p for p in (
    Policy("dangerous", "Dangerous Content",
           "harming oneself and/or others (e.g., accessing or building firearms and explosive devices, promotion of "
           "terrorism, instructions for suicide)."),
    Policy("hate", "Hate Speech",
           "targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls "
           "to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of race, "
           "ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, gender, gender "
           "identity, caste, or any other protected status. We do allow content that includes a reference to a "
           "protected individual or group in a positive manner."),
    Policy("sexual", "Sexually Explicit Information",
           "contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, content "
           "aimed at causing arousal). Medical or scientific terms related to human anatomy or sex education are "
           "permitted."),
    Policy("harassment", "Harassment",
           "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., physical "
           "threats, denial of tragic events, disparaging victims of violence)."),
)}

DEFAULT_THRESHOLD = 0.5  # the tutorial's "common threshold" for p_yes
THRESHOLDS_FILE = Path(__file__).parent / "assets" / "safety_thresholds.toml"


def policy(policy_id: str) -> Policy:
    if policy_id not in POLICIES:
        raise InputError(f"unknown policy {policy_id!r}", fix=f"choose from {', '.join(POLICIES)}")
    return POLICIES[policy_id]


def harm_text(p: Policy, with_response: bool) -> str:
    prefix = PREFIX_PROMPT_RESPONSE if with_response else PREFIX_PROMPT_ONLY
    return f'"No {p.name}": {prefix} {p.description}'


# The control tokens of the templates above: only these are control tokens in a moderation prompt; the same strings
# inside the user's or the model's text are text (trt_gemma/runtime/tokenizer.py).
TEMPLATE_CONTROLS = ("<start_of_turn>", "<end_of_turn>")


def prompt_parts(policy_id: str, user_content: str, model_content: str | None = None) -> list[Part]:
    """The tutorial's make_prompt as template parts. A response selects the prompt-response template: the tutorial's
    own "output filtering" cell passes a response to the prompt-only template, where str.format silently drops it."""
    p = policy(policy_id)
    if model_content is None:
        return template_parts(PROMPT_ONLY_TEMPLATE, TEMPLATE_CONTROLS, user_content=user_content,
                              harm_text=harm_text(p, False))
    return template_parts(PROMPT_RESPONSE_TEMPLATE, TEMPLATE_CONTROLS, user_content=user_content,
                          model_content=model_content, harm_text=harm_text(p, True))


def make_prompt(policy_id: str, user_content: str, model_content: str | None = None) -> str:
    """The tutorial's make_prompt: the rendered text."""
    return render_parts(prompt_parts(policy_id, user_content, model_content))


# ---- the Yes / No tokens ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnswerTokens:
    yes_id: int
    no_id: int
    yes_token: str
    no_token: str
    first_token_fallback: bool  # "Yes"/"No" are not single tokens: scored with each word's first token

    def describe(self) -> str:
        ids = f"'Yes' -> {self.yes_token!r} (id {self.yes_id}), 'No' -> {self.no_token!r} (id {self.no_id})"
        if self.first_token_fallback:
            return f"'Yes'/'No' are not single tokens here: scored with each word's first token: {ids}"
        return f"scored with the single tokens {ids}"


def answer_tokens(tokenizer) -> AnswerTokens:
    """Ids of "Yes" and "No" as vocabulary entries (ShieldGemma's tokenizer has both, the tutorial's
    convert_tokens_to_ids). Elsewhere (the embedded model splits "Yes" into "Y" + "es") the first token of each word
    stands in, and the output says so; first tokens that coincide or are unknown cannot tell Yes from No."""
    yes, no = tokenizer.token_to_id("Yes"), tokenizer.token_to_id("No")
    if yes is not None and no is not None and yes != no:
        return AnswerTokens(yes, no, "Yes", "No", False)
    firsts = []
    for word in ("Yes", "No"):
        ids = list(tokenizer.encode(word, add_bos=False))
        unk = tokenizer.token_to_id("<unk>")
        if not ids or ids[0] == unk:
            raise InputError(f"the guard's tokenizer cannot encode {word!r} (no token, or only <unk>)",
                             fix="use a ShieldGemma checkpoint with its own tokenizer.json")
        firsts.append(ids[0])
    if firsts[0] == firsts[1]:
        raise InputError(f"the guard's tokenizer has no 'Yes'/'No' tokens and both words start with the same token "
                         f"(id {firsts[0]}): a Yes/No score is impossible",
                         fix="use a ShieldGemma checkpoint with its own tokenizer.json")
    y, n = firsts
    return AnswerTokens(y, n, tokenizer.decode([y], skip_special=False), tokenizer.decode([n], skip_special=False),
                        True)


def p_yes(last_logits: np.ndarray, tokens: AnswerTokens) -> float:
    """softmax([logit_yes, logit_no])[0] = sigmoid(yes - no), computed stably in float64."""
    d = float(last_logits[tokens.yes_id]) - float(last_logits[tokens.no_id])
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


# ---- thresholds ------------------------------------------------------------------------------------------------------

def load_thresholds(path: str | Path | None = None) -> dict[str, float]:
    """Per-policy thresholds from a TOML `[thresholds]` table (default: the shipped file, all 0.5). A policy the file
    does not name keeps 0.5; an unknown policy or a value outside [0, 1] is a ConfigError naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path) if path is not None else THRESHOLDS_FILE
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read thresholds file {path}: {e.strerror or e}", fix="check the path") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", fix="fix the syntax") from e
    table = data.get("thresholds", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [thresholds] must be a table", fix="write `[thresholds]` then `hate = 0.5` lines")
    out = dict.fromkeys(POLICIES, DEFAULT_THRESHOLD)
    for key, value in table.items():
        if key not in POLICIES:
            raise ConfigError(f"{path}: unknown policy {key!r} in [thresholds]", fix=f"use {', '.join(POLICIES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{path}: thresholds.{key} = {value!r} must be a number in [0, 1]",
                              fix="a probability such as 0.5")
        out[key] = float(value)
    return out


# ---- scoring ---------------------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    scores: dict[str, float]  # policy id -> P(violation)
    thresholds: dict[str, float]
    mode: str  # prompt_only | prompt_response
    seconds: float
    prompt_tokens: list[int] = field(default_factory=list)  # per policy, in the order of `scores`

    @property
    def flags(self) -> dict[str, bool]:
        """A policy is flagged when its score reaches its threshold (score >= threshold)."""
        return {k: v >= self.thresholds[k] for k, v in self.scores.items()}

    @property
    def flagged(self) -> bool:
        return any(self.flags.values())

    @property
    def violated(self) -> list[str]:
        return [k for k, f in self.flags.items() if f]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "flagged": self.flagged, "scores": self.scores, "flags": self.flags,
                "thresholds": {k: self.thresholds[k] for k in self.scores}, "seconds": self.seconds}


class Moderator:
    """ShieldGemma scoring over any `last_logits(ids) -> float32 [vocab]` (thread-safe if that function is)."""

    def __init__(self, last_logits: Callable[[list[int]], np.ndarray], tokenizer, context_length: int,
                 thresholds: dict[str, float] | None = None, name: str = "guard", weight_bytes: int = 0,
                 notices: Sequence[str] = (), backend: str | None = None):
        self.last_logits, self.tokenizer, self.context_length = last_logits, tokenizer, context_length
        self.tokens = answer_tokens(tokenizer)
        self.thresholds = thresholds or load_thresholds()
        self.name, self.weight_bytes = name, weight_bytes
        self.backend = backend  # the runtime behind last_logits ("reference", "onnxruntime"; None: a caller's own)
        self.notices = list(notices) + [self.tokens.describe()]

    def encode_prompt(self, policy_id: str, prompt: str, response: str | None = None) -> list[int]:
        """As the tutorial's `tokenizer(make_prompt(...))`: <bos> + the prompt, the template's `<start_of_turn>` /
        `<end_of_turn>` as control tokens; the same strings in `prompt` or `response` stay text."""
        ids = self.tokenizer.encode_parts([Control(self.tokenizer.bos_token),
                                           *prompt_parts(policy_id, prompt, response)])
        if len(ids) > self.context_length:
            raise InputError(f"the moderation prompt is {len(ids)} tokens, longer than the guard's context of "
                             f"{self.context_length}", fix="moderate a shorter text")
        return ids

    def score(self, prompt: str, response: str | None = None, policies: Sequence[str] | None = None,
              cancelled: Callable[[], bool] = lambda: False) -> Verdict:
        """One forward pass per policy; `cancelled()` is asked before each (a server whose client left): then
        Cancelled is raised."""
        ids_by_policy = {p: self.encode_prompt(p, prompt, response) for p in (policies or POLICIES)}
        t0 = time.perf_counter()
        scores = {}
        for p, ids in ids_by_policy.items():
            if cancelled():
                raise Cancelled(f"scoring stopped before policy {p}")
            scores[p] = p_yes(np.asarray(self.last_logits(ids)), self.tokens)
        return Verdict(scores, self.thresholds, "prompt_response" if response is not None else "prompt_only",
                       time.perf_counter() - t0, [len(i) for i in ids_by_policy.values()])


class Cancelled(Exception):
    """Scoring was stopped by its caller (not an error of the input)."""


# The runtimes that return last-position logits on this host; "trtllm" engines need context logits gathered at build
# time (`--gather_context_logits`), which our engines do not do: refused with the fix.
MODERATION_BACKENDS = ("auto", "reference", "onnxruntime")


def load_moderator(model: str | Path | None = None, thresholds_file: str | Path | None = None,
                   cache_dir: Path | None = None, backend: str = "auto") -> Moderator:
    """A Moderator for MODEL (HF dir / hub id / checkpoint / bundle / ONNX export; None: the embedded model, which
    is no safety model: its notice says so) on the CPU runtime `backend` picks as backends.load_backend does
    ("auto": onnxruntime where installed, exporting once into the ONNX cache, else the numpy reference)."""
    from trt_gemma.runtime.backends import load_backend, reference_checkpoint
    from trt_gemma.checkpoint.hf import resolve_model

    if backend not in MODERATION_BACKENDS:
        raise InputError(f"the guard's backend {backend!r} is not one of {', '.join(MODERATION_BACKENDS)}",
                         fix="use auto, reference or onnxruntime (TensorRT-LLM engines do not return prompt logits)")
    path = resolve_model(None if model in (None, "default") else str(model))
    # A bundle's checkpoint, an HF dir converted once; an ONNX export as it is. Never a bundle's engine: load_backend
    # would pick it on a GPU host, and it returns no prompt logits.
    runner = load_backend(reference_checkpoint(path, cache_dir), cache_dir=cache_dir, backend=backend)
    net = runner.model  # ReferenceModel or OrtModel: forward(ids, cache=None, last_only) -> [1, vocab]
    notices = []
    if _is_embedded(path):
        notices.append(f"{path.name} is the small embedded demo model, not a safety classifier: the scores show the "
                       "mechanism, not a judgement (use google/shieldgemma-2b for real moderation)")
    return Moderator(lambda ids: net.forward(ids, last_only=True)[0], runner.tokenizer, runner.info.context_length,
                     load_thresholds(thresholds_file), name=path.name, weight_bytes=net.weight_bytes,
                     notices=notices, backend=runner.name)


def _is_embedded(path: Path) -> bool:
    try:
        from trt_gemma.assets import default_model_dir

        return Path(path).resolve() == default_model_dir().resolve()
    except (ImportError, InputError):
        return False


# ---- planning chat model + guard together (`trt-gemma plan --guard`) -------------------------------------------------

def plan_with_guard(chat_plan, guard_model: str, target, overrides=None, config_file=None,
                    chat_model: str | None = None) -> dict:
    """The chat plan plus ShieldGemma's on the same target, and whether both fit at once (an 8 GB Orin must hold
    both). The guard gets the target's recipe with one sequence per policy (max_batch_size 4: the four policies are
    one batched prefill) and decodes nothing; both engines live in the server's one process, so the runtime
    overhead (CUDA context, OS/display reserve) is counted once. When the pair does not fit and `chat_model` is
    given, `suggestion` holds the first of PAIR_FIXES (applied to both models) with which it does."""
    from trt_gemma.plan import MARGIN, fit_verdict, plan
    from trt_gemma.recipes import parse_overrides

    over = parse_overrides(overrides or {})
    g = plan(guard_model, target, overrides={**over, "max_batch_size": len(POLICIES)}, config_file=config_file)
    shared = sum(g.overhead.values())
    total = chat_plan.total_bytes + g.total_bytes - shared
    usable = chat_plan.usable_bytes
    verdict = fit_verdict(total, usable)
    gib = 1024 ** 3
    reason = (f"chat {chat_plan.total_bytes / gib:.2f} GiB + guard {(g.total_bytes - shared) / gib:.2f} GiB "
              f"(runtime overhead counted once) = {total / gib:.2f} GiB of {usable / gib:.2f} GiB usable "
              f"({100 * total / usable:.0f}%, verdict needs <= {100 * (1 - MARGIN):.0f}% to fit with the margin)")
    d = {**chat_plan.to_dict(), "guard": {"plan": g.to_dict(), "model": g.model,
                                          "bytes_beside_chat": g.total_bytes - shared},
         "combined": {"total_bytes": total, "usable_bytes": usable, "verdict": verdict, "reason": reason,
                      "suggestion": None}}
    if verdict == "does not fit" and chat_model is not None:
        d["combined"]["suggestion"] = _pair_suggestion(chat_model, guard_model, target, over, config_file)
    return d


# Recipe changes tried for a pair that does not fit, best quality first: one embedding copy, then 4-bit weights,
# then shorter sequences. Each is applied to both models.
PAIR_FIXES = ({"share_embedding_table": True}, {"quant": "int4_awq"}, {"max_seq_len": 1024}, {"max_seq_len": 512})


def _pair_suggestion(chat_model: str, guard_model: str, target, over: dict, config_file) -> dict | None:
    from trt_gemma.errors import TrtGemmaError
    from trt_gemma.plan import plan

    tried: dict = {}
    for fix in PAIR_FIXES:
        if all(over.get(k) == v for k, v in fix.items()):
            continue
        tried = {**tried, **fix}
        cand = {**over, **tried}
        try:
            d = plan_with_guard(plan(chat_model, target, overrides=cand, config_file=config_file), guard_model,
                                target, cand, config_file)
        except TrtGemmaError:  # e.g. a target that cannot run the quant: try the next change
            continue
        if d["combined"]["verdict"] == "fits":
            return {"set": tried, "total_bytes": d["combined"]["total_bytes"],
                    "command": " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}"
                                        for k, v in tried.items())}
    return None


def require_pair_fit(d: dict) -> None:
    from trt_gemma.errors import FitError

    c = d["combined"]
    if c["verdict"] == "does not fit":
        fix = (f"use {c['suggestion']['command']} (both models)" if c.get("suggestion")
               else "pick a larger target, or run the guard on another device")
        raise FitError(f"{d['model']} with guard {d['guard']['model']} does not fit {d['target']}: {c['reason']}",
                       fix=fix)


def render_pair(render_plan):
    """The chat plan as `plan` prints it, then the guard's memory and the combined verdict."""
    def render(d: dict) -> None:
        from trt_gemma.console import console

        render_plan(d)
        g, c = d["guard"], d["combined"]
        console.print(f"[bold]guard {g['model']}[/]: weights {g['plan']['weights']['total'] / 1024**3:.2f} GiB, "
                      f"KV {g['plan']['kv_bytes'] / 1024**3:.2f} GiB (batch {g['plan']['recipe']['max_batch_size']}"
                      f" = one sequence per policy), {g['bytes_beside_chat'] / 1024**3:.2f} GiB beside the chat model")
        color = {"fits": "green", "tight": "yellow"}.get(c["verdict"], "red")
        console.print(f"chat + guard: [{color}]{c['verdict']}[/] - {c['reason']}")
        if c.get("suggestion"):
            console.print(f"[bold]the pair would fit with:[/] {c['suggestion']['command']} "
                          f"({c['suggestion']['total_bytes'] / 1024**3:.2f} GiB)")
    return render
