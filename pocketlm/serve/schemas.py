"""Request bodies of the OpenAI-compatible API (pydantic, strict: "0.5" is not a number, 1.5 is not an
integer). Every text field refuses what UTF-8 cannot encode (a lone surrogate such as "\\ud800" in the
JSON), every number has a range, so the engine only ever sees values it can use; what a field gets
wrong is a 422 naming it. Limits that depend on the server's settings (counts, sizes) are checked
by the pipeline, and fields of OpenAI's API that are not implemented are listed in UNSUPPORTED."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pocketlm.infer.sampling import MIN_PENALTY, SamplingError, SamplingParams


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: code point U+{ord(text[e.start]):04X} at character {e.start} "
                         "is a lone surrogate (UTF-8 cannot encode it)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
INT64 = 2**63
Seed = Annotated[int, Field(ge=-INT64, lt=2**64)]  # what torch.Generator.manual_seed accepts
Count = Annotated[int, Field(ge=1, lt=2**31)]


def _in_use(default) -> Callable[[Any], bool]:
    return lambda value: value not in (None, False, [], {}, default)


# Fields of OpenAI's API this server recognises but does not implement: a request that uses one gets a
# 400 naming it rather than having it silently ignored. Each entry: field -> "is it in use?" (clients
# often send the neutral value). Delete a line when the feature lands.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": _in_use(None),
    "tool_choice": _in_use("none"),
    "functions": _in_use(None),
    "function_call": _in_use("none"),
    "logprobs": _in_use(None),
    "top_logprobs": _in_use(0),
    "n": _in_use(1),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ImageURL(_Body):
    url: Text                        # data:image/...;base64,... only (serve/media.py)
    detail: Literal["auto", "low", "high"] | None = None  # accepted for shape; every image is resized alike


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Body):
    data: Text                       # base64 (serve/media.py)
    format: Text                     # OpenAI's "wav" | "mp3"; wav is what this server reads (a 400 names any other)


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


IMAGE_PLACEHOLDER = "<image>"  # pocketlm.model.vision's and pocketlm.model.speech's (not imported: they need torch)
AUDIO_PLACEHOLDER = "<audio>"
PLACEHOLDERS = {"image_url": IMAGE_PLACEHOLDER, "input_audio": AUDIO_PLACEHOLDER}


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart | ImagePart | AudioPart]
    name: Text | None = None

    def text(self) -> str:
        """The content as the template renders it: an image or audio part is its placeholder on a line of
        its own, as the recipes train it (train/vlm.py, train/speech_recipe.py) and `generate --image` writes it."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if p.type == "text" else PLACEHOLDERS[p.type] + "\n" for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for the name
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # either way the reply is valid by construction (structured.py)


class ResponseFormat(_Body):
    """OpenAI's three: text, json_object, json_schema (with json_schema given); pocketlm.serve.structured."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema' ({\"name\", \"schema\"})")
        return self


class LoraChoice(_Body):
    name: Text
    scale: float | None = None  # accepted for shape only; 1 (the adapter as trained) is all this server runs


class Generation(_Body):
    # extra fields are kept (not validated) so the pipeline can name the unsupported ones
    model_config = ConfigDict(strict=True, extra="allow")

    model: Text
    max_tokens: Count | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, lt=2**31)                # not OpenAI's; the name vLLM uses
    min_p: float = Field(0.0, ge=0, le=1)                # idem
    repetition_penalty: float = Field(1.0, ge=MIN_PENALTY, le=10)  # idem
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Text, float] | None = None          # token id (a string in JSON) -> bias in [-100, 100]
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    ignore_eos: bool = False                             # vLLM's: run to max_tokens (benchmarks)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None        # OpenAI's for chat; vLLM's for completions too
    lora: Text | LoraChoice | None = None                # not OpenAI's: the adapter to run (serve --lora)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                              stop=self.stop_list(), ignore_eos=self.ignore_eos, logit_bias=self.token_biases(),
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)

    def token_biases(self) -> dict[int, float]:
        """logit_bias with its keys as token ids; a key that is not one is the client's error (400)."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise SamplingError(f"logit_bias: keys are token ids (e.g. \"50256\"), got {key!r}")
            out[int(key)] = bias
        return out

    def unsupported(self) -> str | None:
        """The first recognised field of OpenAI's API this request uses and this server lacks."""
        extra = self.model_extra or {}
        return next((name for name, in_use in UNSUPPORTED.items() if name in extra and in_use(extra[name])), None)


class Document(_Body):
    text: Text
    title: Text | None = None


class ChatCompletionRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    # OpenAI's end-user id; with --data-dir and the admin key, the user whose memory the chat uses
    user: Text | None = None
    # not OpenAI's: false is a temporary chat, memory neither read nor written (serve --data-dir)
    memory: bool = True
    # not OpenAI's: grounded mode, the reply answers from these (or `serve --documents`), citing [n]
    documents: list[Text | Document] | None = Field(None, max_length=1024)


class CompletionRequest(Generation):
    prompt: Text | list[Annotated[int, Field(ge=0, lt=2**31)]] | list[Text]
    max_tokens: Count | None = 16  # OpenAI's default for completions (null means it too)
    # not OpenAI's: read special-token markers in the prompt as the tokens (a trusted caller writing a
    # raw prompt, e.g. in a chat template by hand); by default they are text like the rest
    allow_special_tokens: bool = False

    def requested_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens


def chat_max_tokens(body: ChatCompletionRequest) -> int | None:
    """None: as many as the context leaves room for (OpenAI's chat default)."""
    return body.max_completion_tokens or body.max_tokens
