"""welore_client: a Python client of the welore job service (httpx + pydantic; no torch).

    from welore_client import Client
    client = Client()                     # WELORE_API_URL, WELORE_API_KEY
    job = client.jobs.create("compress", "smollm2-135m", {"err": 0.3}, idempotency_key="c03")
    for event in client.jobs.events(job.id):
        print(event.type, event.data)
    client.jobs.download(job.id, "c03")   # resumable, every SHA-256 verified
"""

from .client import Client
from .errors import (APIConnectionError, APIError, AuthenticationError, ChecksumMismatch, ConflictError,
                     NotFoundError, ServerError, ServiceUnavailableError, ValidationError, WaitTimeout,
                     WeloreClientError)
from .types import Artifact, Dataset, Downloaded, Event, File, Job, Metrics, Model

__version__ = "0.1.0"
__all__ = ["Client", "APIConnectionError", "APIError", "AuthenticationError", "ChecksumMismatch", "ConflictError",
           "NotFoundError", "ServerError", "ServiceUnavailableError", "ValidationError", "WaitTimeout",
           "WeloreClientError", "Artifact", "Dataset", "Downloaded", "Event", "File", "Job", "Metrics", "Model"]
