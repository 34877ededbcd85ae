"""The documentation's reference pages, generated from the code.

``python -m docsgen`` writes docs/reference/{settings,cli,metrics,events,messages,asyncapi}.md
and docs/reference/asyncapi.json; ``python -m docsgen --check`` exits 1 naming each page
that differs from what the code generates (tests/test_docs.py runs it).
"""
