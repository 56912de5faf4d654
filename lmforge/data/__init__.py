"""Data: sources (user files), corpora (packaged real data), shards, loaders."""

from collections.abc import Callable, Iterable, Iterator, Sequence

from lmforge.errors import DataError


def document_source(
    corpus: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
    split: str | None = "train",
    text_field: str = "text",
    text_mode: str = "blocks",
    words: bool = False,
) -> Callable[[], Iterable[str | list[str]]]:
    """A re-readable stream of documents from named corpora and/or user files (globs).

    ``split`` applies to named corpora (None = all splits); user files are read whole.
    ``words``: corpora that come word-segmented yield lists of words (for whole-word masking).
    """
    from lmforge.data.corpora import corpus as named
    from lmforge.data.sources import read_documents

    if not corpus and not files:
        raise DataError("give at least one --corpus NAME or --files PATH")
    chosen = [named(name) for name in corpus or []]  # unknown names fail now, not mid-run

    def stream() -> Iterator[str | list[str]]:
        for item in chosen:
            if words and item.read_words is not None:
                yield from item.words(split)  # type: ignore[arg-type]
            else:
                yield from item.documents(split)  # type: ignore[arg-type]
        if files:
            yield from read_documents(list(files), text_field=text_field, text_mode=text_mode)  # type: ignore[arg-type]

    return stream


def mixed_source(
    new: Callable[[], Iterable[str | list[str]]],
    old: Callable[[], Iterable[str | list[str]]],
    ratio: float,
) -> Callable[[], Iterable[str | list[str]]]:
    """Rehearsal: every new-domain document plus old-domain documents until they make up
    ``ratio`` of the characters (the loader shuffles blocks, so the two mix in batches)."""
    if not 0 <= ratio < 1:
        raise DataError(f"rehearsal ratio {ratio} must be in [0, 1)")

    def size(document: str | list[str]) -> int:
        return len(document) if isinstance(document, str) else sum(len(w) for w in document)

    def stream() -> Iterator[str | list[str]]:
        new_chars = 0
        for document in new():
            new_chars += size(document)
            yield document
        budget = ratio / (1 - ratio) * new_chars
        used = 0
        for document in old():
            if used >= budget:
                return
            used += size(document)
            yield document
        if ratio and used < budget:
            raise DataError(f"the rehearsal corpus has {used} characters, fewer than the {int(budget)} "
                            f"that ratio {ratio} asks for")

    return stream
