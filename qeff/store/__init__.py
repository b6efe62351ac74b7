"""The artifact store: where qeff keeps what it builds, and how it proves a kept file is still
the one it wrote (manifests, digests, atomic writes, locks, the cache root, ``qeff doctor``)."""
