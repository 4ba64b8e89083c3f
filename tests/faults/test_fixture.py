"""The suite's shared run is whole: `kdcache verify` passes on it and on a fresh copy."""

from faultlib import invoke


def test_the_shared_run_and_its_copies_verify(cached_run, fresh_run):
    for run in (cached_run, fresh_run):
        result = invoke("verify", run.store)
        assert result.exit_code == 0 and result.output.strip().endswith(": ok"), result.output
