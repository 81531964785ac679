"""``recalign serve``: recommendations and explanations over HTTP (FastAPI + uvicorn).

:func:`~recalign.serve.app.create_app` builds the application around a loaded
:class:`~recalign.lm.recommend.RecommendSession`; :class:`~recalign.serve.app.BackgroundServer` runs it
on a local port in a thread (what the tests and notebooks use); :func:`~recalign.serve.app.serve` runs
it in the foreground (the CLI).
"""

from recalign.serve.app import BackgroundServer, create_app, serve

__all__ = ["BackgroundServer", "create_app", "serve"]
