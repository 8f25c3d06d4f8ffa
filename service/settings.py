"""Settings from ``NCLAB_*`` environment variables (pydantic-settings).

With nothing set, nclab runs embedded: a SQLite database and a SQLite-backed Celery
queue in the data directory, so no external server is needed.
"""

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.api_keys import KeyRing
from service.identity import parse_entries


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NCLAB_")

    data_dir: Path = Path("nclab-data")
    # Empty means "embedded default in data_dir".
    database_url: str = ""
    broker_url: str = ""
    # Comma-separated "owner:key[:role]" entries (service/identity.py); when non-empty every
    # route but the health checks needs one of the keys as "Authorization: Bearer <key>"
    # or "X-API-Key: <key>".
    api_keys: str = ""
    # A file of more such entries, one a line, re-read when it changes (service/api_keys.py).
    api_keys_file: Path | None = None

    # Job lifecycle timing, in seconds.
    heartbeat_interval: float = Field(5.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    reconcile_interval: float = Field(10.0, gt=0)
    # A queued job whose message may have been lost is re-sent after this long
    # (doubling with each re-send): duplicates are harmless, the claim is conditional.
    resend_after: float = Field(300.0, gt=0)
    # A job that keeps losing its worker ends failed after this many attempts.
    max_attempts: int = Field(3, ge=1)

    # Which queued job a free worker slot gets (service/scheduler.py): "fair" shares each queue's
    # slots across owners (fewest running first, then priority, then age) and keeps only about a
    # slot's worth of messages in the broker; "fifo" sends every job at its submit, in arrival order.
    scheduler: Literal["fair", "fifo"] = "fair"
    # Quotas per owner; unset means no cap. Running: per queue, the scheduler never starts more
    # (fair only). Queued: a submit or sweep that would take the owner past it is refused (429).
    max_running_per_owner: int | None = Field(None, ge=1)
    max_queued_per_owner: int | None = Field(None, ge=1)

    # Request bodies above this many bytes are refused (413) before they are read.
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # ... but the body of POST /uploads (a file of features, streamed to the artifact store): this many.
    max_upload_bytes: int = Field(8 * 2**30, ge=1024)
    # Database connections per API process, and as many threads for its blocking routes:
    # a thread never waits for a connection, and no connection is opened and closed per request.
    api_connections: int = Field(16, ge=1)

    # Caps so that one request cannot exhaust a worker.
    max_ufm_elements: int = Field(50_000_000, ge=1)  # samples * d
    max_iters: int = Field(200_000, ge=1)
    max_restarts: int = Field(50, ge=1)
    max_epochs: int = Field(1000, ge=1)
    max_sweep: int = Field(1000, ge=1)  # experiments in one sweep
    max_train_width: int = Field(16384, ge=1)  # d and mlp_width of a train job
    max_train_samples: int = Field(2_000_000, ge=1)  # the gaussian mixture's training and test samples
    # A train job whose memory estimate (service/job_size.py) is above this is refused at submit.
    max_job_bytes: int = Field(16 * 2**30, ge=2**20)

    # Where each experiment's files are kept (service/artifacts.py): a directory that the API
    # and every worker see at the same path, or an fsspec URL (s3://bucket/prefix, with the
    # s3 extra). Empty means "<data_dir>/artifacts".
    artifact_root: str = ""
    # Keyword arguments of the store's fsspec filesystem, as JSON (for S3: endpoint_url, key,
    # secret, client_kwargs...); empty: the library's defaults (AWS_* variables, ~/.aws).
    artifact_storage_options: dict[str, Any] = {}
    # A job whose artifacts would take more than this (by service/job_size.py's estimate) is refused at submit.
    max_artifact_bytes: int = Field(8 * 2**30, ge=2**20)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'nclab.sqlite'}"

    @property
    def resolved_artifact_root(self) -> str:
        """The store's URL, or its directory as an absolute path."""
        if "://" in self.artifact_root:
            return self.artifact_root
        return str(Path(self.artifact_root).resolve() if self.artifact_root else self.data_dir.resolve() / "artifacts")

    @property
    def scratch_dir(self) -> Path:
        """Where a worker writes a run's files before it uploads them to a remote artifact store."""
        return self.data_dir.resolve() / "scratch"

    @property
    def embedded_queue_path(self) -> Path:
        """The embedded queue's SQLite file, used where broker_url is empty (service/queue.py)."""
        return self.data_dir.resolve() / "queue.sqlite"

    @field_validator("api_keys")
    @classmethod
    def _entries_parse(cls, api_keys: str) -> str:
        parse_entries(api_keys)  # a malformed entry stops the service at start, naming the entry
        return api_keys

    @cached_property
    def key_ring(self) -> KeyRing:
        """The API keys in force, each naming its owner and role; built as the API starts (api/app.py), where a
        bad keys file stops it. Only the API reads the file: a worker needs no keys."""
        return KeyRing(self.api_keys, self.api_keys_file)


@lru_cache
def get_settings() -> Settings:
    # Reading the settings creates nothing (`nclab --help` writes no files): the commands
    # that keep files in the data directory create it (service/cli.py, service/db.py).
    return Settings()
