"""The Pipeline's asyncio face: each blocking call on a worker thread (the pipeline is thread-safe),
so an event loop stays responsive while a stage runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from setok.runtime.results import ImageInput, Text


class AsyncMethods:
    """Mixed into `Pipeline`: `answer_async`, `caption_async`, `answer_batch_async`, `astream`."""

    async def answer_async(self, image: ImageInput, question: str, **kwargs: Any) -> Text:
        """`answer` on a worker thread (the pipeline is thread-safe): an event loop stays responsive."""
        return await asyncio.to_thread(self.answer, image, question, **kwargs)

    async def caption_async(self, image: ImageInput, **kwargs: Any) -> Text:
        return await asyncio.to_thread(self.caption, image, **kwargs)

    async def answer_batch_async(self, images: Sequence[ImageInput], questions: Sequence[str],
                                 **kwargs: Any) -> list[Text]:
        return await asyncio.to_thread(self.answer_batch, images, questions, **kwargs)

    async def astream(self, image: ImageInput, question: str | None = None, max_new_tokens: int | None = None,
                      **kwargs: Any) -> AsyncIterator[str]:
        """Async iterator of text pieces as they are decoded (the decode loop runs on a thread)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                for piece in self.stream(image, question, max_new_tokens, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(None, produce)
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        await worker
