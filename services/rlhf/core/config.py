"""Typed configuration: one pydantic model per service or job, loaded from YAML, environment and flags.

Precedence (lowest first): field defaults < YAML file (``--config``) < environment < command-line flags.
Environment variables are ``RLHF_<FIELD>`` (shared by every service in the process environment, e.g.
``RLHF_AUTH_TOKEN`` from a Kubernetes secret) and ``RLHF_<SECTION>_<FIELD>`` (one service only, e.g.
``RLHF_REWARD_PORT``); the section-specific one wins. Values from the environment are parsed as YAML
scalars/lists (``RLHF_STOP='["a", "b"]'``). The Helm chart renders the same keys into the YAML file.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

C = TypeVar("C", bound="BaseConfig")

#: Environment every ``rlhf`` process and every process the launcher starts get, unless the user set the
#: variable. OpenMP threads that wait sleep instead of spinning: on a busy 2-core machine two spinning torch
#: threads keep each other (and the other services) off the cores; a 2-thread PPO run was 3x slower spinning.
#: libgomp reads it once, when torch is imported, so it must be in ``os.environ`` before that.
PROCESS_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_process_env_defaults(
    env: typing.MutableMapping[str, str] | None = None,
) -> typing.MutableMapping[str, str]:
    """Add :data:`PROCESS_ENV_DEFAULTS` missing from ``env`` (default ``os.environ``); returns ``env``."""
    env = os.environ if env is None else env
    for name, value in PROCESS_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    return env


class BaseConfig(BaseModel):
    """Base of every config: unknown keys are errors, so a typo in YAML or the chart fails loudly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    #: Section name used for the ``RLHF_<SECTION>_`` environment prefix (e.g. "reward").
    section: ClassVar[str] = ""

    def public_dump(self) -> dict:
        """The config as JSON-ready values with every secret field (see :func:`secret_field`) redacted: what
        may be written next to checkpoints, logged or shown; never the tokens or a database URL."""
        data = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            if (info.json_schema_extra or {}).get("secret") and data.get(name) is not None:
                data[name] = REDACTED
        return data


#: What :meth:`BaseConfig.public_dump` writes in place of a secret.
REDACTED = "<redacted>"


def secret_field(description: str) -> Any:
    """An optional field holding a secret (a bearer token, a URL with a password): never dumped or logged."""
    return Field(None, description=description, json_schema_extra={"secret": True})


def port_field(default: int, what: str = "gRPC port") -> Any:
    """The ``port`` field of a server config: the one declaration of its bounds, each server its default."""
    return Field(default, ge=0, le=65535, description=f"{what} (0 = pick a free port).")


def metrics_port_field(default: int) -> Any:
    """The ``metrics_port`` field of a server config: the one declaration of its bounds, each its default."""
    return Field(
        default,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port (0 = pick a free port, -1 = disabled).",
    )


class ServerConfig(BaseConfig):
    """Settings every gRPC server shares (see services/rlhf/core/server.py)."""

    host: str = Field("0.0.0.0", description="Address the gRPC server binds to.")
    port: int = port_field(50051)
    # Services have their own defaults (generation 9091, reward 9092, feedback 9093, trainer 9094); the next one
    # is left to anything else built on ServerConfig. Not 9090: a Prometheus on the same host listens there.
    metrics_port: int = metrics_port_field(9095)
    metrics_host: str = Field("0.0.0.0", description="Address the /metrics endpoint binds to.")
    port_file: str | None = Field(
        None,
        description="Write {'port', 'metrics_port', 'pid'} as JSON to this file once the ports are bound (launchers, tests); readiness is the health service's SERVING.",
    )
    max_message_mb: int = Field(
        64, ge=1, le=2047, description="Largest gRPC message accepted or sent, in MiB."
    )
    max_concurrent_rpcs: int = Field(
        512, ge=1, description="RPCs handled at once; more are answered RESOURCE_EXHAUSTED."
    )
    grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds in-flight calls get to finish before they are cancelled."
    )
    tls_cert_file: str | None = Field(
        None, description="PEM certificate chain; with tls_key_file enables TLS."
    )
    tls_key_file: str | None = Field(None, description="PEM private key for tls_cert_file.")
    auth_token: str | None = secret_field(
        "Bearer token required on every RPC except health (prefer auth_token_file)."
    )
    auth_token_file: str | None = Field(
        None, description="File with accepted bearer tokens, one per line (e.g. a mounted Kubernetes secret)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json' for one JSON object per log line."
    )
    torch_threads: int = Field(1, ge=1, le=256, description="torch.set_num_threads for this process.")


def _env_values(cls: type[BaseConfig], environ: typing.Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    prefixes = ["RLHF_"] + ([f"RLHF_{cls.section.upper().replace('-', '_')}_"] if cls.section else [])
    for prefix in prefixes:  # section-specific prefix last, so it wins
        for name in cls.model_fields:
            key = prefix + name.upper()
            if key in environ:
                values[name] = yaml.safe_load(environ[key]) if environ[key] != "" else None
    return values


def load_config(
    cls: type[C],
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` from defaults, a YAML file, the environment and explicit overrides (flags), in that order."""
    merged: dict[str, Any] = {}
    if config_file:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: expected a mapping of config keys")
        if cls.section and isinstance(data.get(cls.section), dict):
            data = data[cls.section]  # a file may hold several sections, e.g. the chart's rendered config
        merged.update(data)
    merged.update(_env_values(cls, os.environ if environ is None else environ))
    merged.update(overrides or {})
    return cls.model_validate(merged)


def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """(argparse type, is_list) for a field annotation; None for types set only from YAML."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (str, False)
    if origin is Literal:
        return type(typing.get_args(annotation)[0]), False
    if origin in (list, tuple):
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
        return _flag_type(inner)[0], True
    if annotation in (int, float, str, bool):
        return annotation, False
    return None, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[BaseConfig]) -> None:
    """Add ``--config`` and one ``--field-name`` flag per field of ``cls``, help text from the field description."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config file (flags and RLHF_* env vars override it)."
    )
    for name, field in cls.model_fields.items():
        typ, is_list = _flag_type(field.annotation)
        if typ is None:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "unset"
        help_text = f"{field.description or ''} (default: {default})"
        choices = (
            list(typing.get_args(field.annotation))
            if typing.get_origin(field.annotation) is Literal
            else None
        )
        if typ is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                type=typ,
                nargs="+" if is_list else None,
                choices=choices,
                default=argparse.SUPPRESS,
                help=help_text,
            )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config for a parsed command line built with :func:`add_config_arguments`."""
    overrides = {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
    return load_config(cls, getattr(args, "config", None), overrides)
