"""Released Sa2VA checkpoints: import into an hsft model directory and export back, bit for bit.

See hsft.model.release.importer (import_sa2va) and hsft.model.release.exporter (export_sa2va);
hsft.model.release.keys holds the tensor-name mapping; hsft.model.release.agreement compares an
imported model's inference with the release's own code (launch/compare_with_release.py).
"""

from hsft.model.release.source import ReleaseError

__all__ = ["ReleaseError", "import_sa2va", "export_sa2va"]


def import_sa2va(*args, **kwargs):
    from hsft.model.release.importer import import_sa2va as run

    return run(*args, **kwargs)


def export_sa2va(*args, **kwargs):
    from hsft.model.release.exporter import export_sa2va as run

    return run(*args, **kwargs)
