"""Serve the labeling app over HTTP in a background thread of the feedback server's process.

Werkzeug's threaded WSGI server: a labeling page has a handful of users, each request is a few small database
queries, and running in the feedback process means the labeling metrics appear on the feedback service's
``/metrics`` endpoint. Behind an ingress it is one more port of the feedback pod.
"""

from __future__ import annotations

import logging
import threading

from flask import Flask
from werkzeug.serving import make_server

from rlhf.core.auth import read_auth_tokens
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.app import create_app, labeling_state
from rlhf.labeling.queue import LabelingQueue

log = logging.getLogger("rlhf.labeling")


def app_from_config(store: FeedbackStore, config: FeedbackConfig) -> Flask:
    """The labeling app for a feedback server's store and config."""
    queue = LabelingQueue(store, lease_seconds=config.labeling_lease_seconds)
    app = create_app(
        queue,
        tokens_file=config.labeling_tokens_file,
        admins=config.labeling_admins,
        service_tokens=read_auth_tokens(config),
        secret_key_file=config.labeling_secret_key_file,
        low_agreement=config.labeling_low_agreement,
        min_pairs=config.labeling_min_pairs,
    )
    labeling_state(app).refresh_depth()
    return app


def start_page(store: FeedbackStore, config: FeedbackConfig) -> LabelingWebServer:
    """The labeling page for a feedback server's store and config, serving on ``config.labeling_port``."""
    return LabelingWebServer(
        app_from_config(store, config), config.labeling_host, config.labeling_port
    ).start()


class LabelingWebServer:
    """``start()`` binds (port 0 = a free one, see ``.port``) and serves in a thread; ``stop()`` shuts down."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self._server = make_server(host, port, app, threaded=True)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="labeling-http", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def refresh_depth(self) -> int:
        """Set the queue-depth gauge from the database."""
        return labeling_state(self.app).refresh_depth()

    def start(self) -> LabelingWebServer:
        self._thread.start()
        log.info("labeling page on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)
        self._server.server_close()

    def __enter__(self) -> LabelingWebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
