"""OpenAI-compatible request/response schemas and the pure helpers around them.

The pydantic models here *are* the OpenAPI spec of the router (FastAPI derives
``/openapi.json`` from them), so every constraint the server enforces on a field is declared on
the field. Parameters that OpenAI defines but we do not implement are declared too, so that a
request using them gets a clear 400 instead of being silently ignored; unknown extra fields are
ignored (clients send new fields before servers know them).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
import weakref
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.router.backend import FinishReason, SamplingParams
from shared.errors import ContextTooLong, InvalidParameter, LScaleError
from shared.sampling import MAX_LOGPROBS, MAX_SEQUENCES, SEED_RANGE

MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 64  # prompts in one completions request (lm-eval-harness batches them)
StopText = Annotated[str, Field(min_length=1)]

# --- requests ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="Id of a model listed by GET /v1/models.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_SEQUENCES,
                          description="Choices to generate from the one prompt (one prefill).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopText | list[StopText] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} sequences that end the generation."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's extra parameters (clients send them in ``extra_body``)
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=2.0, description="transformers' repetition penalty (1: none).")
    top_k: int | None = Field(None, ge=-1, description="Top-k sampling (0 or -1: off).")
    min_tokens: int | None = Field(None, ge=0, description="Tokens before EOS may end it.")
    ignore_eos: bool | None = Field(None, description="Generate past end-of-sequence tokens.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Not supported; must be empty.", json_schema_extra={"maxProperties": 0}
    )
    user: str | None = None

    @model_validator(mode="after")
    def _check_stop(self) -> _SamplingFields:
        stops = self.stop_sequences()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop: sequences must not be empty")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def choices_per_prompt(self) -> int:
        return self.n or 1

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt = Field(
        description=f"Text or token ids, or a list of up to {MAX_PROMPTS} of either."
    )
    max_tokens: int | None = Field(
        16, ge=0, description="Tokens to generate (default 16); 0 only with echo (scoring).")
    echo: bool | None = Field(False, description="Return the prompt before the completion.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Log-probabilities of each token and of this many most likely ones.")
    best_of: int | None = Field(
        None, ge=1, le=MAX_SEQUENCES,
        description="Generate this many and return the n with the highest log-probability.")
    suffix: str | None = Field(
        None, description="Not supported; must be null or empty.", json_schema_extra={"maxLength": 0}
    )

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def check_combinations(self) -> None:
        """What one field's constraint cannot say (InvalidParameter naming the parameter)."""
        if self.max_tokens == 0 and not self.echo:
            raise InvalidParameter("max_tokens 0 is only allowed with echo (scoring a prompt)",
                                   param="max_tokens")
        n = self.choices_per_prompt()
        if self.best_of is not None and self.best_of < n:
            raise InvalidParameter(f"best_of ({self.best_of}) must be at least n ({n})",
                                   param="best_of")
        if self.stream and self.best_of is not None and self.best_of > n:
            raise InvalidParameter("best_of larger than n cannot be streamed", param="best_of")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = Field(
        description="json_object and json_schema are not supported (no constrained decoding).")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate (default: the rest of the context)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool | None = Field(False, description="Log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Most likely tokens per position (logprobs).")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Not supported; must be empty.", json_schema_extra={"maxItems": 0}
    )
    response_format: ResponseFormat | None = Field(
        None, description="Only {'type': 'text'}: structured output is not built.")

    @model_validator(mode="after")
    def _check_unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: parallel lists, one entry per token."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): text, or a conversation rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- helpers -------------------------------------------------------------------------------


def error_type_for(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    detail = ErrorDetail(message=message, type=error_type_for(status), param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def error_body_for(err: LScaleError) -> dict[str, Any]:
    param = err.details.get("param")
    return error_body(
        err.http_status, err.message, param=str(param) if param else None, code=err.code
    )


# ids of requests and responses: this process's random tag and a counter. Unique across
# routers and restarts (64 random bits each start) like a uuid4's hex, without its urandom
# call and object on each of the three ids every request takes.
_ID_TAG = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ID_TAG}{next(_ID_COUNTER):016x}"


def now_s() -> int:
    return int(time.time())


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude_none=False)
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def completion_prompts(request: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt of a completions request: text is tokenized, ids are checked."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) > MAX_PROMPTS:
            raise InvalidParameter(f"at most {MAX_PROMPTS} prompts per request; got "
                                   f"{len(prompt)}", param="prompt")
        return [_prompt_ids(p, tokenizer) for p in prompt]
    return [_prompt_ids(prompt, tokenizer)]


def completion_prompt_ids(request: CompletionRequest, tokenizer: Any) -> list[int]:
    """Token ids of a completions request's one prompt (InvalidParameter for several)."""
    prompts = completion_prompts(request, tokenizer)
    if len(prompts) != 1:
        raise InvalidParameter("only one prompt is allowed here", param="prompt")
    return prompts[0]


def _prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidParameter("prompt must not be empty", param="prompt")
        return codec_for(tokenizer).encode(prompt)
    if not isinstance(prompt, list):
        raise InvalidParameter("prompt must be text or a list of token ids", param="prompt")
    ids = [t for t in prompt if isinstance(t, int) and not isinstance(t, bool)]
    if len(ids) != len(prompt):
        raise InvalidParameter("prompt must be text or a list of token ids", param="prompt")
    if not ids:
        raise InvalidParameter("prompt must not be empty", param="prompt")
    vocab = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidParameter(
            f"prompt token ids must be in 0..{vocab - 1}; got {bad[0]}", param="prompt"
        )
    return ids


DEFAULT_CHAT_TEMPLATE_NOTE = (
    "Used when a tokenizer has no chat template: one 'role: content' line per message, then "
    "'assistant:' to prompt the reply."
)


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """Render the conversation with the tokenizer's chat template, or a plain default."""
    return render_chat(request.messages, tokenizer, True)


def render_chat(chat: Sequence[ChatMessage], tokenizer: Any,
                add_generation_prompt: bool) -> list[int]:
    """A conversation's token ids: the tokenizer's chat template, or a plain default."""
    messages = [{"role": m.role, "content": m.text()} for m in chat]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # a template may reject a conversation (e.g. role order)
            raise InvalidParameter(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        ids = codec_for(tokenizer).encode(str(text), add_special_tokens=False)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant:"
        ids = codec_for(tokenizer).encode(text)
    if not ids:
        raise InvalidParameter("messages render to an empty prompt", param="messages")
    return ids


def sampling_for(
    request: CompletionRequest | ChatCompletionRequest,
    prompt_len: int,
    max_context: int,
    stop_token_ids: Sequence[int],
) -> SamplingParams:
    """The engine's parameters for one prompt of a request, max_tokens resolved against the
    context window. An echo-only request (``max_tokens=0``) runs one token, which the answer
    leaves out (the engine always generates at least one)."""
    if isinstance(request, CompletionRequest):
        request.check_combinations()
    room = max_context - prompt_len
    chat = isinstance(request, ChatCompletionRequest)
    if room < 1:
        raise ContextTooLong(
            f"the prompt has {prompt_len} tokens; the model's context is {max_context} "
            "tokens, leaving no room to generate",
            param="messages" if chat else "prompt",
        )
    if isinstance(request, ChatCompletionRequest):
        wanted = request.requested_max_tokens()
        max_tokens = room if wanted is None else wanted
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prompt_logprobs = None
        best_of = None
    else:
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        logprobs = request.logprobs
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None \
            else None
        best_of = request.best_of
        if best_of is not None and best_of > request.choices_per_prompt() and logprobs is None:
            logprobs = 0  # ranking needs each token's logprob
    if max_tokens > room:
        raise ContextTooLong(
            f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {max_context} tokens",
            param="max_tokens",
        )
    min_tokens = request.min_tokens or 0
    if min_tokens > max(1, max_tokens):
        raise InvalidParameter(f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})",
                               param="min_tokens")
    return SamplingParams(
        max_tokens=max(1, max_tokens),
        min_tokens=min_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(0, request.top_k or 0),
        seed=None if request.seed is None else request.seed % (SEED_RANGE[1] + 1),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None
        else request.repetition_penalty,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=bool(request.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=request.choices_per_prompt(),
        best_of=best_of,
    )


# --- tokenizing -----------------------------------------------------------------------------


def _defined_in(cls: type, name: str, owner: str) -> bool:
    """Whether ``cls.<name>`` is the implementation of the transformers class ``owner``
    (not an override by a model-specific tokenizer class)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__name__ == owner and klass.__module__.startswith("transformers.")
    return False


class TokenCodec:
    """A tokenizer's ``encode`` and ``decode(..., skip_special_tokens=True)``, computed by its
    Rust ``tokenizers.Tokenizer`` directly when that is exactly what the Hugging Face wrapper
    would compute, else by the wrapper.

    The wrapper (``TokenizersBackend``) spends most of its time in Python around one Rust call:
    ``encode`` is ``backend.encode(text, add_special_tokens)`` (special tokens such as BOS come
    from the backend's post-processor) provided no truncation or padding is configured on the
    backend and its ``encode_special_tokens`` matches ``split_special_tokens`` (the wrapper sets
    both before encoding; when they differ, the wrapper is called, which sets them); ``decode``
    is ``backend.decode`` unless the tokenizer cleans up tokenization spaces (which it skips
    for BPE models unless forced). Tokenizer classes that override these methods always go
    through the wrapper.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cls = type(tokenizer)
        encodes = (
            backend is not None
            and _defined_in(cls, "encode", "PreTrainedTokenizerBase")
            and _defined_in(cls, "_encode_plus", "TokenizersBackend")
        )
        decodes = (
            backend is not None
            and _defined_in(cls, "decode", "PreTrainedTokenizerBase")
            and _defined_in(cls, "_decode", "TokenizersBackend")
            and not self._cleans_up(tokenizer, backend)
        )
        self._encoder = backend if encodes else None
        self._decoder = backend if decodes else None
        self._split_special = bool(getattr(tokenizer, "split_special_tokens", False))
        # batch-of-one without offsets: the same ids, less work
        self._encode_one = getattr(backend, "encode_batch_fast", None) if encodes else None
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id: int | None = None if eos is None else int(eos)

    @staticmethod
    def _cleans_up(tokenizer: Any, backend: Any) -> bool:
        if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            return False
        forced = getattr(tokenizer,
                         "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                         False)
        return type(backend.model).__name__ != "BPE" or bool(forced)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        backend = self._encoder
        if (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == self._split_special
        ):
            if self._encode_one is not None:
                return list(self._encode_one([text], add_special_tokens=add_special_tokens)[0].ids)
            return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` without special tokens."""
        if self._decoder is not None:
            return str(self._decoder.decode(token_ids, skip_special_tokens=True))
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def __len__(self) -> int:
        return len(self.tokenizer)


_CODECS: weakref.WeakKeyDictionary[Any, TokenCodec] = weakref.WeakKeyDictionary()


def codec_for(tokenizer: Any) -> TokenCodec:
    """The (cached) codec of a tokenizer object; ``tokenizer`` may already be a codec."""
    if isinstance(tokenizer, TokenCodec):
        return tokenizer
    try:
        codec = _CODECS.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: no caching
        return TokenCodec(tokenizer)
    if codec is None:
        codec = _CODECS[tokenizer] = TokenCodec(tokenizer)
    return codec


# --- detokenizing ---------------------------------------------------------------------------

_REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
_WINDOW_TOKENS = 8  # a window of at least this many tokens moves its start forward


class TextAssembler:
    """Turns a growing list of token ids into text deltas, honouring stop sequences.

    The text is the tokenizer's decoding of *all* tokens so far (``decode(ids)``); text that
    could still be the start of a stop sequence, or ends in an incomplete UTF-8 character, is
    held back until it is decided. Decoding is incremental, O(new tokens) per token: only a
    window of recent tokens is decoded, ``ids[start:]``, and the text the window adds to its
    already-committed part ``ids[start:read]`` is appended. Starting the window at a token that
    was itself committed keeps decoder context that depends on position (a SentencePiece
    decoder drops the first token's leading space; the same start is dropped from both
    decodings, so the difference is the new text) and never splits a character: text is
    committed only when it does not end in an incomplete character. While it does, the window
    grows, so pieces that merge only with later bytes come out right.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], min_tokens: int = 0) -> None:
        self._codec = codec_for(tokenizer)
        self._min_tokens = min_tokens  # stop strings count from this many tokens on (vLLM)
        self._stops = [s for s in stops if s]
        self._keep = max((len(s) for s in self._stops), default=1) - 1  # chars a stop may span
        self._ids: list[int] = []
        self._start = 0  # window start (a token index)
        self._read = 0  # tokens committed
        self._start_chars = 0  # len(decode(ids[start:read]))
        self._parts: list[str] = []  # the committed text
        self._committed = 0  # its length
        self._tail = ""  # the window's uncommitted text (may end in an incomplete char)
        # the text from char _base on: the committed text's last _keep chars and everything
        # not yet emitted
        self._base = 0
        self._recent = ""
        self._emitted = 0  # chars given out
        self._cut: int | None = None  # where a stop sequence ended the text
        self.stopped = False

    @property
    def text(self) -> str:
        """The text so far (cut at a stop sequence once one is found)."""
        full = "".join(self._parts) + self._tail
        return full if self._cut is None else full[: self._cut]

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now final."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        window = self._codec.decode(self._ids[self._start :])
        tail = window[self._start_chars :]
        self._tail = tail
        current = self._recent + tail
        at = self._find_stop(current)
        if at is not None:
            self.stopped = True
            self._cut = self._base + at
            return self._take(current, at)
        if tail and not tail.endswith(_REPLACEMENT):
            self._commit(window)
            current = self._recent
        final = len(current.rstrip(_REPLACEMENT)) if current.endswith(_REPLACEMENT) \
            else len(current)
        return self._take(current, self._hold_back(current, final))

    def finish(self) -> str:
        """Everything not yet emitted (the generation ended)."""
        if self.stopped:
            return ""
        current = self._recent + self._tail
        return self._take(current, len(current))

    # --- internals -------------------------------------------------------------------------

    def _find_stop(self, current: str) -> int | None:
        """The earliest stop sequence in the text (only its recent part can hold a new one)."""
        if len(self._ids) < self._min_tokens:
            return None
        best: int | None = None
        for stop in self._stops:
            at = current.find(stop)
            if at != -1 and (best is None or at < best):
                best = at
        return best

    def _hold_back(self, current: str, final: int) -> int:
        """Where emitting must stop so that no possible start of a stop sequence leaves."""
        limit = final
        for stop in self._stops:
            for k in range(min(len(stop) - 1, final), 0, -1):
                if current.endswith(stop[:k], 0, final):
                    limit = min(limit, final - k)
                    break
        return limit

    def _commit(self, window: str) -> None:
        tail = self._tail
        self._parts.append(tail)
        self._committed += len(tail)
        self._recent += tail
        self._tail = ""
        previous_read, self._read = self._read, len(self._ids)
        if self._read - self._start > _WINDOW_TOKENS:
            # restart the window at the previous commit: a token boundary between whole
            # characters, with context before the tokens to come
            self._start = previous_read
            self._start_chars = len(self._codec.decode(self._ids[self._start : self._read]))
        else:
            self._start_chars = len(window)
        # keep only what a stop sequence may still span, and what is not yet emitted
        base = max(0, min(self._emitted, self._committed - self._keep))
        if base > self._base:
            self._recent = self._recent[base - self._base :]
            self._base = base

    def _take(self, current: str, upto: int) -> str:
        """Emit ``current[emitted:upto]`` (positions relative to ``_base``)."""
        start = self._emitted - self._base
        if upto <= start:
            return ""
        self._emitted = self._base + upto
        return current[start:upto]
