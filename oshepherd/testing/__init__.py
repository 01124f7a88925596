"""What the tests and the benchmarks build on, shipped with the package as
``starlette.testclient`` is: an Ollama stand-in (``standin``) and a fleet on one machine
(``fleet``).

Nothing is imported here, so that ``python -m oshepherd.testing.standin`` runs the module once.
"""
