"""Prometheus's HTTP API as the `MetricsProvider` port: one instant query, one number.

`GET <url>/api/v1/query?query=...`. The answer must be `status: success` with a scalar,
or a vector of exactly one sample; anything else — the server unreachable or slow, an
HTTP error (Prometheus's `error` text is kept), a body that is not its JSON, no sample,
several series, NaN or an infinity — is a MetricsError, which the rollout counts as a
failed measurement with this reason.
"""

from __future__ import annotations

import json
import math
from typing import Any

from controlplane.domain.model.analysis import MetricsError
from controlplane.outbound.http import OutboundError, OutboundHttp


class PrometheusProvider:
    def __init__(self, http: OutboundHttp):
        self._http = http

    async def query(self, url: str, promql: str, within: float) -> float:
        endpoint = url.rstrip("/") + "/api/v1/query"
        try:
            answer = await self._http.request("GET", endpoint, within, params={"query": promql})
        except OutboundError as e:
            raise MetricsError(f"provider {url}: {e}") from None
        try:
            data: Any = json.loads(answer.body)
        except ValueError:
            raise MetricsError(
                f"provider {url}: HTTP {answer.status}, not Prometheus's JSON: {answer.body[:80]!r}"
            ) from None
        if not isinstance(data, dict):
            raise MetricsError(f"provider {url}: HTTP {answer.status}, not Prometheus's JSON")
        if answer.status != 200 or data.get("status") != "success":
            raise MetricsError(
                f"provider {url}: HTTP {answer.status} {data.get('errorType', '')}: "
                f"{str(data.get('error', 'no error text'))[:200]}"
            )
        return _one_value(data.get("data"))


def _one_value(data: Any) -> float:
    if not isinstance(data, dict):
        raise MetricsError("the answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    sample: Any
    if kind == "scalar":
        sample = result
    elif kind == "vector" and isinstance(result, list):
        if not result:
            raise MetricsError("the query returned no sample (no data for these nodes yet?)")
        if len(result) > 1:
            raise MetricsError(
                f"the query returned {len(result)} series; a condition needs one value (aggregate it)"
            )
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    else:
        raise MetricsError(f"the query returned a {kind}; a condition needs a scalar or one sample")
    try:
        value = float(sample[1])
    except (TypeError, ValueError, IndexError):
        raise MetricsError(f"unreadable sample {str(sample)[:80]}") from None
    if not math.isfinite(value):
        raise MetricsError(f"the query returned {value}, not a finite number")
    return value
