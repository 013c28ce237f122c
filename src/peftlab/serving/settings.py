"""The limits of one server (`peftlab serve`), one typed object."""

from __future__ import annotations

from pydantic import Field

from peftlab.typed_config import Strict


class ServeSettings(Strict):
    """Limits of one server; the defaults follow text-embeddings-inference's where it has one. Each is the
    `peftlab serve` option of the same name with dashes (`--max-batch-tokens`), but `api_key`, which is read
    from the environment variable `PEFTLAB_API_KEY`."""

    # The field docstrings (Strict's use_attribute_docstrings) are also the options' --help texts.
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = Field(8080, ge=0, le=65535)
    """port to listen on"""
    max_batch_inputs: int = Field(32, ge=1)
    """inputs per request; more is 413"""
    max_payload_bytes: int = Field(2_000_000, ge=1)
    """request body size; more is 413"""
    max_concurrent: int = Field(512, ge=1)
    """requests in flight; more is 429 at once"""
    max_batch_tokens: int = Field(8192, ge=1)
    """padded tokens per forward pass"""
    max_wait_ms: float = Field(5.0, ge=0)
    """how long a request waits for others to batch with"""
    timeout_s: float = Field(30.0, gt=0)
    """seconds per request; past it, 504"""
    auto_truncate: bool = False
    """truncate over-long texts when a request does not say"""
    api_key: str | None = None
    """if set, requests need 'Authorization: Bearer <key>'"""
    max_text_chars: int = Field(100_000, ge=1)
    """characters per text; more is 413 (truncated or not)"""
    max_queue_rows: int = Field(4096, ge=1)
    """texts waiting for or in a forward pass; more is 429"""
    read_timeout_s: float = Field(10.0, gt=0)
    """seconds to send a request's headers, and its body; past it, 408 or the connection is closed"""
    max_connections: int = Field(1024, ge=1)
    """open connections; past it, 503"""
    docs: bool = False
    """serve /docs and /openapi.json"""
