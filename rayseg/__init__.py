"""rayseg: segment image archives at cluster scale on Ray."""

__version__ = "0.1.0"


def segment(config=None, **kwargs):
    """Run a segment job; takes a SegmentConfig or its fields as keywords, returns the summary dict."""
    from rayseg.segment import segment as _segment

    return _segment(config, **kwargs)


def read_table(output: str, storage_options: dict | None = None, table: str = "images"):
    """An output's rows as one consistent snapshot (a pyarrow Dataset): the one way to read what rayseg wrote."""
    from rayseg.table import read_table as _read_table

    return _read_table(output, storage_options, table)


__all__ = ["segment", "read_table", "__version__"]
