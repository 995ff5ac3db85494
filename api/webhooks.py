"""Submit-time checks of a job's webhook: the URL may receive requests (scheme, public addresses unless
``webhook_allow_private``) and the caller's key has a secret to sign them with. Both answer 422."""

from __future__ import annotations

from api.deps import Caller, Services
from api.errors import ApiError
from api.schemas import JobCreate
from store.tables import ApiKey
from store.webhooks import WebhookUrlRefused, check_webhook_url


def check_webhook(services: Services, caller: Caller, body: JobCreate) -> None:
    """422 unless the job's webhook (if it names one) can be sent and signed."""
    if body.webhook_url is None:
        if body.webhook_events is not None:
            raise ApiError(422, "invalid_request", "webhook_events needs a webhook_url")
        return
    try:
        check_webhook_url(body.webhook_url, allow_private=services.settings.webhook_allow_private)
    except WebhookUrlRefused as error:
        raise ApiError(422, "webhook_url_refused", str(error), {"webhook_url": body.webhook_url}) from None
    with services.read_sessions() as session:
        key = session.get(ApiKey, caller.key_id)
        has_secret = key is not None and bool(key.webhook_secret)
    if not has_secret:
        raise ApiError(
            422,
            "webhook_secret_missing",
            "this API key has no webhook secret yet: create one with POST /v1/webhooks/secret "
            "or `srcompress keys rotate-webhook-secret KEY_ID`",
        )
