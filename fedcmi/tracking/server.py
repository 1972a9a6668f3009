"""Where the tracking server is, whether it answers, and how long a request to it may take."""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.request

from fedcmi.config import Config
from fedcmi.errors import FedcmiError

DEFAULT_URI = "sqlite:///mlflow.db"


class TrackingUnavailable(FedcmiError, RuntimeError):
    """The configured tracking server cannot be reached."""


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` wins over params; the default is a SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri or DEFAULT_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's own server
            if resp.status >= 500:
                raise TrackingUnavailable(f"tracking server {uri} answered {resp.status} on /health")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingUnavailable(f"tracking server {uri} answered {exc.code} on /health") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"tracking server {uri} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI / "
            "tracking.tracking_uri, or run with --set tracking.enabled=false"
        ) from None


def reachable(uri: str, timeout: float = 2.0) -> bool:
    try:
        check_reachable(uri, timeout)
    except TrackingUnavailable:
        return False
    return True


#: MLflow's client limits, by the tracking setting that gives them (an environment variable set by the user wins).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "request_timeout", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "max_retries"}
_applied: dict[str, str] = {}  # what apply_http_limits set, so that a value set by anyone else is left alone


def apply_http_limits(cfg: Config) -> None:
    """Bound every request to the tracking server: MLflow's own defaults retry a failing request for about
    four minutes (7 retries, backoff factor 2) and wait up to 120 s for each answer."""
    wanted = {var: str(math.ceil(getattr(cfg.tracking, field))) for var, field in HTTP_LIMITS.items()}
    wanted["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    for var, value in wanted.items():
        if var not in os.environ or os.environ[var] == _applied.get(var):
            os.environ[var] = _applied[var] = value


def transient(exc: BaseException) -> bool:
    """Whether a failed tracking call may succeed when sent again: anything but the server refusing the
    request itself (a 4xx other than timeout and rate limits) is taken as passing."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        try:
            status = int(exc.get_http_status_code())
        except (TypeError, ValueError, AttributeError):
            return True
        return not (400 <= status < 500 and status not in (408, 429))
    return True
