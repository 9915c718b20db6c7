"""Request and response models of the OpenAI-compatible API.

Only the fields the gateway reads are declared; everything else passes through to the engine
unchanged (``extra="allow"``), so engine-specific options such as ``top_k`` keep working.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Optional[bool] = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def generation_budget(self) -> Optional[int]:
        """The most tokens the request may generate, where it says."""
        return getattr(self, "max_tokens", None)

    def prompt_token_lengths(self) -> list[int]:
        """Lengths of prompts given as token ids (text prompts need the engine's tokenizer: empty)."""
        return []


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False  # declared before max_tokens: its validator reads it
    max_tokens: Optional[int] = Field(default=None, ge=0)

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
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

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
