"""nclab's HTTP API and persistence: settings, ORM models, job lifecycle, routes.

Never imports torch or the worker: experiments are enqueued by Celery task name.
"""
