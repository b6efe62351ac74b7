"""pytest_qeff: the pytest plugin that turns qeff's model cards into conformance tests,
benchmarks and HTML reports. See ``docs/plugin.md``; the hooks are in :mod:`pytest_qeff.plugin`."""
