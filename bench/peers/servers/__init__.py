"""The peers' server scripts, each run by its peer's own interpreter (bench/.peers/<peer>/)
as ``python -m bench.peers.servers.<script>`` from the repository root. They import the
peers' packages, which the project's venv does not have: nothing in turnout imports them."""
