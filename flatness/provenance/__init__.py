"""Provenance: what produced every number (DESIGN.md section 9).

- :mod:`flatness.provenance.digest`: content digests of checkpoints, files and sample indices;
- :mod:`flatness.provenance.fingerprint`: the fingerprint of a run (settings, the user's code
  files, the data, versions, device), recomputed and compared by every command that reads a run;
- :mod:`flatness.provenance.block`: the ``provenance`` block that outputs carry.
"""
