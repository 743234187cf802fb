"""Request and response bodies (pydantic), which also make the OpenAPI schema at /openapi.json.

Requests follow the OpenAI API where one exists (chat completions, embeddings, models) and
ignore fields they do not know, as OpenAI-compatible servers do, so clients that send ``user``
or ``logprobs: false`` keep working.  Fields we cannot honour (``n > 1``, non-zero frequency
penalties) are rejected by the routes with a 400 that says so, never silently dropped.
Response models are documentation: routes build plain dicts and skip re-validation, which for
a 512-float embedding list would cost more than computing it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatCompletionRequest", "ClassifyRequest", "EmbeddingRequest", "ImagePart", "ImageURL",
           "StateImportRequest", "StateRequest", "TextPart"]


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_In):
    url: str = Field(description="a data URI (data:image/png;base64,...), a path under --allowed-image-dir "
                                 "(or file:// URL), or an http(s) URL when the server runs with --allow-remote-images")
    detail: str | None = Field(None, description="accepted for compatibility; the model's own preprocessing applies")


class TextPart(_In):
    type: Literal["text"]
    text: str


class ImagePart(_In):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_In):
    include_usage: bool = False


class ChatCompletionRequest(_In):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the server's --default-max-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens (newer clients)")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension (extra_body): 0 = off")
    repetition_penalty: float = Field(1.0, gt=0, description="extension (extra_body): 1 = off")
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class EmbeddingRequest(_In):
    model: str
    input: str | list[str | TextPart | ImagePart | int | list[int]] = Field(
        description="text, a list of texts, or (CLIP/SigLIP) a list mixing texts and "
                    "{'type': 'image_url', 'image_url': {'url': ...}} parts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


ImageRef = str | ImageURL


class _LabelsIn(_In):
    model: str
    labels: list[str] | None = Field(None, description="class names (at least two); or give label_set")
    label_set: str | None = Field(None, description="a name from the server's --label-sets file")
    prompt: str | None = Field(None, description="template with {} for the label (default 'a photo of a {}')")


class ClassifyRequest(_LabelsIn):
    image: ImageRef | None = Field(None, description="one image; or give images")
    images: list[ImageRef] | None = Field(None, description="images classified in order (a stream)")
    stream_id: str | None = Field(None, max_length=128,
                                  description="adaptation state to use; none = plain zero-shot")
    adapt: bool | None = Field(None, description="update the stream's Q-TTA caches (default: true with a stream_id)")
    reset: bool = Field(False, description="empty the stream's caches before classifying")
    top_k: int | None = Field(None, ge=1, description="labels listed per image (default: all)")


class StateRequest(_LabelsIn):
    stream_id: str | None = Field(None, max_length=128, description="reset: none = every stream of the label set")


class StateImportRequest(_LabelsIn):
    stream_id: str = Field(max_length=128)
    state: str = Field(description="base64 of the .npz that /v1/classify/state/export returned")


# ---------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="CLIP: softmax probability; SigLIP: sigmoid of the logit")


class ClassifyResult(BaseModel):
    index: int
    label: str
    score: float
    scores: list[LabelScore]


class Classification(BaseModel):
    object: Literal["classification"]
    model: str
    stream_id: str | None
    adapted: bool
    labels: list[str]
    results: list[ClassifyResult]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: list[str] = Field(description="chat | embeddings | classify")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
