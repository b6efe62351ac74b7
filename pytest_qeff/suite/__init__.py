"""The conformance suite: ``pytest --qeff-model NAME`` (or ``pytest --pyargs pytest_qeff.suite
--qeff-model NAME``) collects :mod:`pytest_qeff.suite.test_conformance`."""
