"""One client for OpenAI-compatible chat endpoints (the prompt writer's `openai` backend, the MMHal judge): a POST
with bounded retries and backoff on transient failures, every failure one InputError line."""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

from actors.common.errors import InputError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}   # worth another try; other 4xx are the caller's mistake


def endpoint(api_base: str) -> str:
    """The chat completions URL of a base: `host`, `host/v1` or the full `.../chat/completions`."""
    base = api_base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def chat_completion(url: str, body: dict, api_key: str | None, *, who: str, field: str, timeout: float = 120.0,
                    retries: int = 4, backoff: float = 2.0) -> str:
    """The first choice's text. `who` names the caller in errors ("judge"), `field` the setting to fix."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    reason = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(30.0, backoff * 2 ** (attempt - 1)))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = json.loads(resp.read())
            return data["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace").strip()
            reason = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
            if e.code not in RETRY_STATUS:   # a wrong key or model name will not heal by retrying
                raise InputError(f"{who} refused the request ({reason})", field=field) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = str(getattr(e, "reason", None) or e)
        except (ValueError, KeyError, IndexError, TypeError):   # json.JSONDecodeError is a ValueError
            raise InputError(f"{who} at {url} did not answer as an OpenAI chat completion", field=field) from None
    raise InputError(f"{who} at {url} failed {retries + 1} times, last: {reason}", field=field)
