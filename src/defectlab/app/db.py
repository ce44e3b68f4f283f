"""Database of the workbench: model versions, images, inspections, reviews, skipped files,
tokens. SQLAlchemy 2.x; SQLite (WAL mode) by default, PostgreSQL by URL. The schema is
created and upgraded by Alembic only (:func:`migrate`), so every database has a history."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from defectlab.errors import ConfigError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERDICTS = ("defect", "normal", "unsure")
#: a model version's status: the one inspections go to, proposed by retrain, or retired
STATUSES = ("active", "candidate", "retired")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of the workbench tables."""


class ModelVersion(Base):
    """A trained run with the thresholds it decides with; retraining adds versions."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_dir: Mapped[str] = mapped_column(String(1024))
    model: Mapped[str] = mapped_column(String(64))
    image_threshold: Mapped[float] = mapped_column(Float)
    pixel_threshold: Mapped[float] = mapped_column(Float)
    map_low: Mapped[float] = mapped_column(Float)
    map_high: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    note: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Image(Base):
    """One distinct image, known by the SHA-256 of its bytes."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(2048))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), default="folder")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Inspection(Base):
    """What one model version said about one image; its mask and heat map are files."""

    __tablename__ = "inspections"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    score: Mapped[float] = mapped_column(Float, index=True)
    is_defect: Mapped[bool] = mapped_column(Boolean)
    defect_area: Mapped[float] = mapped_column(Float)
    mask_file: Mapped[str] = mapped_column(String(512))
    heatmap_file: Mapped[str] = mapped_column(String(512))
    audit: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Review(Base):
    """A person's decision on an image; ``revision`` rises with every change, so two
    reviewers saving the same image at once cannot silently overwrite each other."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), unique=True)
    verdict: Mapped[str] = mapped_column(String(16))
    defect_class: Mapped[str] = mapped_column(String(64), default="")
    mask_file: Mapped[str] = mapped_column(String(512), default="")
    reviewer: Mapped[str] = mapped_column(String(64), default="")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Skipped(Base):
    """A file ingest could not read, with the reason."""

    __tablename__ = "skipped"
    __table_args__ = (UniqueConstraint("path"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(2048))
    reason: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Token(Base):
    """A write token, stored as its SHA-256 only (the token itself is shown once)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def default_url(folder: str | Path) -> str:
    """The zero-set-up database: ``workbench.db`` in ``folder`` (beside the runs)."""
    return f"sqlite:///{Path(folder).resolve() / 'workbench.db'}"


def files_dir(url: str, files: str | Path | None = None) -> Path:
    """Where masks and heat maps go: ``files`` if given, else beside a SQLite file
    (``NAME.db`` → ``NAME-files/``), else ``defectlab-files`` in the working folder."""
    if files is not None:
        return Path(files)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database)
        return db.with_name(db.stem + "-files")
    return Path("defectlab-files")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"--db {url!r}: not a database URL ({exc})") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).resolve().parent
            if not folder.is_dir():
                raise ConfigError(f"{parsed.database}: folder {folder} does not exist")
        engine = create_engine(parsed, connect_args={"timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend != "postgresql":
        raise ConfigError(f"--db {url!r}: only sqlite:/// and postgresql:// are supported")
    return create_engine(parsed, pool_pre_ping=True)


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest Alembic revision; returns that revision."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision() or ""
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(
            f"{engine.url.render_as_string()}: cannot open database ({first})"
        ) from None


class Database:
    """An engine with its migrated schema and a session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.revision = migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed together, or rolled back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def active_version(self, session: Session) -> ModelVersion | None:
        return session.scalars(
            select(ModelVersion).where(ModelVersion.status == "active").order_by(ModelVersion.id)
        ).first()

    def counts(self, session: Session) -> dict[str, int]:
        return {
            "images": session.scalar(select(func.count(Image.id))) or 0,
            "inspections": session.scalar(select(func.count(Inspection.id))) or 0,
            "reviews": session.scalar(select(func.count(Review.id))) or 0,
            "skipped": session.scalar(select(func.count(Skipped.id))) or 0,
        }

    def close(self) -> None:
        self.engine.dispose()
