"""The five models of tensorrtllm_backend's `inflight_batcher_llm` layout as data, and a config.pbtxt writer.

Tensor names, types and shapes are those of TensorRT-LLM's Triton templates (TensorRT-LLM 1.x moved them from
triton-inference-server/tensorrtllm_backend into NVIDIA/TensorRT-LLM `triton_backend/all_models/inflight_batcher_llm`):
  tensorrt_llm/config.pbtxt@0c8de69a (TensorRT-LLM 1.2.0rc8), ensemble/config.pbtxt@2a9abd95,
  preprocessing/config.pbtxt@08dc37e3, postprocessing/config.pbtxt@89fd9b74, tensorrt_llm_bls/config.pbtxt@0193dbd4.
We keep every tensor of those templates (multimodal and LoRA ones included): the Python models' model.py files come
from the Triton container at start-up and look some of their tensors up by name, so the config must declare what that
code expects. One deliberate difference: the ensemble's and BLS's `prompt_embedding_table` take the model dtype like
tensorrt_llm's (the templates fix them to FP16, which a bf16 engine's ensemble would feed into a BF16 input: Triton
refuses ensembles whose connected tensors differ in type). Parameters: trt_gemma.deploy.triton.

One tensor per string: "NAME TYPE DIMS FLAGS", DIMS comma-separated, FLAGS from o (optional), r (allow_ragged_batch),
s (reshape to a scalar: `reshape { shape: [] }`). A TYPE starting with `$` is chosen per export (logits, model dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")

# Per-request outputs the C++ model returns (and the ensemble / BLS pass through): identical lists in all three.
_RESULT_OUTPUTS = """
cum_log_probs FP32 -1
output_log_probs FP32 -1,-1
context_logits $logits -1,-1
generation_logits $logits -1,-1,-1
batch_index INT32 1
sequence_index INT32 1
kv_cache_alloc_new_blocks INT32 1
kv_cache_reused_blocks INT32 1
kv_cache_alloc_total_blocks INT32 1
arrival_time_ns INT64 1
first_scheduled_time_ns INT64 1
first_token_time_ns INT64 1
last_token_time_ns INT64 1
acceptance_rate FP32 1
total_accepted_draft_tokens INT32 1
total_draft_tokens INT32 1
num_input_tokens INT32 1
num_output_tokens INT32 1
"""

TENSORS: dict[str, dict[str, str]] = {
    "tensorrt_llm": {"inputs": """
input_ids INT32 -1 or
encoder_input_features $encoder -1,-1 or
encoder_output_lengths INT32 1 os
input_lengths INT32 1 s
request_output_len INT32 1 s
num_return_sequences INT32 1 os
draft_input_ids INT32 -1 or
decoder_input_ids INT32 -1 or
decoder_input_lengths INT32 1 os
draft_logits $logits -1,-1 or
draft_acceptance_threshold FP32 1 os
end_id INT32 1 os
pad_id INT32 1 os
stop_words_list INT32 2,-1 or
bad_words_list INT32 2,-1 or
embedding_bias FP32 -1 or
beam_width INT32 1 os
temperature FP32 1 os
runtime_top_k INT32 1 os
runtime_top_p FP32 1 os
runtime_top_p_min FP32 1 os
runtime_top_p_decay FP32 1 os
runtime_top_p_reset_ids INT32 1 os
len_penalty FP32 1 os
early_stopping BOOL 1 os
repetition_penalty FP32 1 os
min_tokens INT32 1 os
beam_search_diversity_rate FP32 1 os
presence_penalty FP32 1 os
frequency_penalty FP32 1 os
seed UINT64 1 os
return_log_probs BOOL 1 os
return_context_logits BOOL 1 os
return_generation_logits BOOL 1 os
return_perf_metrics BOOL 1 os
return_num_input_tokens BOOL 1 os
return_num_output_tokens BOOL 1 os
exclude_input_in_output BOOL 1 os
stop BOOL 1 os
streaming BOOL 1 os
prompt_embedding_table $model -1,-1 or
prompt_table_extra_ids UINT64 -1 or
prompt_vocab_size INT32 1 os
cross_attention_mask BOOL -1,-1 or
mrope_rotary_cos_sin FP32 -1 o
mrope_position_deltas INT64 1 o
lora_task_id UINT64 1 os
lora_weights FP16 -1,-1 or
lora_config INT32 -1,3 or
context_phase_params UINT8 -1 or
skip_cross_attn_blocks BOOL 1 or
retention_token_range_starts INT32 -1 or
retention_token_range_ends INT32 -1 or
retention_token_range_priorities INT32 -1 or
retention_token_range_durations_ms INT32 -1 or
retention_decode_priority INT32 1 or
retention_decode_duration_ms INT32 1 or
guided_decoding_guide_type STRING 1 or
guided_decoding_guide STRING 1 or
lookahead_window_size INT32 1 or
lookahead_ngram_size INT32 1 or
lookahead_verification_set_size INT32 1 or
""", "outputs": """
output_ids INT32 -1,-1
sequence_length INT32 -1
context_phase_params UINT8 -1
""" + _RESULT_OUTPUTS},
    "preprocessing": {"inputs": """
QUERY STRING 1
DECODER_QUERY STRING 1 o
IMAGE_BYTES UINT8 -1,-1,-1,-1 o
IMAGE_URL STRING 1 o
IMAGES STRING -1 o
VIDEO_BYTES UINT8 -1,-1,-1,-1 o
REQUEST_OUTPUT_LEN INT32 1
BAD_WORDS_DICT STRING -1 o
STOP_WORDS_DICT STRING -1 o
EMBEDDING_BIAS_WORDS STRING -1 o
EMBEDDING_BIAS_WEIGHTS FP32 -1 o
END_ID INT32 1 o
PAD_ID INT32 1 o
PROMPT_TABLE_EXTRA_ID UINT64 1 o
""", "outputs": """
INPUT_ID INT32 -1
REQUEST_INPUT_LEN INT32 1
DECODER_INPUT_ID INT32 -1
REQUEST_DECODER_INPUT_LEN INT32 1
BAD_WORDS_IDS INT32 2,-1
STOP_WORDS_IDS INT32 2,-1
EMBEDDING_BIAS FP32 -1
REQUEST_OUTPUT_LEN INT32 -1
OUT_END_ID INT32 1
OUT_PAD_ID INT32 1
OUT_PROMPT_TABLE_EXTRA_IDS UINT64 -1
PIXEL_VALUES FP16 -1,-1,-1,-1
ASPECT_RATIO_IDS INT64 -1
ASPECT_RATIO_MASK INT64 -1,-1
CROSS_ATTENTION_MASK INT64 -1,-1,-1
IMAGE_SIZES INT64 -1,2
IS_VIDEO_INPUT BOOL 1
ATTENTION_MASK INT64 -1
IMAGE_GRID_THW INT64 3
VISION_INPUT_ID INT32 -1
"""},
    "postprocessing": {"inputs": """
TOKENS_BATCH INT32 -1,-1
SEQUENCE_LENGTH INT32 -1
""", "outputs": """
OUTPUT STRING -1
"""},
    "ensemble": {"inputs": """
text_input STRING 1
decoder_text_input STRING 1 o
max_tokens INT32 1
num_return_sequences INT32 1 o
bad_words STRING -1 o
stop_words STRING -1 o
exclude_input_in_output BOOL 1 o
end_id INT32 1 o
pad_id INT32 1 o
top_k INT32 1 o
top_p FP32 1 o
temperature FP32 1 o
length_penalty FP32 1 o
repetition_penalty FP32 1 o
min_tokens INT32 1 o
presence_penalty FP32 1 o
frequency_penalty FP32 1 o
seed UINT64 1 o
return_log_probs BOOL 1 o
return_context_logits BOOL 1 o
return_generation_logits BOOL 1 o
return_perf_metrics BOOL 1 o
return_num_input_tokens BOOL 1 o
return_num_output_tokens BOOL 1 o
beam_width INT32 1 o
stream BOOL 1 o
prompt_embedding_table $model -1,-1 o
prompt_table_extra_id UINT64 1 o
prompt_vocab_size INT32 1 o
embedding_bias_words STRING -1 o
embedding_bias_weights FP32 -1 o
lora_task_id UINT64 1 o
lora_weights FP16 -1,-1 or
lora_config INT32 -1,3 or
guided_decoding_guide_type STRING 1 or
guided_decoding_guide STRING 1 or
""", "outputs": "text_output STRING -1\n" + _RESULT_OUTPUTS},
    "tensorrt_llm_bls": {"inputs": """
text_input STRING 1
decoder_text_input STRING 1 o
image_input FP16 -1,3,-1,-1 o
image_bytes_input UINT8 -1,-1,-1,-1 o
image_url_input STRING 1 o
video_bytes_input UINT8 -1,-1,-1,-1 o
max_tokens INT32 1
bad_words STRING -1 o
stop_words STRING -1 o
exclude_input_in_output BOOL 1 o
end_id INT32 1 o
pad_id INT32 1 o
top_k INT32 1 o
top_p FP32 1 o
temperature FP32 1 o
length_penalty FP32 1 o
repetition_penalty FP32 1 o
min_tokens INT32 1 o
presence_penalty FP32 1 o
frequency_penalty FP32 1 o
seed UINT64 1 o
return_log_probs BOOL 1 os
return_context_logits BOOL 1 os
return_generation_logits BOOL 1 os
num_return_sequences INT32 1 os
beam_width INT32 1 o
stream BOOL 1 o
prompt_embedding_table $model -1,-1 o
prompt_vocab_size INT32 1 o
prompt_table_extra_id UINT64 1 o
embedding_bias_words STRING -1 o
embedding_bias_weights FP32 -1 o
num_draft_tokens INT32 1 o
use_draft_logits BOOL 1 os
lora_task_id UINT64 1 os
lora_weights FP16 -1,-1 or
lora_config INT32 -1,3 or
return_perf_metrics BOOL 1 os
return_num_input_tokens BOOL 1 os
return_num_output_tokens BOOL 1 os
guided_decoding_guide_type STRING 1 o
guided_decoding_guide STRING 1 o
""", "outputs": "text_output STRING -1\n" + _RESULT_OUTPUTS},
}

# The ensemble's wiring (ensemble/config.pbtxt@2a9abd95): per step, model input <- tensor, model output -> tensor.
# Tensors starting with "_" are internal; the others are ensemble inputs/outputs. The graph is checked by the tests.
_PASS_THROUGH = [n.split()[0] for n in _RESULT_OUTPUTS.split("\n") if n]
ENSEMBLE_STEPS: tuple[tuple[str, dict[str, str], dict[str, str]], ...] = (
    ("preprocessing",
     {"QUERY": "text_input", "DECODER_QUERY": "decoder_text_input", "REQUEST_OUTPUT_LEN": "max_tokens",
      "BAD_WORDS_DICT": "bad_words", "STOP_WORDS_DICT": "stop_words", "EMBEDDING_BIAS_WORDS": "embedding_bias_words",
      "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights", "END_ID": "end_id", "PAD_ID": "pad_id",
      "PROMPT_TABLE_EXTRA_ID": "prompt_table_extra_id"},
     {"REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN", "INPUT_ID": "_INPUT_ID",
      "REQUEST_DECODER_INPUT_LEN": "_REQUEST_DECODER_INPUT_LEN", "DECODER_INPUT_ID": "_DECODER_INPUT_ID",
      "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
      "BAD_WORDS_IDS": "_BAD_WORDS_IDS", "EMBEDDING_BIAS": "_EMBEDDING_BIAS", "OUT_END_ID": "_PREPROCESSOR_END_ID",
      "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID", "OUT_PROMPT_TABLE_EXTRA_IDS": "_OUT_PROMPT_TABLE_EXTRA_IDS"}),
    ("tensorrt_llm",
     {"input_ids": "_INPUT_ID", "decoder_input_ids": "_DECODER_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN",
      "decoder_input_lengths": "_REQUEST_DECODER_INPUT_LEN", "exclude_input_in_output": "exclude_input_in_output",
      "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_PREPROCESSOR_END_ID", "pad_id": "_PREPROCESSOR_PAD_ID",
      "embedding_bias": "_EMBEDDING_BIAS", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
      "temperature": "temperature", "len_penalty": "length_penalty", "repetition_penalty": "repetition_penalty",
      "min_tokens": "min_tokens", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
      "seed": "seed", "return_log_probs": "return_log_probs", "return_context_logits": "return_context_logits",
      "return_generation_logits": "return_generation_logits", "return_perf_metrics": "return_perf_metrics",
      "return_num_input_tokens": "return_num_input_tokens", "return_num_output_tokens": "return_num_output_tokens",
      "num_return_sequences": "num_return_sequences", "beam_width": "beam_width", "streaming": "stream",
      "prompt_embedding_table": "prompt_embedding_table", "prompt_vocab_size": "prompt_vocab_size",
      "stop_words_list": "_STOP_WORDS_IDS", "bad_words_list": "_BAD_WORDS_IDS",
      "prompt_table_extra_ids": "_OUT_PROMPT_TABLE_EXTRA_IDS", "lora_task_id": "lora_task_id",
      "lora_weights": "lora_weights", "lora_config": "lora_config",
      "guided_decoding_guide_type": "guided_decoding_guide_type", "guided_decoding_guide": "guided_decoding_guide"},
     {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH", **{n: n for n in _PASS_THROUGH}}),
    ("postprocessing", {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
     {"OUTPUT": "text_output"}),
)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's DataType name without TYPE_ (INT32, BF16, ...)
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False
    scalar_reshape: bool = False

    def to_pb(self, is_input: bool) -> dict:
        d: dict = {"name": self.name, "data_type": Raw("TYPE_" + self.dtype), "dims": list(self.dims)}
        if self.scalar_reshape:
            d["reshape"] = {"shape": []}
        if is_input and self.optional:
            d["optional"] = True
        if is_input and self.ragged:
            d["allow_ragged_batch"] = True
        return d


def tensors(model: str, kind: str, types: dict[str, str]) -> list[Tensor]:
    """The model's inputs or outputs, with `$` types replaced from `types` (e.g. {"$logits": "FP32"})."""
    out = []
    for line in filter(str.strip, TENSORS[model][kind].splitlines()):
        name, dtype, dims, *flags = line.split()
        flag = flags[0] if flags else ""
        out.append(Tensor(name, types[dtype] if dtype.startswith("$") else dtype,
                          tuple(int(x) for x in dims.split(",")), "o" in flag, "r" in flag, "s" in flag))
    return out


# --- text format writer -------------------------------------------------------------------------------------------

class Raw(str):
    """An enum value or literal written without quotes (TYPE_INT32, KIND_CPU)."""


def _scalar(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_pbtxt(msg: dict, indent: int = 0) -> str:
    """protobuf text format for a message given as a dict (lists = repeated fields; map fields = lists of
    {"key", "value"} entries). Triton reads exactly this syntax (google.protobuf.text_format)."""
    pad = "  " * indent
    lines = []
    for key, value in msg.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                comma = "," if i < len(value) - 1 else ""
                lines += [f"{pad}  {{", to_pbtxt(item, indent + 2), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line != "")


def parameters(values: dict[str, str]) -> list[dict]:
    """ModelConfig.parameters (map<string, ModelParameter>): every value is a string, as the backends read them."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]
