"""Build the configured tiers' backends."""

from __future__ import annotations

from pathlib import Path

from greenroute.backends import weights
from greenroute.backends.base import Backend
from greenroute.gateway.config import TierConfig


def build_backend(tier: TierConfig) -> Backend:
    """The backend a tier declares; weights named by catalog must already be fetched."""
    if tier.backend == "openai":
        from greenroute.backends.openai_http import OpenAIHTTPBackend

        assert tier.url and tier.model
        return OpenAIHTTPBackend(tier.name, tier.url, tier.model, api_key=tier.resolved_api_key(),
                                 timeout_s=tier.timeout_s, connect_timeout_s=tier.connect_timeout_s,
                                 max_connections=tier.max_connections)
    if tier.backend == "litellm":
        from greenroute.backends.litellm_backend import LiteLLMBackend

        assert tier.model
        return LiteLLMBackend(tier.name, tier.model, api_base=tier.url,
                              api_key=tier.resolved_api_key(), timeout_s=tier.timeout_s)
    from greenroute.backends.llamacpp import LlamaCppBackend

    if tier.weights:
        spec = weights.resolve(tier.weights)
        path = weights.path_for(spec)
        model_id = tier.model or spec.name
    else:
        path = Path(tier.path or "").expanduser()
        model_id = tier.model or path.stem
    return LlamaCppBackend(tier.name, path, model_id, threads=tier.threads, context=tier.context,
                           max_queue=tier.max_queue)
