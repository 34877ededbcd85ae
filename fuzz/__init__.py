"""Coverage-guided fuzzing (atheris) of the code that reads untrusted input.

One harness per concern, each a module with a ``check(data: bytes)`` that raises
only when a property of the bridge is broken:

- ``signature``: header parsing and signature verification;
- ``classification``: body classification and parsing;
- ``frames``: the AMQP publish encoder, decoded back with pamqp;
- ``publish_path``: one authentic webhook through verification, classification,
  routing and encoding, as the request path chains them.

``python -m fuzz HARNESS [libFuzzer flags]`` runs one; ``corpus/HARNESS/`` holds its
seeds. Nothing here imports the bridge at import time: the runner imports each
harness under atheris's instrumentation so the bridge's branches guide the fuzzer.
"""
