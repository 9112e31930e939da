"""gunicorn settings for the Formulary API: ``gunicorn -c gunicorn.conf.py``.

Declarative on purpose: values come from ``broker.settings.Settings`` (the
``FORMULARY_*`` environment), hooks only log, or do the one piece of
plumbing each names. ``preload_app`` stays off so every worker imports the
app, and so connects to the broker and sets up its metrics, after the fork.
"""

import math
import os
import shutil
import tempfile

from broker.settings import Settings

_settings = Settings.from_env()

#
# Application
#
wsgi_app = "api.app:get_app()"
preload_app = False

#
# Server socket
#
bind = [_settings.bind]
backlog = 2048
# Each worker opens its own listening socket (SO_REUSEPORT) and the kernel
# spreads new connections over them. With one shared socket, whichever worker
# wakes first accepts a whole burst of keep-alive connections: measured with
# 8 connections, one worker served them all on one core while the other sat
# idle. Unix socket binds keep the shared socket (a path cannot be shared).
reuse_port = not _settings.bind.startswith("unix:")

#
# Worker processes
#
# gevent: each connection is a greenlet, so a client that stalls mid-request,
# or a keep-alive connection that idles, holds its socket and nothing that
# other clients need (with threads, a dozen stalled clients held every thread).
# The broker client waits on sockets and locks gevent patches, so requests in
# flight share broker round trips (submits go together in one submit_many).
# The broker process does the real work, so one worker per core suffices.
# api.gunicorn_worker.Worker is gunicorn's gevent worker, except that a stop
# does not wait out idle keep-alive connections.
worker_class = "api.gunicorn_worker.Worker"
workers = _settings.web_workers
worker_connections = _settings.web_connections
timeout = 30
graceful_timeout = 10
# How long an idle keep-alive connection stays open, and, in gunicorn's gevent
# worker, how long a connection has to send a request's head: a client that
# stalls there is cut off after FORMULARY_READ_TIMEOUT, as one that stalls in
# the body is (api.connections).
keepalive = math.ceil(_settings.read_timeout)  # gunicorn takes whole seconds

#
# Limits (the API itself refuses bodies over 64 KiB with 413)
#
limit_request_line = 4094
limit_request_fields = 100

#
# Control socket: gunicorn 27 would otherwise open one under ~/.gunicorn
#
control_socket_disable = True

#
# Logging
#
loglevel = _settings.log_level.lower()
accesslog = None
errorlog = "-"
proc_name = "formulary-api"


#
# Server hooks
#
def on_starting(server):
    # Prometheus multiprocess mode: each worker writes its metrics to files in
    # this arbiter's private directory and /metrics merges them all. The
    # library reads PROMETHEUS_MULTIPROC_DIR when a worker first imports it,
    # so it is exported here, before any fork. This is the one environment
    # write of the API: plumbing between gunicorn and prometheus_client.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="formulary-metrics-")
    server.log.info("workers' metrics are merged from %s", os.environ["PROMETHEUS_MULTIPROC_DIR"])


def when_ready(server):
    server.log.info("Formulary API listening on %s", ", ".join(bind))


def post_fork(server, worker):
    server.log.info("worker %s started; it connects to the broker on first use", worker.pid)


def worker_abort(worker):
    worker.log.warning("worker %s aborted (timeout)", worker.pid)


def child_exit(server, worker):
    # Imported here, not at the top: importing prometheus_client before
    # on_starting has exported the directory would fix single-process mode
    # in the arbiter, and the workers forked from it would inherit that.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
