"""turnout side by side with other model servers on the same MLP (``python -m bench.peers``).

- :mod:`bench.peers.install`: each peer in a venv of its own under ``bench/.peers/``;
- :mod:`bench.peers.systems`: how each peer is started, checked and loaded;
- :mod:`bench.peers.report`: the table, the JSON and the plots;
- ``bench/peers/servers/``: the peers' server scripts, run with the peers' own interpreters
  (they import packages that the project's venv does not have).
"""
