"""oshepherd's benchmark suite: the gateway measured against direct calls to the hosts.

``python -m bench`` (``make bench``) starts everything it measures as real processes on
loopback: an embedded Redis, Ollama stand-ins (``oshepherd.testing.standin``), the API and the
workers. It prints a table, and writes it as Markdown with a JSON copy and a plot to
``bench/results/``.
"""
