"""Content parts, shared by /api/chat and /v1: text, and for a user's turn images (checked by images.py).

A message's content is a string or a non-empty list of parts, a union on `type`: a new kind of part is one
more model here with its `wire()` and `text`, and its wording in `part_wording`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

from .. import images
from ..errors import ApiError
from .base import Body, Policy, problem

WHERE = "\x00where\x00"  # stands for the part's place in images.py's sentence until the error is worded
IMAGE = "image"  # an image images.py refused (the message names the problem)
TOO_MANY_IMAGES = "too_many_images"
PART_SHAPES = (
    '{"type": "text", "text": "..."} or {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'
)


class TextPart(Body):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str

    def wire(self) -> dict[str, Any]:
        """The part as sent upstream."""
        return {"type": "text", "text": self.text}


def _content_kind(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "parts" if isinstance(value, list) else None


TEXT_PARTS = Annotated[list[TextPart], Field(min_length=1)]


def content_type(text: Any, parts: Any = TEXT_PARTS) -> Any:
    """A message's content: a string (constrained by `text`) or a list of parts (text parts unless told)."""
    return Annotated[
        Annotated[text, Tag("text")] | Annotated[parts, Tag("parts")],
        Discriminator(_content_kind, custom_error_type="content_type", custom_error_message="string or parts"),
    ]


@lru_cache(maxsize=16)
def image_parts(policy: Policy) -> Any:
    """A user's list of text and image parts, within this app's image caps."""

    class ImageUrl(Body):
        """An image, inline as a data URL."""

        url: str = Field(
            description=f"A base64 data URL (data:image/png;base64,...) of a PNG, JPEG, WebP or GIF image of at most "
            f"{policy.max_image_bytes} bytes and {policy.max_image_side} pixels a side; remote URLs are refused."
        )
        detail: Literal[images.DETAILS] = "auto"  # type: ignore[valid-type]

        @field_validator("url")
        @classmethod
        def _an_image(cls, url: str) -> str:
            try:
                return images.check(url, WHERE, policy)
            except ApiError as exc:
                raise PydanticCustomError(IMAGE, exc.message) from None

    class ImagePart(Body):
        """An image part of a user's turn: only for models that see (GET /api/models)."""

        type: Literal["image_url"]
        image_url: ImageUrl
        text: ClassVar[str] = ""  # an image adds no characters

        def wire(self) -> dict[str, Any]:
            """The part as sent upstream (the data URL's media type in lower case)."""
            return {"type": "image_url", "image_url": self.image_url.model_dump()}

    def at_most(parts: list[Any]) -> list[Any]:
        if image_count(parts) > policy.max_images_per_message:
            raise PydanticCustomError(TOO_MANY_IMAGES, "too many images")
        return parts

    return Annotated[
        list[Annotated[TextPart | ImagePart, Field(discriminator="type")]],
        Field(
            min_length=1,
            description=f"Text and image parts: images only for models that see (GET /api/models), at most "
            f"{policy.max_images_per_message} per message and {policy.max_images} per request.",
        ),
        AfterValidator(at_most),
    ]


def user_content(text: Any, policy: Policy) -> Any:
    """A user's content: a string (constrained by `text`), or text and image parts."""
    return content_type(text, image_parts(policy))


def content_text(content: str | list[Any] | None) -> str:
    """The text of validated content: the string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def wire(content: str | list[Any] | None) -> str | list[dict[str, Any]] | None:
    """Validated content as sent upstream."""
    return content if content is None or isinstance(content, str) else [part.wire() for part in content]


def image_count(content: str | list[Any] | None) -> int:
    """How many images validated content carries."""
    return sum(part.type == "image_url" for part in content) if isinstance(content, list) else 0


def count_images(contents: list[Any], policy: Policy) -> None:
    """The request's contents carry at most CHATPROXY_MAX_IMAGES images."""
    if sum(map(image_count, contents)) > policy.max_images:
        raise problem(f"Too many images: at most {policy.max_images} per request.")


def part_wording(where: str, rest: list[Any], kind: str, msg: str, policy: Policy) -> str | None:
    """The sentence for an error in a user's parts (`rest`: the path after "parts"), or None for others."""
    match rest:
        case [] if kind == TOO_MANY_IMAGES:
            return f"{where} has too many images: at most {policy.max_images_per_message} per message."
        case [int(index), "image_url", "image_url", "url"] if kind == IMAGE:
            return msg.replace(WHERE, f"{where}[{index}].image_url.url")
        case [int(index), "image_url", "image_url", "detail"] if kind != "extra_forbidden":
            return f"{where}[{index}].image_url.detail must be one of: {', '.join(images.DETAILS)}."
        case [int(index), "image_url", "image_url", *_]:
            return f'{where}[{index}].image_url must be {{"url": "data:image/...;base64,...", "detail"?}}.'
        case [int(index), *_]:
            return f"{where}[{index}] must be {PART_SHAPES}."
    return None
