"""The checks every text gets before it reaches a model, whichever door it came in by.

gRPC and HTTP (tensors.py, through InvalidInput) and Triton's Python-backend preprocessing
(triton_python.py, through its own error type) refuse the same texts with the same messages. No
grpc here: the Triton model imports this without the ``[serve]`` extra.
"""

from __future__ import annotations


def decode_texts(name: str, items: list[bytes], max_text_bytes: int, error: type[Exception] = ValueError) -> list[str]:
    """UTF-8 decode each BYTES element of input ``name``, refusing empty, oversized and undecodable ones by index.

    >>> decode_texts("TEXT", [b"A gem."], 8192)
    ['A gem.']
    >>> decode_texts("TEXT", [b"ok", b" "], 8192)
    Traceback (most recent call last):
    ValueError: TEXT[1] is empty (or only whitespace)
    """
    texts: list[str] = []
    for i, item in enumerate(items):
        if len(item) > max_text_bytes:
            raise error(f"{name}[{i}] is {len(item)} bytes; the limit is {max_text_bytes}")
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{name}[{i}] is not valid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            raise error(f"{name}[{i}] is empty (or only whitespace)")
        texts.append(text)
    return texts
