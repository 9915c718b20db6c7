"""Request and response models of the OpenAI-compatible API.

Only the fields the gateway reads are declared; everything else passes through to the engine
unchanged (``extra="allow"``), so engine-specific options such as ``top_k`` keep working. The declared fields
take what their JSON Schema type says and nothing else, as OpenAI's API does: ``false`` is no token id,
``"16"`` no ``max_tokens`` and ``"true"`` no ``stream`` (an integral ``16.0`` is an integer, as JSON Schema has it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationInfo, field_validator


def _number_only(value: Any) -> Any:
    # pydantic's lax mode would read true as 1 and "16" as 16; JSON Schema's integer is neither
    if isinstance(value, (bool, str)):
        raise ValueError("must be an integer")
    return value


def _integer(ge: int, le: Optional[int] = None) -> Any:
    """A JSON integer in [ge, le]. The bounds sit beside the validator, not on top of it, so that the JSON
    Schema says ``minimum`` / ``maximum`` (a constraint on the annotated type comes out as a bare ``ge``)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_number_only)]


TokenId = _integer(0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Optional[StrictBool] = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI's bound: more choices than this is a request no engine should be asked to allocate
    n: Optional[_integer(1, 128)] = None

    def generation_budget(self) -> Optional[int]:
        """The most tokens the request may generate, where it says."""
        return getattr(self, "max_tokens", None)

    def prompt_token_lengths(self) -> list[int]:
        """Lengths of prompts given as token ids (text prompts need the engine's tokenizer: empty)."""
        return []


class CompletionRequest(_GenerationRequest):
    # the schema says what the validator below enforces, so that schema-driven clients and fuzzers generate
    # only requests the gateway accepts: max_tokens 0 needs echo true
    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"properties": {"echo": {"const": True}}, "required": ["echo"]},
        {"properties": {"max_tokens": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}}}]})
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]] = Field(
        description="Text, texts, token ids or lists of token ids (ids within the model's vocabulary).")
    echo: StrictBool = False  # declared before max_tokens: its validator reads it
    max_tokens: Optional[_integer(0)] = Field(default=None, description=(
        "Tokens to generate: at most the model's context less the prompt (GET /v1/models gives max_model_len); "
        "0 only with echo: true, to score the prompt."))

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_to_score_the_prompt(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        # max_tokens 0 with echo scores the prompt without generating (how perplexity is measured)
        if value == 0 and not info.data.get("echo"):
            raise ValueError("0 generates nothing; it is allowed only with echo: true, to score the prompt")
        return value

    def prompt_token_lengths(self) -> list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return [len(prompt)]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            return [len(p) for p in prompt]
        return []


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[Any], None] = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[_integer(1)] = None
    max_completion_tokens: Optional[_integer(1)] = None

    def generation_budget(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qserve"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
