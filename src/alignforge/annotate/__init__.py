"""Pairwise human-preference annotation: a FastAPI + SQLAlchemy web app (``alignforge annotate``).

Never imports torch or transformers: the app starts on machines without an ML stack.
"""
