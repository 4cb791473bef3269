"""OpenAI-compatible HTTP server on top of any Generator (``python torchchat.py server``).

- ``schemas.py``: request bodies, unsupported parameters, fitting a request to the context;
- ``engine.py``: the generation worker thread, which drives the generator's continuous batching;
- ``responses.py``: response bodies, stream chunks, holding back stop-string prefixes;
- ``app.py``: the FastAPI routes (``/v1/...`` and the chat page ``static/index.html``);
- ``errors.py``: every error in OpenAI's shape;
- ``serve.py``: binding, running uvicorn, shutting down (distributed, the other ranks run ``generator.follow()``).

See docs/server.md.
"""

from torchchat.server.app import ServerConfig, create_app
from torchchat.server.engine import Engine
from torchchat.server.serve import bind, serve

__all__ = ["Engine", "ServerConfig", "bind", "create_app", "serve"]
